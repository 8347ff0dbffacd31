"""The 8-bit-weight matmul of prefill chunks, and of gate/up in batched decode steps of 17-64 rows,
on Hopper GPUs, written in Gluon (Triton's lower-level language: layouts, shared memory, barriers
and wgmma issued by hand).

It computes what ``minillama.kernels.matmul`` computes for 8-bit weights, out (M, N) = x (M, K) @
(W (N, K) * scale[:, None])^T with bf16 x and int8 / float8_e4m3fn W, in the same swapped form (out^T tiles
W @ x^T: each converted weight tile is wgmma's register operand, x^T comes from shared memory by
TMA), and differs only in how the loop is scheduled:

* the wgmma is asynchronous and one stays in flight: the next weight tile is converted while the
  previous product runs (Triton 3.6's own pipeline waits for each wgmma before converting);
* the loop runs over pairs of K tiles, so the registers of a converted tile are written again only
  after a wait has retired the wgmma that reads them (a loop of one tile per step rewrites them
  while that wgmma runs: wrong products, measured);
* the first two tiles are peeled, so no zero-trip path merges zeros into the accumulator after the
  wgmmas (ptxas then serializes every wgmma: its warning C7515).

Measured on the H200 (BENCHMARKS.md, 2026-12-02), us per matrix of Llama-3.1-8B at 512 rows,
Triton kernel -> this one: fp8 qkv 48.8 -> 43.5, o 33.0 -> 27.3, gate/up 195.4 -> 182.7, down
101.9 -> 87.3; int8 qkv 54.6 -> 48.0, o 39.3 -> 30.7, gate/up 217.7 -> 186.0, down 109.3 -> 97.3
(cuBLAS on bf16 weights: 35.7, 24.2, 159.9, 80.0). Time to first token for 512 tokens, same
device call: int8 15.3 -> 13.5 ms, fp8 14.0 -> 13.1 (bf16 11.3); 128-row decode steps (B=128) 7-9%
faster. int8 tiles are converted by pairs as the operand layout loads them
(``kernels.INT8_PAIR_TO_BF16``; 2026-12-03: int8 at 512 rows qkv 45.7 -> 43.7, down 98.7 -> 90.5,
as fast as fp8). In batched decode its epilogue applies each row's 1 / rms from the sums of
squares that the product before it wrote (``kernels.matmul``'s ``norm``), and SiLU x up runs after
it: the 8B's gate/up at 64 rows in fp8 56.1 -> 42.0 us, in int8 57.7 -> 45.6; whole batch-64 steps
+5.8% (fp8).
:func:`tiling` picks it only where it was faster; elsewhere (down projections and square matrices
at <= 128-384 rows, where the Triton kernel splits K; most products of <= 64 rows)
``minillama.kernels`` keeps its own.

Gluon is experimental: where it is missing or its API differs, :data:`AVAILABLE` is False (with
:data:`UNAVAILABLE_REASON`) and the Triton kernel runs everywhere.
"""
from typing import Optional, Tuple

import torch
import triton

from flashcore.launch import Launch, compute_capability
from minillama.kernels import INT8_PAIR_TO_BF16

try:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma, warpgroup_mma,
                                                                  warpgroup_mma_wait)
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
    # the TMA load's name: async_copy_global_to_shared in Triton 3.6, async_load in later ones
    _tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared
    _cta_barrier = getattr(gl, "barrier", None) or gl.thread_barrier  # (likewise thread_barrier -> barrier)
    AVAILABLE, UNAVAILABLE_REASON = True, None
except (ImportError, AttributeError) as e:  # an older Triton, or another Gluon API
    AVAILABLE, UNAVAILABLE_REASON = False, f"triton {triton.__version__} has no usable Gluon for Hopper: {e}"

Tiling = Tuple[int, int, int, int, int]  # (BLOCK_M tokens, BLOCK_N weight rows, BLOCK_K, num_warps, num_stages)


