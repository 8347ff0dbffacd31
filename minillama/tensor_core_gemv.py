"""Single-token products of 8-bit weights on the tensor cores (``mma.sync`` m16n8k16 in float16),
written in Gluon.

It computes what ``minillama.kernels.gemv`` computes for an int8 or float8_e4m3fn weight with its
per-row scales, out[n] = scale[n] * sum_k W[n, k] x[k] for one bf16 row x, in the forms
``kernels.gemv`` calls without a norm in its launch: the plain product, SiLU x up (``swiglu``), RoPE
of the output (``rope``), each as a programmatic dependent or not, and of each the product of a row
that the GEMV before normed but for the 1 / rms, which this one applies (``norm``: x is h * the
norm's gain). The Triton GEMV converts each weight
to float32 and multiplies it on the CUDA cores: ~4 instructions a weight for e4m3 (a conversion to
float16 per two values, one to float32 and an FFMA each), ~4.8 for int8. Here a weight costs half a
conversion (e4m3: one ``cvt`` per two values; int8: a byte permute and a float16 subtraction per two)
and 1/8 of an ``mma``: sm_90 SASS of the loop, 1.4 instructions a weight for e4m3 and 2.2 for int8 at
2 tiles a warp, 2.9 for int8 at 1 (x's conversion, 5 instructions per two values, is paid once a
warp for its 2 or 4 weight rows). ``Runner.tune_gemv`` times its tilings beside the Triton GEMV's.

Measured on the H200 (2026-12-04, BENCHMARKS.md), random Llama-3.1-8B, us per matrix over the 32
layers in a CUDA graph, the Triton GEMV's best tiling -> this kernel's: fp8 qkv after down's norm
9.92 -> 8.15, gate/up after o's norm 31.14 -> 28.41, o 6.33 -> 6.07; int8 qkv (norm apart) 11.93 ->
10.79, gate/up after o's norm 33.58 -> 29.80, o 6.67 -> 6.19 (down stays on the Triton GEMV: 16.37
against 16.59 at best). Whole batch-1 decode steps (cache 512, the tuner choosing), two interleaved
rounds each: fp8 390.5 / 390.3 -> 402.1 / 402.0 tok/s, int8 375.3 / 376.4 -> 394.8 / 390.5.

How the product uses the tensor cores. An mma multiplies A (16 x 16) by B (16 x 8). Each warp's A
tiles hold 2 weight rows, each cut into 8 slices of K: A's row (pair member j, slice s) is weight
row j's slice s, and B's column s is x's slice s, so the products wanted are A @ B's diagonal
(row's slice = column), summed over the slices. The other 7/8 of the mma's work is thrown away; the
mma is still 1 instruction in 11 of the e4m3 loop. The pair is two consecutive rows, or the rows
the epilogue combines: gate and up (``swiglu``), a head's dims i and i + head_dim / 2 (``rope``).
The operand layout gives each thread 16 consecutive K values of a row (``k_width`` 16: one 16-byte
load), and the same 16 of x; the mma's K order is permuted alike in A and B, which the sum does not
see. The slices are either K / 8 consecutive values each, or consecutive BLOCK_K chunks of each
8 * BLOCK_K step (``interleaved``). The tilings are ``kernels.TensorCoreTiling``; the candidates,
``kernels.TENSOR_CORE_GEMV_TILINGS``.

Precision. The products are exact: e4m3 and int8 values are exact in float16, and so is x scaled by
2^-8 wherever |x| is in [2^-6, 2^24) (bf16's 8-bit mantissa fits float16's 11). Below 2^-6 a value
becomes a float16 subnormal: an absolute error of at most 2^-17 (7.6e-6), where bf16's own rounding
of values near 2^-6 is up to 2^-15. From about 2^24 (1.7e7) on it overflows. Sums are float32, in
another order than the Triton GEMV's. The first weight tile is loaded before a dependent launch
waits for the kernel before it (weights do not depend on it).

Gluon is experimental: where it is missing or its API differs, :data:`AVAILABLE` is False (with
:data:`UNAVAILABLE_REASON`) and only the Triton GEMV runs.
"""
from typing import Optional