def tiling(M: int, N: int, K: int, swiglu: bool = False) -> Optional[Tiling]:
    """The tiling of this kernel for an (M, K) x (N, K)^T product with 8-bit weights (int8 or
    float8_e4m3fn: the same tilings), or None where the Triton kernel was faster or the shape does
    not fit (K a multiple of 128: whole pairs of 64-wide K tiles).

    Past 64 rows, measured over Llama-3.1-8B's and -70B's matrices at 128, 256, 384 and 512 rows,
    int8 and fp8 (BENCHMARKS.md). At 512 rows, 256-token tiles of 64 weight rows, 3 stages deep
    where there are enough tiles for two programs per SM (qkv, gate/up, 70B), else 4 (8B o and down:
    128 tiles). At 17-64 rows only the 8B's gate/up with SiLU x up (``swiglu``: this kernel's
    product, then ``kernels.silu_mul``, against the Triton kernel with SiLU x up in its epilogue; the
    other matrices have too few weight-row tiles to fill the GPU without splitting K, which the Triton
    kernel does), in (32, 64, 64, 4, 4) up to 32 rows, (64, 128, 64, 8, 4) past that. us per matrix
    (H200, 2026-12-03, BENCHMARKS.md): fp8 at 32 rows 45.9 -> 37.7, at 48 50.9 -> 41.7, at 64
    56.1 -> 42.0; int8 (its bytes converted in pairs, ``kernels.INT8_PAIR_TO_BF16``) at 24 rows 51.1
    -> 39.9, at 32 48.5 -> 40.0, at 40 64.2 -> 44.5, at 48 63.6 -> 44.8, at 64 57.7 -> 45.6; (64, 64,
    64, 4, 4) took 51-59 us at 40-48 rows in both formats. At 16 rows both formats lose (fp8 32.8 ->
    37.2). The 70B's fp8 gate/up (K 8192) at 64 rows: 158.4 -> 155.7 at best, within 2%: the Triton
    kernel stays for K past 4096."""
    if K % 128 or M > 512:
        return None
    if M <= 64:
        if not swiglu or M <= 16 or N < 16384 or K > 4096:
            return None
        return (32, 64, 64, 4, 4) if M <= 32 else (64, 128, 64, 8, 4)
    down, square, wide = N < K, N == K, N >= 16384
    if M <= 128:
        if down or square:
            return None
        return (128, 128, 64, 8, 4) if wide else (128, 64, 64, 4, 4)
    if M <= 384:
        if down:
            return None
        if square:
            return 128, 64, 64, 4, 4
        if M <= 256:
            return (256, 64, 64, 4, 3) if wide else (256, 64, 64, 4, 4)
        return (128, 128, 64, 8, 4) if wide else (256, 128, 64, 8, 3)
    tiles = triton.cdiv(M, 256) * triton.cdiv(N, 64)
    return 256, 64, 64, 4, 3 if tiles >= 192 else 4