import torch
import triton

from flashcore.launch import compute_capability
from minillama.kernels import TensorCoreTiling, _inverse_rms, _rope_epilogue, _swiglu

try:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.ampere import mma_v2
    AVAILABLE, UNAVAILABLE_REASON = True, None
except (ImportError, AttributeError) as e:  # an older Triton, or another Gluon API
    AVAILABLE, UNAVAILABLE_REASON = False, f"triton {triton.__version__} has no usable Gluon mma_v2: {e}"


# x as float16 scaled by 2^-8, two bf16 values a register (see the module's docstring)
_BF16_TO_SCALED_F16 = """
{
.reg .b32 lo, hi;
shl.b32 lo, $1, 16;
and.b32 hi, $1, 0xffff0000;
mul.f32 lo, lo, 0f3B800000;
mul.f32 hi, hi, 0f3B800000;
cvt.rn.f16x2.f32 $0, hi, lo;
}
"""
# int8 to float16, four a register: each byte ^ 0x80 placed by PRMT under the float16 exponent of
# 1024 is 1024 + (q + 128); one subtraction of 1152 by pairs leaves q, exactly.
_INT8_TO_F16 = """
{
.reg .b32 t, c;
xor.b32 t, $2, 0x80808080;
mov.b32 c, 0x64806480;
prmt.b32 $0, t, 0x64646464, 0x5140;
prmt.b32 $1, t, 0x64646464, 0x7362;
sub.f16x2 $0, $0, c;
sub.f16x2 $1, $1, c;
}
"""