if AVAILABLE:
    @gluon.jit
    def _widen(w):
        """An 8-bit weight tile as bfloat16, exactly (e4m3 through float16: one cvt per two values; int8
        by pairs as the operand layout loads them, ``kernels.INT8_PAIR_TO_BF16``)."""
        if w.dtype == gl.float8e4nv:
            return w.to(gl.float16).to(gl.bfloat16)
        return gl.inline_asm_elementwise(INT8_PAIR_TO_BF16, "=r,h", [w], dtype=gl.bfloat16, is_pure=True, pack=2)

    @gluon.jit
    def _load_tiles(w_desc, x_desc, ready, w_smem, x_smem, slot, k_tile, off_n, off_m, num_k,
                    BLOCK_K: gl.constexpr):
        """TMA loads of K tile ``k_tile`` of W and x into ``slot`` (none past the last tile)."""
        pred = k_tile < num_k
        mbarrier.expect(ready.index(slot), w_desc.block_type.nbytes + x_desc.block_type.nbytes, pred=pred)
        _tma_load(w_desc, [off_n, k_tile * BLOCK_K], ready.index(slot), w_smem.index(slot), pred=pred)
        _tma_load(x_desc, [off_m, k_tile * BLOCK_K], ready.index(slot), x_smem.index(slot), pred=pred)

    @gluon.jit
    def _matmul_8bit_hopper_fwd(w_desc, x_desc, Scale, Out, Sumsq, M, N, K, stride_om, sumsq_tiles, eps,
                                BLOCK_N: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_K: gl.constexpr,
                                STAGES: gl.constexpr, NORM: gl.constexpr, BLOCK_T: gl.constexpr,
                                num_warps: gl.constexpr):
        """Program (m, n) computes out^T's tile (n, m): W tile (BLOCK_N, K) @ x tile (BLOCK_M, K)^T,
        times the per-row scale, stored transposed into out (M, N). NORM: as ``kernels.matmul``'s, x
        holds rows h * gain and Sumsq (sumsq_tiles, M) the sums of squares of pieces of h's rows; each
        token's dot products are multiplied by its 1 / rms (its pieces summed in piece order)."""
        off_m = gl.program_id(0) * BLOCK_M  # the programs that share a weight tile run side by side
        off_n = gl.program_id(1) * BLOCK_N
        mma_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                             instr_shape=[16, BLOCK_M, 16])
        a_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=mma_layout, k_width=2)
        w_smem = gl.allocate_shared_memory(w_desc.dtype, [STAGES] + w_desc.block_type.shape, w_desc.layout)
        x_smem = gl.allocate_shared_memory(x_desc.dtype, [STAGES] + x_desc.block_type.shape, x_desc.layout)
        ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(STAGES):
            mbarrier.init(ready.index(i), count=1)
        num_k = gl.cdiv(K, BLOCK_K)  # even: the host checks K % (2 * BLOCK_K) == 0
        for i in gl.static_range(STAGES):  # every slot is free: the first STAGES tiles
            _load_tiles(w_desc, x_desc, ready, w_smem, x_smem, i, i, off_n, off_m, num_k, BLOCK_K)

        # tiles 0 and 1 (see the module docstring for why apart)
        mbarrier.wait(ready.index(0), 0)
        acc = gl.zeros([BLOCK_N, BLOCK_M], dtype=gl.float32, layout=mma_layout)
        acc = warpgroup_mma(_widen(w_smem.index(0).load(a_layout)), x_smem.index(0).permute((1, 0)), acc,
                            use_acc=False, is_async=True)
        acc = warpgroup_mma_wait(num_outstanding=1, deps=(acc, ))
        mbarrier.wait(ready.index(1 % STAGES), (1 // STAGES) & 1)
        acc = warpgroup_mma(_widen(w_smem.index(1 % STAGES).load(a_layout)),
                            x_smem.index(1 % STAGES).permute((1, 0)), acc, is_async=True)
        acc = warpgroup_mma_wait(num_outstanding=1, deps=(acc, ))  # tile 0's wgmma is done: slot 0 is free
        _cta_barrier()
        fence_async_shared()
        _load_tiles(w_desc, x_desc, ready, w_smem, x_smem, 0, STAGES, off_n, off_m, num_k, BLOCK_K)
        for pair in range(2, num_k, 2):
            for half in gl.static_range(2):
                k_tile = pair + half
                slot = k_tile % STAGES
                mbarrier.wait(ready.index(slot), (k_tile // STAGES) & 1)
                a = _widen(w_smem.index(slot).load(a_layout))  # converted while the previous wgmma runs
                acc = warpgroup_mma(a, x_smem.index(slot).permute((1, 0)), acc, is_async=True)
                acc = warpgroup_mma_wait(num_outstanding=1, deps=(acc, ))
                # every warpgroup's wgmma of the previous tile is done: its slot takes a new tile
                _cta_barrier()
                fence_async_shared()
                _load_tiles(w_desc, x_desc, ready, w_smem, x_smem, (k_tile - 1) % STAGES, k_tile - 1 + STAGES,
                            off_n, off_m, num_k, BLOCK_K)
        acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc, ))
        for i in gl.static_range(STAGES):
            mbarrier.invalidate(ready.index(i))

        # -- epilogue: the per-row (output column) scale, each token's 1 / rms, stored with threads along N --
        offs_n = off_n + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, mma_layout))
        y = acc * gl.load(Scale + offs_n, mask=offs_n < N, other=0.0)[:, None]
        if NORM:
            offs_t = gl.arange(0, BLOCK_T, layout=gl.SliceLayout(1, mma_layout))
            offs_m = off_m + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(0, mma_layout))
            sumsq = gl.load(Sumsq + offs_t[:, None] * M + offs_m[None, :],
                            mask=(offs_t < sumsq_tiles)[:, None] & (offs_m < M)[None, :], other=0.0)
            mean_sq = gl.sum(sumsq, 0) / K
            # NaN where mean(h^2) overflowed, as kernels._inverse_rms: the overflow reaches the logits
            y = y * gl.where(mean_sq == float("inf"), float("nan"), gl.rsqrt(mean_sq + eps))[None, :]
        y = y.to(Out.dtype.element_ty)
        store_layout: gl.constexpr = gl.BlockedLayout([8, 1], [BLOCK_N // 8, 256 // BLOCK_N], [1, num_warps], [0, 1])
        y = gl.convert_layout(y, store_layout)
        rows = off_n + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, store_layout))
        cols = off_m + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(0, store_layout))
        mask = (rows < N)[:, None] & (cols < M)[None, :]
        gl.store(Out + cols.to(gl.int64)[None, :] * stride_om + rows[:, None], y, mask=mask)


def usable(x: torch.Tensor) -> bool:
    """Whether this kernel can run for x, whose operands passed ``kernels.tma_ready``: Gluon, a
    Hopper GPU (sm_90: wgmma) and bfloat16 activations."""
    return AVAILABLE and x.dtype == torch.bfloat16 and compute_capability(x.device)[0] == 9


class _Plan:
    """A launch of :func:`_matmul_8bit_hopper_fwd` for one layout: grid, shared-memory layouts and
    integer arguments computed once, and the compiled kernel launched without Triton binding its
    arguments again (``flashcore.launch``). H200 host, 2026-12-02: 25.7 us of host time a call at 512
    rows, against 70.7 for Triton's own launch with two layouts built per call (BENCHMARKS.md).
    ``sumsq_tiles``: the pieces of each row's sum of squares of a product with NORM, or 0 (no norm)."""

    def __init__(self, M: int, N: int, K: int, weight_dtype: torch.dtype, config: Tiling, sumsq_tiles: int):
        block_m, block_n, block_k, num_warps, num_stages = config
        w_type = gl.float8e4nv if weight_dtype == torch.float8_e4m3fn else gl.int8
        self.w_block, self.x_block = [block_n, block_k], [block_m, block_k]
        self.w_layout = gl.NVMMASharedLayout.get_default_for(self.w_block, w_type)
        self.x_layout = gl.NVMMASharedLayout.get_default_for(self.x_block, gl.bfloat16)
        self.grid = (triton.cdiv(M, block_m), triton.cdiv(N, block_n), 1)
        self.shape = (M, N)
        self.ints = (M, N, K, N, sumsq_tiles)  # M, N, K, out's row stride, the sums' pieces
        self.launch = Launch(_matmul_8bit_hopper_fwd, num_warps=num_warps, BLOCK_N=block_n, BLOCK_M=block_m,
                             BLOCK_K=block_k, STAGES=num_stages, NORM=sumsq_tiles > 0,
                             BLOCK_T=triton.next_power_of_2(max(sumsq_tiles, 1)))

    def __call__(self, x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, sumsq: torch.Tensor,
                 eps: float) -> torch.Tensor:
        out = torch.empty(self.shape, dtype=x.dtype, device=x.device)
        self.launch(self.grid, TensorDescriptor.from_tensor(weight, self.w_block, self.w_layout),
                    TensorDescriptor.from_tensor(x, self.x_block, self.x_layout), scale, out, sumsq, *self.ints, eps)
        return out


_PLANS: dict = {}
_MAX_PLANS = 4096  # bounded: a process that meets more shapes (prompt lengths) starts over


def matmul_8bit(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, config: Tiling,
                norm: Optional[Tuple[torch.Tensor, float]] = None) -> torch.Tensor:
    """x (M, K) bf16 @ (weight (N, K) * scale[:, None])^T, (M, N) bf16, in tiling ``config``
    (:func:`tiling`); the caller checks ``kernels.tma_ready`` and :func:`usable`. norm: (sumsq, eps)
    as ``kernels.matmul``'s: x holds rows h * gain, and each row's product is multiplied by its
    1 / rms from sumsq (pieces, M) float32."""
    M, K = x.shape
    N = weight.shape[0]
    assert K % (2 * config[2]) == 0 and config[1] == 16 * config[3], (K, config)
    sumsq, eps = norm if norm is not None else (scale, 0.0)
    sumsq_tiles = sumsq.shape[0] if norm is not None else 0
    assert norm is None or (sumsq.dtype == torch.float32 and sumsq.shape[1] == M and sumsq.is_contiguous()), sumsq.shape
    # what Triton specializes a launch on: shapes and strides (the descriptors' and the integers'),
    # dtypes, the scale's and the sums' 16-byte alignment (x and weight are aligned: tma_ready), the device
    key = (M, N, K, x.stride(0), weight.stride(0), weight.dtype, scale.data_ptr() % 16 == 0,
           sumsq.data_ptr() % 16 == 0, sumsq_tiles, x.device, config)
    plan = _PLANS.get(key)
    if plan is None:
        if len(_PLANS) >= _MAX_PLANS:
            _PLANS.clear()
        plan = _PLANS[key] = _Plan(M, N, K, weight.dtype, config, sumsq_tiles)
    return plan(x, weight, scale, sumsq, eps)