if AVAILABLE:
    BF16_TO_SCALED_F16 = gl.constexpr(_BF16_TO_SCALED_F16)
    INT8_TO_F16 = gl.constexpr(_INT8_TO_F16)

    @gluon.jit
    def _grid_dependency(instruction: gl.constexpr):
        gl.inline_asm_elementwise(instruction + "; // $0", "=r", [], dtype=gl.int32, is_pure=False, pack=1)

    @gluon.jit
    def _product_step(w_tile, x_ptrs, acc, INT8: gl.constexpr):
        """acc + the mma of a weight tile (int8 or e4m3, as float16) by x's slices at x_ptrs."""
        if INT8:
            w = gl.inline_asm_elementwise(INT8_TO_F16, "=r,=r,r", [w_tile], dtype=gl.float16, is_pure=True, pack=4)
        else:
            w = w_tile.to(gl.float16)
        x = gl.inline_asm_elementwise(BF16_TO_SCALED_F16, "=r,r", [gl.load(x_ptrs)], dtype=gl.float16,
                                      is_pure=True, pack=2)
        return mma_v2(w, x, acc)

    @gluon.jit
    def _pair_rows(p, N, SWIGLU: gl.constexpr, ROPE: gl.constexpr, HALF: gl.constexpr):
        """The weight rows of output pair p: (first, the offset of the second)."""
        if ROPE:  # a head's dims i and i + HALF
            return (p // HALF) * (2 * HALF) + p % HALF, HALF
        elif SWIGLU:  # gate and up
            return p, N
        else:
            return 2 * p, 1

    @gluon.jit
    def _gemv_tensor_core_fwd(X, W, Scale, Out, Cos, Sin, Sumsq, N, K, stride_wn, slice_k, k_end, n_rotated,
                              sumsq_tiles, eps, SWIGLU: gl.constexpr, ROPE: gl.constexpr, HALF: gl.constexpr,
                              NORM_ROWS: gl.constexpr, BLOCK_T: gl.constexpr, TILES: gl.constexpr,
                              BLOCK_K: gl.constexpr, STEP: gl.constexpr, INT8: gl.constexpr,
                              DEPENDENT: gl.constexpr):
        """Program pid computes output pairs pid * P ... pid * P + P - 1 (P = TILES * num_warps).
        Slice s of a row starts at s * slice_k; the loop steps STEP over [0, k_end). N: the output's
        size with SWIGLU (gate's rows), else the weight's rows. NORM_ROWS: x is h * a norm's gain; the
        products are multiplied by h's 1 / rms, from the sumsq_tiles sums of squares at Sumsq (as
        the Triton GEMV's NORM_ROWS)."""
        if DEPENDENT:
            _grid_dependency("griddepcontrol.launch_dependents")
        NW: gl.constexpr = gl.num_warps()
        P: gl.constexpr = TILES * NW
        M: gl.constexpr = 16 * P
        mma: gl.constexpr = gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[NW, 1], instr_shape=[16, 8])
        a_layout: gl.constexpr = gl.DotOperandLayout(0, mma, 16)
        b_layout: gl.constexpr = gl.DotOperandLayout(1, mma, 16)
        pid = gl.program_id(0)
        # A's row r: pair r // 16, its member (r // 8) % 2, slice r % 8
        r = gl.arange(0, M, layout=gl.SliceLayout(1, a_layout))
        first, offset = _pair_rows(pid * P + r // 16, N, SWIGLU, ROPE, HALF)
        w_row = first + ((r // 8) % 2) * offset
        ks = gl.arange(0, BLOCK_K, layout=gl.SliceLayout(0, a_layout))
        w_ptrs = W + (w_row.to(gl.int64) * stride_wn + (r % 8) * slice_k)[:, None] + ks[None, :]
        xk = gl.arange(0, BLOCK_K, layout=gl.SliceLayout(1, b_layout))
        xs = gl.arange(0, 8, layout=gl.SliceLayout(0, b_layout))
        x_ptrs = X + xk[:, None] + (xs * slice_k)[None, :]
        acc = gl.zeros([M, 8], gl.float32, mma)
        w = gl.load(w_ptrs)
        if DEPENDENT:
            _grid_dependency("griddepcontrol.wait")
        if NORM_ROWS:  # h's pieces' sums of squares: loaded before the weights stream, added after it
            offs_t = gl.arange(0, BLOCK_T, layout=gl.BlockedLayout([1], [32], [NW], [0]))
            pieces = gl.load(Sumsq + offs_t, mask=offs_t < sumsq_tiles, other=0.0)
        acc = _product_step(w, x_ptrs, acc, INT8)
        for k0 in range(STEP, k_end, STEP):
            acc = _product_step(gl.load(w_ptrs + k0), x_ptrs + k0, acc, INT8)
        # the diagonal of each tile's product, summed over the slices per pair member
        rows = gl.arange(0, M, layout=gl.SliceLayout(1, mma))
        cols = gl.arange(0, 8, layout=gl.SliceLayout(0, mma))
        diagonal = gl.sum(gl.where((rows % 8)[:, None] == cols[None, :], acc, 0.0), 1)
        pair_layout: gl.constexpr = gl.BlockedLayout([1, 2, 8], [32, 1, 1], [NW, 1, 1], [2, 1, 0])
        z = gl.convert_layout(gl.reshape(diagonal, [P, 2, 8]), pair_layout)
        member = gl.arange(0, 2, layout=gl.SliceLayout(0, gl.SliceLayout(2, pair_layout)))[None, :, None]
        y = gl.sum(gl.sum(gl.where(member == 0, z, 0.0), 2), 1)
        y_u = gl.sum(gl.sum(gl.where(member == 1, z, 0.0), 2), 1)
        p = pid * P + gl.arange(0, P, layout=gl.SliceLayout(1, gl.SliceLayout(2, pair_layout)))
        first, offset = _pair_rows(p, N, SWIGLU, ROPE, HALF)
        y = y * 256.0 * gl.load(Scale + first)  # 256: x's 2^-8
        y_u = y_u * 256.0 * gl.load(Scale + first + offset)
        if NORM_ROWS:  # summed in piece order, as the Triton GEMV's NORM_ROWS
            r = _inverse_rms(gl.sum(pieces, 0) / K, eps)
            y = y * r
            y_u = y_u * r
        ty: gl.constexpr = Out.dtype.element_ty
        if SWIGLU:
            gl.store(Out + p, _swiglu(y.to(ty).to(gl.float32), y_u.to(ty).to(gl.float32), ty).to(ty))
        else:
            if ROPE:
                y, y_u = _rope_epilogue(y, y_u, Cos, Sin, p % HALF, first < n_rotated, HALF, ty)
            gl.store(Out + first, y.to(ty))
            gl.store(Out + first + offset, y_u.to(ty))


def usable(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether this kernel can run the product: Gluon present, a bf16 x on a GPU with e4m3 conversions
    (compute capability 8.9 or later), an 8-bit weight."""
    return (AVAILABLE and x.is_cuda and x.dtype == torch.bfloat16 and compute_capability(x.device) >= (8, 9)
            and weight.dtype in (torch.int8, torch.float8_e4m3fn))


def fits(tiling: TensorCoreTiling, n_rows: int, K: int, head_dim: Optional[int] = None) -> bool:
    """Whether ``tiling`` divides the product: whole steps of K (8 slices of block_k) and whole programs of
    output pairs (with RoPE, within a head's half)."""
    pairs = tiling.tiles * tiling.num_warps
    n_pairs = n_rows // 2
    if K % (8 * tiling.block_k) or n_rows % 2:
        return False
    if head_dim is not None and (head_dim // 2) % pairs:
        return False
    return n_pairs % pairs == 0


def gemv(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, tiling: TensorCoreTiling, *, swiglu: bool = False,
         rotary=None, norm=None, dependent: bool = False) -> torch.Tensor:
    """One row x (K,) bf16 times an 8-bit weight (N_w, K)^T with per-row float32 ``scale``: (N_w,), or
    silu(gate) * up (N_w / 2,) with ``swiglu``. rotary: RoPE of the output, as ``kernels.gemv`` prepares
    it from its ``rope``: (cos, sin: head_dim contiguous values each, half = head_dim / 2, n_rotated: the
    rows rotated). norm: ``kernels.gemv``'s (sumsq (pieces, 1) float32 contiguous, eps): x is h * a norm's
    gain. dependent: launch as a programmatic dependent of the previous kernel."""
    K = x.shape[-1]
    n_rows = weight.shape[0]
    cos, sin, half, n_rotated = rotary if rotary is not None else (x, x, 1, 0)
    assert fits(tiling, n_rows, K, None if rotary is None else 2 * half), (tiling, weight.shape, half)
    assert x.dtype == torch.bfloat16 and weight.dtype in (torch.int8, torch.float8_e4m3fn), (x.dtype, weight.dtype)
    assert x.is_contiguous() and weight.stride(1) == 1 and weight.shape[1] == K and scale.shape == (n_rows,)
    N = n_rows // 2 if swiglu else n_rows
    out = torch.empty(N, dtype=x.dtype, device=x.device)
    tiles, block_k, num_warps, interleaved = tiling
    slice_k, step, k_end = (block_k, 8 * block_k, K) if interleaved else (K // 8, block_k, K // 8)
    grid = (n_rows // 2) // (tiles * num_warps)
    sumsq, eps = norm if norm is not None else (x, 0.0)
    sumsq_tiles = sumsq.shape[0] if norm is not None else 0
    _gemv_tensor_core_fwd[(grid,)](
        x, weight, scale, out, cos, sin, sumsq, N, K, weight.stride(0), slice_k, k_end, n_rotated, sumsq_tiles, eps,
        SWIGLU=swiglu, ROPE=rotary is not None, HALF=half, NORM_ROWS=norm is not None,
        BLOCK_T=triton.next_power_of_2(max(sumsq_tiles, 1)), TILES=tiles, BLOCK_K=block_k, STEP=step,
        INT8=weight.dtype == torch.int8, DEPENDENT=dependent, num_warps=num_warps, launch_pdl=dependent)
    return out
