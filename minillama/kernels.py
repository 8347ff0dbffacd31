"""Triton kernels behind :class:`minillama.backend.TritonBackend`: residual add + RMSNorm, RoPE's
cos / sin tables, RoPE in place, SiLU x mul, the single-token GEMV with a residual add + RMSNorm
prologue and a SiLU x up epilogue, and for 8-bit weights (int8, float8_e4m3fn;
``minillama.quantization``) the same GEMV reading them (SCALE) and a matmul for several rows.

Rounding: the elementwise kernels round to the model dtype wherever the torch backend does
(``bf16(w * bf16(x * r))``, ``bf16(bf16(x cos) + bf16(rot(x) sin))``, ...), so the two backends agree
bit for bit up to the reduction order of the mean and the matrix products. The GEMV's factored
RMSNorm skips the rounding of the normalized input: differences stay at bf16 rounding level.

Runs on CUDA, or on the CPU in Triton's interpreter when ``TRITON_INTERPRET=1`` was set before
Triton was imported (the tests). Triton decides that once, at import; so does this module.
"""
import functools
from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice
from triton.tools.tensor_descriptor import TensorDescriptor

from flashcore import INTERPRET  # Triton's interpreter switch, read once at import
from flashcore.launch import Launch, compute_capability, dependent_launch_supported


@triton.jit
def _inverse_rms(mean_sq, eps):
    # rsqrt(mean(x^2) + eps); NaN where mean(x^2) overflowed, so the overflow reaches the logits
    # (and the generate loop's NaN check) instead of turning the row into zeros.
    return tl.where(mean_sq == float("inf"), float("nan"), tl.rsqrt(mean_sq + eps))


@triton.jit
def _add_rmsnorm_fwd(X, Res, H_out, Normed, W, stride_x, stride_r, stride_h, stride_n, N, eps,
                     ADD: tl.constexpr, BLOCK: tl.constexpr, LAUNCH_DEPENDENTS: tl.constexpr):
    # One program per token row: h = x + res (rounded), normed = w * (h * rsqrt(mean(h^2) + eps)).
    # LAUNCH_DEPENDENTS: the next kernel, if it is a programmatic dependent (a GEMV), may launch at
    # once; it waits for this grid to finish before it reads anything.
    if LAUNCH_DEPENDENTS:
        tl.extra.cuda.gdc_launch_dependents()
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < N
    x = tl.load(X + row * stride_x + offs, mask=mask, other=0.0)
    if ADD:
        r = tl.load(Res + row * stride_r + offs, mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(X.dtype.element_ty)
        tl.store(H_out + row * stride_h + offs, x, mask=mask)
    w = tl.load(W + offs, mask=mask, other=0.0).to(tl.float32)
    normed = _rms_normed(x.to(tl.float32), w, N, eps, X.dtype.element_ty)
    tl.store(Normed + row * stride_n + offs, normed.to(Normed.dtype.element_ty), mask=mask)


@triton.jit
def _rms_normed(h, w, N, eps, ty: tl.constexpr):
    """w * RMSNorm(h) in float32 for a row h (float32 values of dtype ty; zero past N) and its gain w:
    the normalized row is rounded to ty before the gain, as the torch backend rounds it."""
    return w * (h * _inverse_rms(tl.sum(h * h, 0) / N, eps)).to(ty).to(tl.float32)


@triton.jit
def _rope_cos_sin_fwd(Positions, InvFreq, Cos, Sin, T, HALF: tl.constexpr, BLOCK_T: tl.constexpr,
                      BLOCK_HALF: tl.constexpr, LIBDEVICE: tl.constexpr):
    # BLOCK_T tokens a program: angle = float32(position) * inv_freq, written twice per row (dims i
    # and i + HALF). LIBDEVICE: CUDA's cosf / sinf, as torch's cos / sin run them (tl.cos / tl.sin
    # may lower to the approximate instructions, which lose accuracy at RoPE's large angles); the
    # interpreter has no libdevice: there tl.cos / tl.sin are numpy's float32 ones.
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_i = tl.arange(0, BLOCK_HALF)
    positions = tl.load(Positions + offs_t, mask=offs_t < T, other=0).to(tl.float32)
    inv_freq = tl.load(InvFreq + offs_i, mask=offs_i < HALF, other=0.0).to(tl.float32)
    angle = positions[:, None] * inv_freq[None, :]
    if LIBDEVICE:
        cos, sin = libdevice.cos(angle), libdevice.sin(angle)
    else:
        cos, sin = tl.cos(angle), tl.sin(angle)
    mask = (offs_t[:, None] < T) & (offs_i[None, :] < HALF)
    first = offs_t.to(tl.int64)[:, None] * (2 * HALF) + offs_i[None, :]
    ty = Cos.dtype.element_ty
    cos, sin = cos.to(ty), sin.to(ty)
    tl.store(Cos + first, cos, mask=mask)
    tl.store(Cos + first + HALF, cos, mask=mask)
    tl.store(Sin + first, sin, mask=mask)
    tl.store(Sin + first + HALF, sin, mask=mask)


@triton.jit
def _rope_fwd(QK, Cos, Sin, stride_t, stride_cs, H, D: tl.constexpr,
              BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr):
    # One program per token: rotate the first H heads of D dims in place (q heads, then k heads).
    # Rotate-half layout: dims i and i + D/2 form a pair; cos/sin hold the same value at i and i + D/2.
    t = tl.program_id(0).to(tl.int64)
    HALF: tl.constexpr = D // 2
    offs_h = tl.arange(0, BLOCK_H)
    offs_i = tl.arange(0, BLOCK_HALF)
    mask = (offs_h[:, None] < H) & (offs_i[None, :] < HALF)
    p1 = QK + t * stride_t + offs_h[:, None] * D + offs_i[None, :]
    p2 = p1 + HALF
    x1 = tl.load(p1, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(p2, mask=mask, other=0.0).to(tl.float32)
    ty = QK.dtype.element_ty
    c1 = tl.load(Cos + t * stride_cs + offs_i, mask=offs_i < HALF, other=0.0).to(tl.float32)[None, :]
    c2 = tl.load(Cos + t * stride_cs + HALF + offs_i, mask=offs_i < HALF, other=0.0).to(tl.float32)[None, :]
    s1 = tl.load(Sin + t * stride_cs + offs_i, mask=offs_i < HALF, other=0.0).to(tl.float32)[None, :]
    s2 = tl.load(Sin + t * stride_cs + HALF + offs_i, mask=offs_i < HALF, other=0.0).to(tl.float32)[None, :]
    o1, o2 = _rotate_pairs(x1, x2, c1, c2, s1, s2, ty)
    tl.store(p1, o1.to(ty), mask=mask)
    tl.store(p2, o2.to(ty), mask=mask)


@triton.jit
def _rotate_pairs(x1, x2, c1, c2, s1, s2, ty: tl.constexpr):
    """RoPE of the pairs (x1, x2) (float32 values of dtype ty, dims i and i + D/2 of a head):
    x * cos + rotate_half(x) * sin, each product rounded to ty as the plain model's tensor ops round
    it. Returns float32 (o1, o2), for the caller to round to ty."""
    o1 = (x1 * c1).to(ty).to(tl.float32) + (-x2 * s1).to(ty).to(tl.float32)
    o2 = (x2 * c2).to(ty).to(tl.float32) + (x1 * s2).to(ty).to(tl.float32)
    return o1, o2


@triton.jit
def _rope_epilogue(y, y_u, Cos, Sin, i, rotated, HALF: tl.constexpr, ty: tl.constexpr):
    """A GEMV's RoPE epilogue: the float32 products y, y_u of dims i and i + HALF of their heads,
    rotated where ``rotated`` (x * cos + rotate_half(x) * sin, rounded as ``_rope_fwd`` rounds it),
    else as they are; float32 values of dtype ty."""
    x1 = y.to(ty).to(tl.float32)
    x2 = y_u.to(ty).to(tl.float32)
    c1 = tl.load(Cos + i).to(tl.float32)
    c2 = tl.load(Cos + HALF + i).to(tl.float32)
    s1 = tl.load(Sin + i).to(tl.float32)
    s2 = tl.load(Sin + HALF + i).to(tl.float32)
    o1, o2 = _rotate_pairs(x1, x2, c1, c2, s1, s2, ty)
    return tl.where(rotated, o1, x1), tl.where(rotated, o2, x2)


@triton.jit
def _silu_mul_fwd(GU, Out, stride_gu, stride_o, F_dim, BLOCK: tl.constexpr):
    # out = silu(gate) * up with gate = GU[:, :F], up = GU[:, F:]; rounded as the plain model does.
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < F_dim
    ty = Out.dtype.element_ty
    g = tl.load(GU + row * stride_gu + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(GU + row * stride_gu + F_dim + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(Out + row * stride_o + offs, _swiglu(g, u, ty).to(ty), mask=mask)


@triton.jit
def _swiglu(g, u, ty: tl.constexpr):
    """silu(g) * u in float32 for float32 g, u that hold values of dtype ty; silu(g) is rounded to
    ty first, as the plain model's tensor ops round it. The caller rounds the result to ty."""
    s = (g * tl.sigmoid(g)).to(ty).to(tl.float32)
    return s * u

# int8 weights to float32 in registers, four per 32-bit register (inline PTX; CUDA only): each
# byte ^ 0x80 placed by PRMT under the exponent of 2^23 is the float32 2^23 + (q + 128), and one
# subtraction leaves q, exactly. It replaces Triton's int8 -> float32 conversion (an I2F per
# element, a quarter of the FMA rate on Hopper), which bounds the GEMV below the memory bandwidth:
# 12-24% faster per matrix on the H200 (BENCHMARKS.md). float8_e4m3fn keeps Triton's conversion
# (cvt.f16x2.e4m3x2, two per instruction), which measured as fast as the hand-written variants.
_INT8_TO_F32 = tl.constexpr("""
{
.reg .b32 t;
xor.b32 t, $4, 0x80808080;
prmt.b32 $0, t, 0x4B000000, 0x7540;
prmt.b32 $1, t, 0x4B000000, 0x7541;
prmt.b32 $2, t, 0x4B000000, 0x7542;
prmt.b32 $3, t, 0x4B000000, 0x7543;
sub.f32 $0, $0, 0f4B000080;
sub.f32 $1, $1, 0f4B000080;
sub.f32 $2, $2, 0f4B000080;
sub.f32 $3, $3, 0f4B000080;
}
""")


# int8 weights to bfloat16 in registers, two per 32-bit register (inline PTX, sm_90), for a weight
# tile that is a tensor-core product's register operand (its layout loads the bytes in pairs): the
# pair's bytes b placed by PRMT under the high byte 0x43 are the bfloat16 values 128 + (b & 0x7f)
# once bit 7 of each byte is cleared, and 128 or 256 (bit 7 lands in the exponent) once the low
# seven are; their difference is the signed byte, exactly. Four instructions a pair. Triton's own
# conversion works on four bytes per register, so it unpacks and repacks the loaded pairs first:
# sm_90 SASS of the Gluon kernel at 512 rows, 1768 -> 1496 instructions (353 -> 129 PRMT); of
# this file's swapped product at 32 rows, qkv 1352 -> 1248. H200, 2026-12-03 (BENCHMARKS.md), us
# per matrix: at 512 rows (Gluon) qkv 45.7 -> 43.7, o 30.3 -> 27.8, down 98.7 -> 90.5 (gate/up
# 186 either way, as fp8); at 32 rows qkv 14.5 -> 12.4, down 25.2 -> 20.9; time to first token for
# 512 tokens 14.9 -> 14.5 ms, batch-32 decode steps +12%, batch 64 +10%.
INT8_PAIR_TO_BF16 = tl.constexpr("""
{
.reg .b32 w, m, s;
cvt.u32.u16 w, $1;
prmt.b32 w, w, 0x43, 0x4140;
and.b32 m, w, 0xff7fff7f;
and.b32 s, w, 0xff80ff80;
sub.rn.bf16x2 $0, m, s;
}
""")


@triton.jit
def _to_float32(w, INT8_PTX: tl.constexpr):
    """w (int8, float8_e4m3fn or a float type) as float32; INT8_PTX: w is int8, converted by PRMT."""
    if INT8_PTX:
        return tl.inline_asm_elementwise(_INT8_TO_F32, "=r,=r,=r,=r,r", [w], dtype=tl.float32,
                                         is_pure=True, pack=4)
    else:
        return w.to(tl.float32)


@triton.jit
def _accumulate(acc, w, x, ROW_ACC: tl.constexpr, INT8_PTX: tl.constexpr):
    """acc + w * x for a weight tile w (BLOCK_N, BLOCK_K) and x (BLOCK_K,) float32: elementwise into
    acc (BLOCK_N, BLOCK_K), or with ROW_ACC summed per row into acc (BLOCK_N, 1)."""
    products = _to_float32(w, INT8_PTX) * x[None, :]
    if ROW_ACC:
        return acc + tl.sum(products, 1)[:, None]
    else:
        return acc + products


@triton.jit
def _gemv_fwd(X, Add, H_out, W, Out, NormW, Scale, Cos, Sin, Sumsq, Res, Gain, Gained, SumsqNext,
              N, K, stride_wn, eps, n_rotated, sumsq_tiles,
              ADD: tl.constexpr, NORM: tl.constexpr, NORM_ROWS: tl.constexpr, BLOCK_T: tl.constexpr,
              SWIGLU: tl.constexpr, ROPE: tl.constexpr, HALF: tl.constexpr, SCALE: tl.constexpr,
              NORM_NEXT: tl.constexpr,
              BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr, ROW_ACC: tl.constexpr,
              INT8_PTX: tl.constexpr, DEPENDENT: tl.constexpr):
    """out[n] = sum_k W[n, k] x[k] for one row x (K,), BLOCK_N outputs per program.

    ADD: x is replaced by h = x + Add (rounded to x's dtype); program 0 writes h to H_out (the new
    residual stream). NORM: the input is RMSNorm(h) * NormW; the row scale rsqrt(mean(h^2) + eps)
    is applied after the dot product. SWIGLU: W holds [gate; up] (2N rows): out = silu(gate) * up.
    ROPE: the rows are heads of 2 * HALF rows; a program takes BLOCK_N rows of a head's first half
    and their partners HALF rows on, and rotates the pairs of the first ``n_rotated`` rows
    (rotate-half RoPE with Cos, Sin of 2 * HALF values, as ``_rope_fwd`` computes it on the
    rounded outputs). SCALE: W is 8-bit (int8 or float8_e4m3fn), converted to float32 in
    registers (int8 by PRMT with INT8_PTX); row n's dot product is multiplied by Scale[n] before
    the epilogue. ROW_ACC: reduce the products to one sum per row at every step (fewer registers,
    so more programs in flight) instead of once at the end.
    NORM_ROWS: x is h * the norm's gain, made by the launch before (NORM_NEXT, or the matmul's);
    the dot products are multiplied by h's rsqrt(mean(h^2) + eps), its sum of squares the sum of
    the sumsq_tiles values at Sumsq (BLOCK_T >= sumsq_tiles), after the scale. They are loaded
    before the weights stream and added after it: loaded after it, their L2 round trip ended each
    launch (H200, 2026-12-04, whole batch-1 steps at the same tilings: int8 392 -> 401 tok/s, fp8
    397 -> 411, the same bits).
    NORM_NEXT (without SWIGLU, ROPE): the next residual add + RMSNorm runs here, up to the 1 / rms
    that the next product applies (NORM_ROWS). Out receives h = out + Res (rounded to Out's dtype:
    the new residual stream), Gained h * Gain (rounded), SumsqNext[pid] the sum of the program's
    h^2, which the next product adds up. No kernel of its own, no prologue in the next GEMV, and
    no program waits for another (a last program to arrive, adding the sums or norming the whole
    row, cost 1.4-1.5 us more per launch of o or down: BENCHMARKS.md, 2026-12-04).
    DEPENDENT: launched as a programmatic dependent (PDL) of the kernel before it on the stream. The
    next kernel may launch at once (if it is one too, it waits in turn); this one waits for the
    previous grid to finish, its writes visible, before it reads or writes any memory.
    """
    if DEPENDENT:
        tl.extra.cuda.gdc_launch_dependents()
    pid = tl.program_id(0)
    if ROPE:  # head pid // (HALF // BLOCK_N), rows i0 .. i0 + BLOCK_N of its first half
        HALF_BLOCKS: tl.constexpr = HALF // BLOCK_N
        offs_i = (pid % HALF_BLOCKS) * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_n = (pid // HALF_BLOCKS) * (2 * HALF) + offs_i
        pair_offset = HALF  # the partner rows: out = rotate(first, second)
    else:
        offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        pair_offset = N  # SWIGLU's up rows
    PAIRED: tl.constexpr = SWIGLU or ROPE
    offs_k = tl.arange(0, BLOCK_K)
    n_mask = offs_n < N
    w_rows = W + offs_n.to(tl.int64)[:, None] * stride_wn
    ACC_K: tl.constexpr = 1 if ROW_ACC else BLOCK_K
    acc = tl.zeros([BLOCK_N, ACC_K], dtype=tl.float32)
    if PAIRED:
        u_rows = w_rows + pair_offset * stride_wn
        acc_u = tl.zeros([BLOCK_N, ACC_K], dtype=tl.float32)
    if NORM:
        sumsq = tl.zeros([BLOCK_K], dtype=tl.float32)
    if DEPENDENT:
        tl.extra.cuda.gdc_wait()
    if NORM_ROWS:  # h's pieces' sums of squares: loaded before the weights stream, added after it
        offs_t = tl.arange(0, BLOCK_T)
        pieces = tl.load(Sumsq + offs_t, mask=offs_t < sumsq_tiles, other=0.0)
    # -- stream the weight rows once; products accumulate elementwise or per row (ROW_ACC) --
    for k0 in tl.range(0, K, BLOCK_K):
        kk = k0 + offs_k
        k_mask = kk < K
        if EVEN_K:
            x = tl.load(X + kk)
            w = tl.load(w_rows + kk[None, :], mask=n_mask[:, None], other=0.0)
        else:
            x = tl.load(X + kk, mask=k_mask, other=0.0)
            w = tl.load(w_rows + kk[None, :], mask=n_mask[:, None] & k_mask[None, :], other=0.0)
        if ADD:
            if EVEN_K:
                a = tl.load(Add + kk)
            else:
                a = tl.load(Add + kk, mask=k_mask, other=0.0)
            x = (x.to(tl.float32) + a.to(tl.float32)).to(X.dtype.element_ty)
            if pid == 0:
                tl.store(H_out + kk, x, mask=k_mask)
        x = x.to(tl.float32)
        if NORM:
            sumsq += x * x
            if EVEN_K:
                x = x * tl.load(NormW + kk).to(tl.float32)
            else:
                x = x * tl.load(NormW + kk, mask=k_mask, other=0.0).to(tl.float32)
        acc = _accumulate(acc, w, x, ROW_ACC, INT8_PTX)
        if PAIRED:
            if EVEN_K:
                u = tl.load(u_rows + kk[None, :], mask=n_mask[:, None], other=0.0)
            else:
                u = tl.load(u_rows + kk[None, :], mask=n_mask[:, None] & k_mask[None, :], other=0.0)
            acc_u = _accumulate(acc_u, u, x, ROW_ACC, INT8_PTX)
    y = tl.sum(acc, 1)
    if SCALE:
        y = y * tl.load(Scale + offs_n, mask=n_mask, other=0.0)
    if NORM:
        r = _inverse_rms(tl.sum(sumsq, 0) / K, eps)
        y = y * r
    if NORM_ROWS:
        r = _inverse_rms(tl.sum(pieces, 0) / K, eps)  # in piece order
        y = y * r
    if PAIRED:
        y_u = tl.sum(acc_u, 1)
        if SCALE:
            y_u = y_u * tl.load(Scale + pair_offset + offs_n, mask=n_mask, other=0.0)
        if NORM or NORM_ROWS:
            y_u = y_u * r
    ty = Out.dtype.element_ty
    # -- epilogue --
    if SWIGLU:
        y = _swiglu(y.to(ty).to(tl.float32), y_u.to(ty).to(tl.float32), ty)
    if ROPE:
        y, y_u = _rope_epilogue(y, y_u, Cos, Sin, offs_i, offs_n < n_rotated, HALF, ty)
        tl.store(Out + pair_offset + offs_n, y_u.to(ty), mask=n_mask)
    if NORM_NEXT:  # h = out + residual, rounded as add_rms_norm rounds it; h * the next gain; sum h^2
        res = tl.load(Res + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        y = (y.to(ty).to(tl.float32) + res).to(ty).to(tl.float32)
        gain = tl.load(Gain + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        tl.store(Gained + offs_n, (y * gain).to(ty), mask=n_mask)
        tl.store(SumsqNext + pid, tl.sum(tl.where(n_mask, y * y, 0.0), 0))
    tl.store(Out + offs_n, y.to(ty), mask=n_mask)


@triton.jit
def _first_max(x, index, none):
    """(max, the first index where x holds it) over a vector: NaN counts as the largest value, as
    in torch's amax / argmax; ``none`` is an index past every valid one (masked lanes)."""
    nan = x != x
    any_nan = tl.max(nan.to(tl.int32), 0) > 0
    top = tl.max(tl.where(nan, float("-inf"), x), 0)
    first = tl.min(tl.where(tl.where(any_nan, nan, x == top), index, none), 0)
    return tl.where(any_nan, float("nan"), top), first


@triton.jit
def _max_argmax_fwd(X, Part_max, Part_index, Arrival, Max, Index, V, stride_x,
                    BLOCK: tl.constexpr, CHUNKS: tl.constexpr, BLOCK_CHUNKS: tl.constexpr, NON_FINITE: tl.constexpr):
    """One program per (chunk of BLOCK values, row): the chunk's max and its first index go to the
    row's partials; the row's last program to arrive on its int32 counter (zero before, zero again
    after) reduces the CHUNKS partials in chunk order, so ties keep the first index. NON_FINITE (an
    int, or None): the index written for a row whose max is NaN, +inf or -inf."""
    chunk = tl.program_id(0)
    row = tl.program_id(1)
    offs = chunk * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(X + row.to(tl.int64) * stride_x + offs, mask=offs < V, other=float("-inf")).to(tl.float32)
    top, first = _first_max(x, offs, V)
    tl.store(Part_max + row * CHUNKS + chunk, top)
    tl.store(Part_index + row * CHUNKS + chunk, first)
    tl.debug_barrier()  # the partials are written before the arrival is counted
    if tl.atomic_add(Arrival + row, 1, sem="acq_rel", scope="gpu") == CHUNKS - 1:
        parts = tl.arange(0, BLOCK_CHUNKS)
        valid = parts < CHUNKS
        tops = tl.load(Part_max + row * CHUNKS + parts, mask=valid, other=float("-inf"), cache_modifier=".cg")
        firsts = tl.load(Part_index + row * CHUNKS + parts, mask=valid, other=V, cache_modifier=".cg")
        top, first = _first_max(tops, firsts, V)
        if NON_FINITE is not None:
            first = tl.where((top == top) & (tl.abs(top) != float("inf")), first, NON_FINITE)
        tl.store(Max + row, top)
        tl.store(Index + row, first)
        tl.store(Arrival + row, 0)  # zero again for the next launch


@triton.jit
def _widen(w, ty: tl.constexpr, INT8_PAIRS: tl.constexpr = False):
    """An 8-bit weight tile as ``ty``, exactly. float8_e4m3fn goes through float16 (one cvt per two
    values, then an exact one to bfloat16): ~20% less time per 8-bit matmul at 16 rows on the H200
    than Triton's direct conversion (BENCHMARKS.md). INT8_PAIRS (int8 w, bfloat16 ty): by pairs in
    ``INT8_PAIR_TO_BF16``."""
    if w.dtype == tl.float8e4nv:
        return w.to(tl.float16).to(ty)
    if INT8_PAIRS:
        return tl.inline_asm_elementwise(INT8_PAIR_TO_BF16, "=r,h", [w], dtype=tl.bfloat16, is_pure=True, pack=2)
    return w.to(ty)


@triton.jit
def _norm_pieces(Sumsq, offs_m, m_mask, M, sumsq_tiles, BLOCK_T: tl.constexpr):
    """The sums of squares of h's pieces (BLOCK_T, rows offs_m) for a NORM product, zero past them."""
    offs_t = tl.arange(0, BLOCK_T)
    return tl.load(Sumsq + offs_t[:, None] * M + offs_m[None, :],
                   mask=(offs_t < sumsq_tiles)[:, None] & m_mask[None, :], other=0.0)


@triton.jit
def _rows_inverse_rms(pieces, K, eps, SWAP: tl.constexpr):
    """Each row's 1 / rms from its pieces' sums of squares (summed in piece order), shaped to
    multiply the accumulator: [1, rows] in the swapped form (acc[n, m]), else [rows, 1]."""
    inv_rms = _inverse_rms(tl.sum(pieces, 0) / K, eps)
    return inv_rms[None, :] if SWAP else inv_rms[:, None]


@triton.jit
def _matmul_tile(X, W, Scale, Out, Part, Arrivals, Cos, Sin, Res, Sumsq, Gain, Gained, M, N, K, K_split, stride_xm,
                 stride_wn, stride_om, stride_cs, n_rotated, stride_rm, sumsq_tiles, eps, pid_m, pid_n, pid_k,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
                 SPLIT_K: tl.constexpr, W_TMA: tl.constexpr, SWAP: tl.constexpr, SCALE: tl.constexpr,
                 SWIGLU: tl.constexpr, ROPE: tl.constexpr, HALF: tl.constexpr, NORM: tl.constexpr,
                 NORM_NEXT: tl.constexpr, BLOCK_T: tl.constexpr, UPCAST: tl.constexpr, INT8_PAIRS: tl.constexpr):
    """One output tile (pid_m, pid_n) over K split pid_k of ``_matmul_fwd``. UPCAST: x is
    bfloat16 under Triton's interpreter, which keeps bfloat16 as raw uint16 bits (its int8 ->
    bfloat16 cast and its bfloat16 tl.dot work on those bits): multiply in float32 there."""
    if ROPE:  # head pid_n // (HALF // BLOCK_N), rows i0 .. i0 + BLOCK_N of its first half
        HALF_BLOCKS: tl.constexpr = HALF // BLOCK_N
        i0 = (pid_n % HALF_BLOCKS) * BLOCK_N
        n0 = (pid_n // HALF_BLOCKS) * (2 * HALF) + i0
        pair = HALF  # the partner rows: out = rotate(first, second)
    else:
        n0 = pid_n * BLOCK_N
        pair = N  # SWIGLU's up rows
    PAIRED: tl.constexpr = SWIGLU or ROPE
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_mask = offs_m < M
    n_mask = offs_n < N
    x_rows = offs_m.to(tl.int64)[:, None] * stride_xm
    w_cols = offs_n.to(tl.int64)[None, :] * stride_wn  # a W^T tile (BLOCK_K, BLOCK_N)
    u_cols = w_cols + pair * stride_wn
    acc = tl.zeros([BLOCK_N, BLOCK_M] if SWAP else [BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc_u = tl.zeros([BLOCK_N, BLOCK_M] if SWAP else [BLOCK_M, BLOCK_N], dtype=tl.float32)
    ty = Out.dtype.element_ty
    # NORM: each row's dot products times its 1 / rms. In swapped tiles with K split, each split scales
    # its partial (the sum of the partials needs no norm after it): with the norm in the last split's
    # epilogue, Triton 3.6's code gave wrong sums for part of 64-row tiles (int8 qkv at 40-64 rows on
    # the H200: other bits call to call, twice the error; 2026-12-04). Elsewhere the epilogue applies
    # it once (in each split, the 2-16-row products took 0.3-1.0 us more: BENCHMARKS.md).
    NORM_EACH_SPLIT: tl.constexpr = NORM and SWAP and SPLIT_K > 1
    if NORM_EACH_SPLIT:  # loaded before the weights stream, added after it
        pieces = _norm_pieces(Sumsq, offs_m, m_mask, M, sumsq_tiles, BLOCK_T)
    k_lo = pid_k * K_split
    for k0 in tl.range(k_lo, tl.minimum(k_lo + K_split, K), BLOCK_K):
        kk = k0 + offs_k
        if SWAP:
            x = X.load([pid_m * BLOCK_M, k0])
            if UPCAST:
                x = x.to(tl.float32)
            w = W.load([n0, k0])
            acc = tl.dot(_widen(w, x.dtype, INT8_PAIRS), tl.trans(x), acc)
            if PAIRED:
                u = W.load([n0 + pair, k0])
                acc_u = tl.dot(_widen(u, x.dtype, INT8_PAIRS), tl.trans(x), acc_u)
        else:
            if EVEN_K:
                x = tl.load(X + x_rows + kk[None, :], mask=m_mask[:, None], other=0.0)
            else:
                x = tl.load(X + x_rows + kk[None, :], mask=m_mask[:, None] & (kk < K)[None, :], other=0.0)
            if UPCAST:
                x = x.to(tl.float32)
            if W_TMA:
                w = tl.trans(W.load([n0, k0]))
            elif EVEN_K:
                w = tl.load(W + w_cols + kk[:, None], mask=n_mask[None, :], other=0.0)
            else:
                w = tl.load(W + w_cols + kk[:, None], mask=n_mask[None, :] & (kk < K)[:, None], other=0.0)
            acc = tl.dot(x, _widen(w, x.dtype), acc)
            if PAIRED:
                if W_TMA:
                    u = tl.trans(W.load([n0 + pair, k0]))
                elif EVEN_K:
                    u = tl.load(W + u_cols + kk[:, None], mask=n_mask[None, :], other=0.0)
                else:
                    u = tl.load(W + u_cols + kk[:, None], mask=n_mask[None, :] & (kk < K)[:, None], other=0.0)
                acc_u = tl.dot(x, _widen(u, x.dtype), acc_u)
    if SWAP:  # acc[n, m]
        rows = offs_m.to(tl.int64)[None, :]
        cols = offs_n[:, None]
    else:  # acc[m, n]
        rows = offs_m.to(tl.int64)[:, None]
        cols = offs_n[None, :]
    mask = (rows < M) & (cols < N)
    if NORM_EACH_SPLIT:
        inv_rms = _rows_inverse_rms(pieces, K, eps, SWAP)
        acc = acc * inv_rms
        if PAIRED:
            acc_u = acc_u * inv_rms
    y = acc
    y_u = acc_u
    if SPLIT_K > 1:  # -- the tile's last split to arrive sums the partials, in split order --
        N_W: tl.constexpr = 2 if SWIGLU else 1  # Part's rows are the weight's: N, or 2N for [gate; up]
        part = Part + (pid_k * M + rows) * (N_W * N) + cols
        tl.store(part, acc, mask=mask)
        if PAIRED:
            tl.store(part + pair, acc_u, mask=mask)
        tl.debug_barrier()  # every thread's partial is written before the arrival is counted
        arrival = Arrivals + pid_m * tl.cdiv(N, BLOCK_N) + pid_n
        last = tl.atomic_add(arrival, 1, sem="acq_rel", scope="gpu") == SPLIT_K - 1
        if last:
            y = tl.zeros([BLOCK_N, BLOCK_M] if SWAP else [BLOCK_M, BLOCK_N], dtype=tl.float32)
            y_u = tl.zeros([BLOCK_N, BLOCK_M] if SWAP else [BLOCK_M, BLOCK_N], dtype=tl.float32)
            for s in tl.static_range(SPLIT_K):
                part = Part + (s * M + rows) * (N_W * N) + cols
                y += tl.load(part, mask=mask, other=0.0, cache_modifier=".cg")
                if PAIRED:
                    y_u += tl.load(part + pair, mask=mask, other=0.0, cache_modifier=".cg")
            tl.store(arrival, 0)  # zero again for the next product
    else:
        last = True
    if last:  # -- epilogue: the per-column scale, the rows' 1 / rms, SwiGLU, RoPE or the residual add --
        if SCALE:
            y = y * tl.load(Scale + cols, mask=cols < N, other=0.0)
        if PAIRED and SCALE:
            y_u = y_u * tl.load(Scale + pair + cols, mask=cols < N, other=0.0)
        if NORM and not NORM_EACH_SPLIT:
            inv_rms = _rows_inverse_rms(_norm_pieces(Sumsq, offs_m, m_mask, M, sumsq_tiles, BLOCK_T), K, eps, SWAP)
            y = y * inv_rms
            if PAIRED:
                y_u = y_u * inv_rms
        if NORM_NEXT:  # out = h = product + residual, rounded as add_rms_norm rounds; h * the next gain;
            # the sums of h's rows' squares
            r = tl.load(Res + rows * stride_rm + cols, mask=mask, other=0.0).to(tl.float32)
            y = (y.to(ty).to(tl.float32) + r).to(ty).to(tl.float32)
            gain = tl.load(Gain + cols, mask=cols < N, other=0.0).to(tl.float32)
            tl.store(Gained + rows * stride_om + cols, (y * gain).to(ty), mask=mask)
            tl.store(Sumsq + pid_n * M + offs_m, tl.sum(tl.where(mask, y * y, 0.0), 0 if SWAP else 1), mask=m_mask)
        if SWIGLU:
            y = _swiglu(y.to(ty).to(tl.float32), y_u.to(ty).to(tl.float32), ty)
        if ROPE:  # cos / sin of each token row m, dims i and i + HALF
            x1 = y.to(ty).to(tl.float32)
            x2 = y_u.to(ty).to(tl.float32)
            dims = cols - n0 + i0
            cs = rows * stride_cs + dims
            c1 = tl.load(Cos + cs, mask=rows < M, other=0.0).to(tl.float32)
            c2 = tl.load(Cos + cs + HALF, mask=rows < M, other=0.0).to(tl.float32)
            s1 = tl.load(Sin + cs, mask=rows < M, other=0.0).to(tl.float32)
            s2 = tl.load(Sin + cs + HALF, mask=rows < M, other=0.0).to(tl.float32)
            o1, o2 = _rotate_pairs(x1, x2, c1, c2, s1, s2, ty)
            rotated = cols < n_rotated
            y = tl.where(rotated, o1, x1)
            tl.store(Out + rows * stride_om + cols + pair, tl.where(rotated, o2, x2).to(ty), mask=mask)
        tl.store(Out + rows * stride_om + cols, y.to(ty), mask=mask)


@triton.jit
def _matmul_fwd(X, W, Scale, Out, Part, Arrivals, Cos, Sin, Res, Sumsq, Gain, Gained, M, N, K, K_split, stride_xm,
                stride_wn, stride_om, stride_cs, n_rotated, stride_rm, sumsq_tiles, eps,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
                SPLIT_K: tl.constexpr, W_TMA: tl.constexpr, SWAP: tl.constexpr, PERSISTENT: tl.constexpr,
                SCALE: tl.constexpr, SWIGLU: tl.constexpr, ROPE: tl.constexpr, HALF: tl.constexpr,
                NORM: tl.constexpr, NORM_NEXT: tl.constexpr, BLOCK_T: tl.constexpr, UPCAST: tl.constexpr,
                INT8_PAIRS: tl.constexpr):
    """out (M, N) = x (M, K) @ W (N, K)^T with float32 accumulation, for a few rows of x (batched
    decode, short prefill chunks).

    SCALE: W is 8-bit (int8 / float8_e4m3fn) with a per-row scale: out = x @ (W * Scale[:, None])^T.
    Its tiles are converted to x's dtype in registers (exact: int8 and e4m3 values fit bfloat16)
    and the scale multiplies the accumulator once. Otherwise W has x's dtype. SWIGLU: W holds
    [gate; up] (2N rows) and out = silu(gate) * up, as :func:`silu_mul` of the (M, 2N) product
    (a program loads both rows blocks and keeps two accumulators). ROPE: the rows are heads of
    2 * HALF rows; a program takes BLOCK_N rows of a head's first half and their partners HALF rows
    on, and rotates the pairs of the first ``n_rotated`` rows with token row m's Cos[m], Sin[m]
    (2 * HALF values each, rows stride_cs apart), as :func:`rope_` of the product would.
    W_TMA: W is a TensorDescriptor of (BLOCK_N, BLOCK_K) tiles, loaded by the TMA unit (zero past
    N and K) instead of per-thread addresses. SWAP (with W_TMA): X is a descriptor of (BLOCK_M,
    BLOCK_K) tiles too and the program computes out^T's tile, W @ x^T, so the weight tile is the
    dot's first operand (Hopper's wgmma takes it from registers) and x^T the second.
    INT8_PAIRS (SWAP, int8 W, bfloat16 x, BLOCK_N <= 16 * num_warps): W's tiles are converted by
    pairs in ``INT8_PAIR_TO_BF16``, as the register operand's layout loads them.
    SPLIT_K > 1: the tile (m, n, s) takes K columns [s * K_split, (s + 1) * K_split) and writes its
    float32 partial sums to Part, a (SPLIT_K, M, rows of W) workspace (the partner rows' too, with
    SWIGLU or ROPE); then counts its arrival in Arrivals[tile] (int32, zero before the launch). The
    split that arrives last reads the tile's partials in split order (so the sum is the same
    whichever arrives last), runs the epilogue on the whole sums and sets the counter back to zero:
    no second launch to reduce the splits.
    NORM: x holds rows h * gain (each value rounded to x's dtype) of the residual stream h, and the
    product is of RMSNorm(h) * gain with ``eps``: Sumsq (sumsq_tiles, M) float32 holds the sums of
    squares of pieces of h's rows (as a product with NORM_NEXT wrote them); the epilogue (in swapped
    tiles with K split, each split, on its partial) sums a row's pieces in order for its 1 / rms and
    multiplies the row's dot products by it (as the GEMV applies its prologue's norm), so x's tiles
    go to the dot as they are loaded. NORM_NEXT (no SwiGLU, RoPE): out = h = product + Res (M, N),
    rounded as ``add_rms_norm`` rounds h; Gained (M, N, out's strides) = h * Gain (N,), rounded;
    tile n's sums of squares of its rows' values go to Sumsq[n]: the residual add before a norm, and
    the input and sums the next product's NORM reads.
    PERSISTENT: a 1-D grid of programs (one per SM) walks the tiles, m fastest (the tiles that share
    a weight tile run together); otherwise program (m, n, s) computes tile (m, n, s).
    """
    if PERSISTENT:
        num_m = tl.cdiv(M, BLOCK_M)
        num_mn = num_m * tl.cdiv(N, BLOCK_N)
        for tile in tl.range(tl.program_id(0), num_mn * SPLIT_K, tl.num_programs(0)):
            _matmul_tile(X, W, Scale, Out, Part, Arrivals, Cos, Sin, Res, Sumsq, Gain, Gained, M, N, K, K_split,
                         stride_xm, stride_wn, stride_om, stride_cs, n_rotated, stride_rm, sumsq_tiles, eps,
                         tile % num_m, (tile % num_mn) // num_m, tile // num_mn,
                         BLOCK_M, BLOCK_N, BLOCK_K, EVEN_K, SPLIT_K, W_TMA, SWAP, SCALE, SWIGLU, ROPE, HALF,
                         NORM, NORM_NEXT, BLOCK_T, UPCAST, INT8_PAIRS)
    else:
        _matmul_tile(X, W, Scale, Out, Part, Arrivals, Cos, Sin, Res, Sumsq, Gain, Gained, M, N, K, K_split, stride_xm,
                     stride_wn, stride_om, stride_cs, n_rotated, stride_rm, sumsq_tiles, eps,
                     tl.program_id(0), tl.program_id(1), tl.program_id(2),
                     BLOCK_M, BLOCK_N, BLOCK_K, EVEN_K, SPLIT_K, W_TMA, SWAP, SCALE, SWIGLU, ROPE, HALF,
                     NORM, NORM_NEXT, BLOCK_T, UPCAST, INT8_PAIRS)


@triton.jit
def _dequantize_fwd(W, Scale, Out, N, K, stride_wn, stride_on, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """out = W * Scale[:, None] in float32, rounded once to Out's dtype: a (BLOCK_N, BLOCK_K) tile
    per program (``minillama.quantization.dequantize``, bit for bit)."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    mask = (offs_n < N)[:, None] & (offs_k < K)[None, :]
    w = tl.load(W + offs_n.to(tl.int64)[:, None] * stride_wn + offs_k[None, :], mask=mask, other=0.0)
    y = w.to(tl.float32) * tl.load(Scale + offs_n, mask=offs_n < N, other=0.0)[:, None]
    tl.store(Out + offs_n.to(tl.int64)[:, None] * stride_on + offs_k[None, :], y.to(Out.dtype.element_ty), mask=mask)


# Candidate GEMV tilings (BLOCK_N, BLOCK_K, num_warps, ROW_ACC). On CUDA each matrix kind (qkv, o, gate/up,
# down, head) takes the fastest, timed once at the first single-token step in a CUDA graph over
# every layer's matrix (so the weights stream from HBM, not L2, and launch gaps are the graph's).
# The last eight were added after sweeps of 31 more (H200, 2026-12-02, Llama-3.1-8B, us per layer):
# qkv in (2, 512, 2) for every format (bf16 17.4 -> 16.2, fp8 12.4 -> 12.0), gate/up in short K
# steps summed per row (fp8 (8, 256, 4) 34.9 -> 32.5, int8 (8, 256, 2) 36.8 -> 33.6, bf16
# (16, 256, 4) 59.0 -> 56.2), bf16 o and down in (16, 1024, 8) (10.9 -> 10.5, 29.7 -> 29.1):
# batch-1 decode bf16 235.9 -> 244.4 tok/s, int8 346.2 -> 357.8, fp8 357.9 -> 370.9 (BENCHMARKS.md).
GEMV_CONFIGS = [(4, 1024, 4, False), (8, 512, 4, False), (2, 2048, 4, False), (4, 2048, 8, False),
                (8, 1024, 8, False), (16, 256, 4, False), (8, 512, 4, True), (16, 512, 4, True),
                (4, 512, 2, False), (2, 1024, 2, False), (16, 1024, 8, False), (16, 256, 4, True),
                (8, 256, 4, True), (8, 256, 2, True), (4, 512, 2, True), (2, 512, 2, False)]
INTERPRET_GEMV = (1024, 64, 4, False)  # few, large programs and loop steps: the interpreter pays per step


class TensorCoreTiling(NamedTuple):
    """A tiling of ``minillama.tensor_core_gemv``'s kernel (8-bit weights on the tensor cores), which
    :func:`gemv` runs for a ``config`` of this type. tiles: mma tiles per warp (each 2 weight rows);
    block_k: K values of a slice per loop step; num_warps; interleaved: the 8 slices of K are
    consecutive block_k chunks of each 8 * block_k step (else K / 8 consecutive values each)."""
    tiles: int
    block_k: int
    num_warps: int
    interleaved: bool


# The candidates ``Runner.tune_gemv`` times for 8-bit weights beside ``GEMV_CONFIGS``. H200,
# 2026-12-04, Llama-3.1-8B's matrices alone: K in 8 slices of K / 8, (2, 256, 1) led qkv, o and
# gate/up in fp8 and qkv in int8, (1, 256, 1) and (1, 128, 1-2) the rest; 4 tiles or 4 warps a
# program, 64- and 512-wide steps and loads issued a step ahead were never faster. In the tuner's
# chains of whole layers the interleaved slices led qkv and gate/up (BENCHMARKS.md).
TENSOR_CORE_GEMV_TILINGS = [
    TensorCoreTiling(2, 256, 1, False), TensorCoreTiling(1, 256, 1, False), TensorCoreTiling(1, 128, 1, False),
    TensorCoreTiling(1, 128, 2, False), TensorCoreTiling(2, 256, 1, True), TensorCoreTiling(1, 256, 1, True),
    TensorCoreTiling(1, 128, 1, True)]


def time_in_graph(fn, reps: int = 3) -> float:
    """Milliseconds of one replay of a CUDA graph of ``fn`` (fastest of ``reps``)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()  # compile / pick kernels outside the graph
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    graph.replay()
    best = float("inf")
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end))
    return best


_LAUNCHES: dict = {}
_MAX_LAUNCHES = 4096  # bounded: a process that meets more layouts starts over


def _launch(kernel, grid: tuple, tensors: tuple, scalars: tuple, num_warps: int, **constexprs) -> None:
    """``kernel[grid](*tensors, *scalars, **constexprs, num_warps=num_warps)``, launched through a
    ``flashcore.launch.Launch`` kept per specialization: the tensors' dtypes and 16-byte alignment,
    the scalars' values, the constexprs and the device (what Triton specializes a launch on). A call
    of a known specialization skips Triton's binding of every argument (15-40 us of host time per
    launch on the H200's host): it counts in eager prefills, a few launches per layer. grid: 1-3
    integers."""
    key = (kernel, tensors[0].device, num_warps, scalars, *constexprs.items(), *(t.dtype for t in tensors),
           *(t.data_ptr() % 16 == 0 for t in tensors))
    launch = _LAUNCHES.get(key)
    if launch is None:
        if len(_LAUNCHES) >= _MAX_LAUNCHES:
            _LAUNCHES.clear()
        launch = _LAUNCHES[key] = Launch(kernel, num_warps=num_warps, **constexprs)
    launch((*grid, 1, 1)[:3], *tensors, *scalars)


def _unit_stride_rows(t: torch.Tensor) -> torch.Tensor:
    """t itself where its last dimension is contiguous (the elementwise kernels read a row's values
    at consecutive addresses), else a contiguous copy."""
    return t if t.stride(-1) == 1 else t.contiguous()


def add_rms_norm(x: torch.Tensor, residual: Optional[torch.Tensor], weight: torch.Tensor, eps: float,
                 h_out: Optional[torch.Tensor] = None, launch_dependents: Optional[bool] = None):
    """(normed, h) for rows of x (..., N): h = x + residual (x itself when residual is None),
    written into ``h_out`` when given (a contiguous tensor of x's shape).

    launch_dependents: let the next kernel launch at once where it is a programmatic dependent (the
    GEMV after a norm that the tuner left in a launch of its own); default on Hopper or later,
    compiled. Whole batch-1 decode steps at cache 512 (H200, 2026-12-03, interleaved, logits the same
    bits): with tilings tuned without it, fp8 390.3 -> 391.0 tok/s, int8 374.2 -> 376.2; with
    tilings tuned with it (the tuner then leaves more norms in a launch of their own), fp8 382.1 ->
    389.0 at cache 512 and 344.3 -> 350.0 at 8192. Batch 16 unchanged (its matmuls are plain launches)."""
    N = x.shape[-1]
    x2 = _unit_stride_rows(x.reshape(-1, N))
    weight = _unit_stride_rows(weight)
    normed = torch.empty_like(x2)
    if residual is None:
        h = x2
    else:
        h = h_out.view(x2.shape) if h_out is not None else torch.empty_like(x2)
    r = _unit_stride_rows(residual.reshape(-1, N)) if residual is not None else x2
    _launch(_add_rmsnorm_fwd, (x2.shape[0],), (x2, r, h, normed, weight),
            (x2.stride(0), r.stride(0), h.stride(0), normed.stride(0), N, eps), num_warps=8 if N >= 2048 else 4,
            ADD=residual is not None, BLOCK=triton.next_power_of_2(N),
            LAUNCH_DEPENDENTS=dependent_launch_supported(x.device) if launch_dependents is None else launch_dependents)
    return normed.view(x.shape), h.view(x.shape)


def rope_cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype):
    """RoPE's cos, sin (T, D) in ``dtype`` for integer positions (T,) and inv_freq (D/2,) (float32 in
    a loaded model; widened to float32 where a cast model holds it in its dtype), in one launch: the
    values of ``minillama.backend.rope_cos_sin``'s float32 ops (ten small kernels in torch, ~13 us
    of a batch-1 decode step on the H200, 2026-12-03)."""
    assert positions.dim() == 1 and not positions.dtype.is_floating_point and inv_freq.dtype.is_floating_point
    T, half = positions.shape[0], inv_freq.shape[0]
    # the interpreter rounds float32 to bfloat16 by truncation: there torch rounds the float32 tables
    rounded_here = not (INTERPRET and dtype == torch.bfloat16)
    tables = torch.empty((2, T, 2 * half), dtype=dtype if rounded_here else torch.float32, device=positions.device)
    block_t = 16
    _launch(_rope_cos_sin_fwd, (triton.cdiv(T, block_t),), (positions.contiguous(), inv_freq.contiguous(),
                                                            tables[0], tables[1]),
            (T,), num_warps=4, HALF=half, BLOCK_T=block_t, BLOCK_HALF=triton.next_power_of_2(half),
            LIBDEVICE=not INTERPRET)
    if not rounded_here:
        tables = tables.to(dtype)
    return tables[0], tables[1]


def rope_(qk: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, n_heads: int, head_dim: int) -> None:
    """Rotate the first ``n_heads`` heads of each row of qk (T, >= n_heads * D) in place.

    cos, sin: (T, D), as ``rope_cos_sin`` returns them (flattened over batch and sequence).
    """
    T = qk.shape[0]
    assert qk.stride(-1) == 1 and cos.stride(-1) == 1 and cos.stride(0) == sin.stride(0)
    _launch(_rope_fwd, (T,), (qk, cos, sin), (qk.stride(0), cos.stride(0), n_heads), num_warps=4, D=head_dim,
            BLOCK_H=triton.next_power_of_2(n_heads), BLOCK_HALF=triton.next_power_of_2(head_dim // 2))


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for gate_up (T, 2F) = [gate | up] -> (T, F)."""
    gate_up = _unit_stride_rows(gate_up)
    T, two_f = gate_up.shape
    F_dim = two_f // 2
    out = torch.empty((T, F_dim), dtype=gate_up.dtype, device=gate_up.device)
    BLOCK = 1024
    _launch(_silu_mul_fwd, (T, triton.cdiv(F_dim, BLOCK)), (gate_up, out), (gate_up.stride(0), out.stride(0), F_dim),
            num_warps=4, BLOCK=BLOCK)
    return out


def gemv_dependent_launch(device: torch.device) -> bool:
    """Whether :func:`gemv` launches as a programmatic dependent by default: on Hopper or later,
    compiled (not interpreted). Whole batch-1 decode steps, interleaved (H200, 2026-12-03): fp8
    383.1 -> 388.3 tok/s and bf16 246.9 -> 250.4 with the same tilings; int8 368.3 -> 369.6 with
    each launch kind's own tuned tilings (with the plain launches' tilings int8 was slower, 359-364;
    ``Runner.tune_gemv`` times the launches it will make). Launching every kernel of a step
    this way (attention, norms, matmuls too) was slower (BENCHMARKS.md, 2026-12-01)."""
    return dependent_launch_supported(device)


def gemv(x: torch.Tensor, weight: torch.Tensor, *, add: Optional[torch.Tensor] = None,
         h_out: Optional[torch.Tensor] = None, norm_weight: Optional[torch.Tensor] = None,
         eps: float = 0.0, norm=None, swiglu: bool = False, rope=None, config=None,
         scale: Optional[torch.Tensor] = None, norm_next=None, dependent: Optional[bool] = None):
    """One row x (K,) times weight (N_w, K)^T, with the optional fusions of ``_gemv_fwd``.

    add, h_out: h = x + add is the input (and is written to h_out); norm_weight, eps: the input is
    RMSNorm(h) * norm_weight. norm: (sumsq (pieces, 1) float32, eps): x is h * the norm's gain,
    and the output is multiplied by h's 1 / rms, from its pieces' sums of squares (what norm_next,
    or :func:`matmul`'s, returns). rope: (cos, sin, n_heads, head_dim) rotates the first n_heads
    heads of the output as :func:`rope_` would (cos, sin: (1, head_dim) or (head_dim,)). config:
    (BLOCK_N, BLOCK_K, num_warps, ROW_ACC); default the first of ``GEMV_CONFIGS`` (with rope,
    BLOCK_N is halved until it divides head_dim / 2); or a :class:`TensorCoreTiling` for an 8-bit
    weight without add, norm_weight or norm_next (``minillama.tensor_core_gemv``). scale: (N_w,)
    float32 per-row scales of an 8-bit weight (int8 or float8_e4m3fn), or None. Returns (N,) with
    N = N_w, or N_w / 2 with ``swiglu``. norm_next: (residual (N,), gain (N,)): the residual add
    and the RMSNorm that follow run in this launch, but for the 1 / rms, which the next product
    applies: returns (h, gained, sumsq) with h = out + residual, gained = h * gain (both rounded
    to x's dtype) and sumsq (programs, 1) float32, the sums of squares of the programs' pieces of
    h: the next GEMV's (or matmul's) ``norm`` input, as :func:`matmul`'s norm_next.
    dependent: launch as a programmatic dependent of the previous kernel (``_gemv_fwd``'s DEPENDENT);
    default :func:`gemv_dependent_launch`'s choice.
    """
    K = x.shape[-1]
    N = weight.shape[0] // 2 if swiglu else weight.shape[0]
    assert x.is_contiguous() and weight.stride(1) == 1 and weight.shape[1] == K
    assert (add is None) == (h_out is None) and not (swiglu and rope is not None)
    assert (scale is not None) == (weight.dtype in (torch.int8, torch.float8_e4m3fn)), (weight.dtype, scale is None)
    assert scale is None or (scale.dtype == torch.float32 and scale.shape == (weight.shape[0],) and scale.is_contiguous())
    assert h_out is None or h_out.is_contiguous()  # written in place, at consecutive addresses
    # the kernel reads these vectors at consecutive addresses: a strided view is copied (no-op otherwise)
    add = add.contiguous() if add is not None else None
    norm_weight = norm_weight.contiguous() if norm_weight is not None else None
    if dependent is None:
        dependent = gemv_dependent_launch(x.device)
    if INTERPRET:
        config = INTERPRET_GEMV
    half, n_rotated, cos, sin = 1, 0, x, x
    if rope is not None:
        cos, sin, n_heads, head_dim = rope
        half, n_rotated = head_dim // 2, n_heads * head_dim
        cos, sin = cos.reshape(-1).contiguous(), sin.reshape(-1).contiguous()
        assert head_dim % 2 == 0 and N % head_dim == 0 and n_rotated <= N and cos.shape == sin.shape == (head_dim,)
    sumsq, sumsq_tiles = x, 0
    if norm is not None:
        sumsq, eps = norm
        sumsq_tiles = sumsq.shape[0]
        assert norm_weight is None and sumsq.dtype == torch.float32 and sumsq.shape == (sumsq_tiles, 1), sumsq.shape
        sumsq = sumsq.contiguous()
    if isinstance(config, TensorCoreTiling):
        assert add is None and norm_weight is None and norm_next is None, "the tensor-core GEMV runs no norm"
        rotary = (cos, sin, half, n_rotated) if rope is not None else None
        return _tensor_core_gemv().gemv(x, weight, scale, config, swiglu=swiglu, rotary=rotary,
                                        norm=None if norm is None else (sumsq, eps), dependent=dependent)
    out = torch.empty(N, dtype=x.dtype, device=x.device)
    block_n, block_k, num_warps, row_acc = config or GEMV_CONFIGS[0]
    if rope is not None:
        while half % block_n:
            block_n //= 2
    grid = N // (2 * block_n) if rope is not None else triton.cdiv(N, block_n)
    res, gain, gained, sumsq_next = x, x, x, x
    if norm_next is not None:
        res, gain = norm_next
        assert not swiglu and rope is None and res.shape == gain.shape == (N,)
        res, gain = res.contiguous(), gain.contiguous()
        gained = torch.empty_like(out)
        sumsq_next = torch.empty((grid, 1), dtype=torch.float32, device=x.device)
    _gemv_fwd[(grid,)](
        x, add if add is not None else x, h_out if h_out is not None else x, weight, out,
        norm_weight if norm_weight is not None else x, scale if scale is not None else x, cos, sin,
        sumsq, res, gain, gained, sumsq_next,
        N, K, weight.stride(0), eps, n_rotated, sumsq_tiles,
        ADD=add is not None, NORM=norm_weight is not None, NORM_ROWS=norm is not None,
        BLOCK_T=triton.next_power_of_2(max(sumsq_tiles, 1)), SWIGLU=swiglu, ROPE=rope is not None, HALF=half,
        SCALE=scale is not None, NORM_NEXT=norm_next is not None,
        BLOCK_N=block_n, BLOCK_K=block_k, EVEN_K=K % block_k == 0, ROW_ACC=row_acc,
        INT8_PTX=weight.dtype == torch.int8 and not INTERPRET, num_warps=num_warps,
        DEPENDENT=dependent, launch_pdl=dependent,
    )
    return out if norm_next is None else (out, gained, sumsq_next)


INTERPRET_MATMUL = (16, 64, 64, 4, 1, 1, "pointers")
# Rows up to which :func:`matmul` fuses RoPE (``FUSED_EPILOGUE_ROWS``) or SiLU x up
# (``FUSED_SWIGLU_ROWS``) into its epilogue (``matmul_config``'s tilings for them); more rows run
# ``rope_`` or ``silu_mul`` after it. At 17-64 rows SiLU x up fused costs the same time as the
# product alone and saves ``silu_mul``'s launch (H200, 2026-12-02, Llama-3.1-8B's gate/up, us at
# 64 / 32 rows, product + ``silu_mul`` -> fused: int8 54.7 / 46.4 -> 54.8 / 46.4, fp8 44.3 / 38.1 ->
# 44.3 / 38.1; bf16 at 64 rows 63.4 -> 60.7).
FUSED_EPILOGUE_ROWS = 16
FUSED_SWIGLU_ROWS = 64


def fused_epilogue_rows(swiglu: bool) -> int:
    """Rows up to which :func:`matmul` runs SiLU x up (``swiglu``) or else RoPE in its epilogue."""
    return FUSED_SWIGLU_ROWS if swiglu else FUSED_EPILOGUE_ROWS


MATMUL_LOADS = ("pointers", "tma", "tma_swapped", "tma_swapped_persistent")


def matmul_config(M: int, N: int, K: int, weight_dtype: torch.dtype = torch.int8, swiglu: bool = False,
                  rope: bool = False) -> tuple:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages, SPLIT_K, loads) of :func:`matmul` for an
    (M, K) x (N, K)^T product; loads is one of ``MATMUL_LOADS`` (see ``_matmul_fwd``; the TMA
    forms need a Hopper GPU: :func:`matmul` falls back to "pointers" elsewhere).

    swiglu: SiLU x up fused (M <= ``FUSED_SWIGLU_ROWS``): two weight tiles per step, K not split;
    at 17-64 rows in gate/up's tiles whatever the shape. Llama-3.1-8B's gate/up at 16 rows, us per
    layer, matmul + ``silu_mul`` -> fused in these tilings: bf16 58.7 -> 57.0, int8 35.0 -> 33.4, fp8
    34.4 -> 32.8. rope: RoPE fused, a program taking blocks of a head's two halves (BLOCK_N divides
    head_dim / 2; the caller halves it further for smaller heads). Llama-3.1-8B's qkv at 4 / 16
    rows, us, matmul + ``rope_`` -> fused: bf16 16.9 / 16.7 -> 16.4 / 16.6 (K whole); 8-bit with the
    plain product's K split in 4 (the last split sums both halves' partials, then rotates): fp8
    12.2 / 13.0 -> 11.0 / 11.2, int8 12.7 / 13.1 -> 11.1 / 11.3 (K whole: 15.3-15.7; splits of 2 or
    8, 256-deep or TMA tiles: 11.3-14.2).

    Weights of the model's dtype (the backend runs them here at M <= ``MODEL_DTYPE_ROWS``, gate/up
    and down up to ``MODEL_DTYPE_LARGE_ROWS``, else cuBLAS): the swapped form, us per matrix at 16
    rows (one CUDA graph over 32 layers' copies) against cuBLAS: qkv 15.0 vs 15.3, o 11.3 vs 13.3,
    gate/up 57.4 vs 57.3, down 31.7 vs 32.9 (K split in 4). At 17-64 rows, tiles of 32 rows up to
    32, else 64 (a 64-row tile of 17-32 rows took 39-43 us for down): gate/up with SiLU x up in
    128 columns, 64 deep, 4 stages: 59.6-60.0 against 60.1-61.3 for cuBLAS + ``silu_mul`` at 17-32
    rows, 60.6-61.0 against 64.3-65.8 at 40-64; down in 64 columns, 256 deep, K split in 2:
    32.0-32.3 against 33.1-34.0 at 17-32 rows, 35.1 against 35.1 at 40, 33.4-33.7 against 34.8-36.5
    at 48-64. qkv (19.3 against 18.5) and o (13.1 against 12.2) stay on cuBLAS (64 rows; H200,
    2026-12-02, best of 10-24 tilings).

    8-bit weights: batched decode (M <= 64) is bound by the weight stream. At M <= 16: 64-column tiles
    with K split in 4 (more programs than SMs; qkv 12.5 -> 11.3 us), and the wide gate/up matrix loaded
    by TMA in 128-column tiles (35.6 -> 32.5); down (K >= 8192) in the swapped form, int8 converted by
    pairs there: us per matrix at 16 / 13 rows (norm_next in the epilogue, as the model runs it), int8
    20.7 / 21.4 -> 20.0 / 19.9, fp8 20.1 / 19.8 -> 20.0 / 19.8; whole decode steps int8 B=16 / 8 +1.0% /
    +2.0%, fp8 +0.2% / +0.3% (H200, 2026-12-03; qkv, o and gate/up were 0.5-7 us slower swapped in
    each of 5-6 tilings). At 17-64 rows, tiles of 32 rows up to 32, else 64; the
    swapped form but for int8's gate/up; K split for down (2 / 4), o (2 / 4) and int8's qkv (4). us per
    matrix at 64 / 32 rows against the former pick (64-row tiles, K whole; SiLU x up apart): int8 qkv
    18.0 / 18.3 -> 17.3 / 14.7, o 17.5 / 17.5 -> 13.0 / 11.4, gate/up 55.6 / 56.8 -> 54.8 / 46.4, down
    45.1 / 47.1 -> 30.3 / 25.4; fp8 qkv 15.4 / 17.8 -> 13.8 / 13.1, o 14.6 / 14.8 -> 10.9 / 10.0,
    gate/up 44.9 / 49.2 -> 44.3 / 38.1, down 41.3 / 43.7 -> 23.2 / 20.8 (H200, 2026-12-02; each the best
    of 27-60 tilings or within 0.3 us of it). At 65-256 rows (batched decode past 64 rows, short prefill
    chunks), and for fp8 down to 384 rows, the swapped form in (128, 128, 128) tiles: K split in 4 with
    4 warps for down and wherever there are 64 output tiles or fewer (o; qkv up to 128 rows), else one
    split with 8 warps. us per matrix at 128 rows, int8 / fp8, one split -> four: qkv 40 / 37 -> 30 /
    27, o 40 / 37 -> 17 / 16, down 129 / 76 -> 38 / 35 (a split in 2 was faster for some but once gave
    fp8 o a 4% error). With 8 warps the split tiles race in Triton 3.6's code: fp8 got wrong sums for
    part of a tile in ~2% of calls (1.6-4.7% max error, gone on a rerun of the same inputs); none in
    1400 calls with 4 warps, as fast to within 1 us. fp8 down at 320 / 384 rows: 91 / 96 us against 97 /
    101 in the (128, 128, 64) tiles split in 2 used past that (70B's down 349 / 361 against 395 / 413);
    slower at 512 (127 against 112). Prefill chunks (257-512 rows) are bound by tl.dot: the swapped form
    in 256-token tiles, K split in 2 for the long rows of down; at 512 rows, us per matrix fp8 / int8
    against a model-dtype copy + cuBLAS: gate/up 208 / 226 vs 244, qkv 53 / 57 vs 55, o 33 / 39 vs 38,
    down 101 / 109 vs 120, and with one program per SM walking the tiles (persistent) fp8 gate/up 198,
    qkv 50 (this needs TMA: without it prefill takes the copy, see ``minillama.backend``). Some tilings
    compile to wrong products in Triton 3.6 (the persistent form in (256, 128, 64) tiles 4 stages deep;
    (256, 64, 64) tiles 3 deep): the GPU tests run every tiling picked here. Measured on the H200 over
    Llama-3.1-8B's matrices (BENCHMARKS.md, 8-bit weights). On a Hopper GPU most products past 64 rows,
    and the 8B's 8-bit gate/up at 17-64 rows, run the Gluon kernel of
    ``minillama.hopper_matmul`` instead (see :func:`matmul`)."""
    eight_bit = weight_dtype in (torch.int8, torch.float8_e4m3fn)
    if swiglu or rope:
        assert M <= fused_epilogue_rows(swiglu) and not (swiglu and rope), (M, swiglu, rope)
        if M > FUSED_EPILOGUE_ROWS:  # SiLU x up at 17-64 rows: gate/up's tiles, whatever its size
            return _gate_up_tiles(M, weight_dtype)
        if rope:  # 8-bit: the plain product's tiles and K split, each program a head's two half-blocks
            return (16, 32, 128, 4, 4, 4, "pointers") if eight_bit else (16, 32, 256, 4, 4, 1, "pointers")
        return (16, 64, 256, 4, 3, 1, "pointers") if eight_bit else (16, 64, 128, 4, 3, 1, "tma_swapped")
    if not eight_bit:
        if M > 16:  # gate/up (SiLU x up fused) and down: the backend's products of 17-64 rows here
            return _gate_up_tiles(M, weight_dtype) if N >= 16384 else (_block_m(M), 64, 256, 4, 3, 2, "tma_swapped")
        if N >= 16384:
            return 16, 128, 128, 4, 3, 1, "tma_swapped"
        return (16, 64, 128, 4, 4, 4, "tma_swapped") if K >= 8192 else (16, 64, 256, 4, 4, 1, "tma_swapped")
    if M <= 16:
        if N >= 16384:
            return 16, 128, 256, 4, 3, 1, "tma"
        return (16, 64, 256, 4, 4, 4, "tma_swapped") if K >= 8192 else (16, 64, 128, 4, 4, 4, "pointers")
    if M <= 64:  # tiles of 32 rows up to 32, else 64
        block_m = _block_m(M)
        fp8 = weight_dtype == torch.float8_e4m3fn
        if N >= 16384:  # gate/up
            return _gate_up_tiles(M, weight_dtype)
        if K >= 8192:  # down
            return block_m, 64, 256, 4, 4, 2 if block_m == 64 else 4, "tma_swapped"
        if N > K:  # qkv
            return (block_m, 64, 256, 4, 4, 1, "tma_swapped") if fp8 else (block_m, 64, 128, 4, 3, 4, "tma_swapped")
        return (64, 64, 256, 4, 4, 2, "tma_swapped") if block_m == 64 else (32, 64, 128, 4, 4, 4, "tma_swapped")
    down = N < K and K >= 8192  # few output columns, long rows: a K split fills the SMs
    fp8_down = down and weight_dtype == torch.float8_e4m3fn
    if M <= 256 or (fp8_down and M <= 384):  # K split in 4 (4 warps) where the (128, 128) tiles are few
        if down or triton.cdiv(M, 128) * triton.cdiv(N, 128) <= 64:
            return 128, 128, 128, 4, 3, 4, "tma_swapped"
        return 128, 128, 128, 8, 3, 1, "tma_swapped"
    if fp8_down:
        return 128, 128, 64, 8, 3, 2, "tma_swapped"
    if N > K:  # qkv, gate/up
        return 256, 128, 128, 8, 3, 1, "tma_swapped_persistent"
    return (256, 128, 64, 8, 4, 2, "tma_swapped") if down else (256, 64, 64, 8, 4, 1, "tma_swapped")


def _block_m(M: int) -> int:
    """Rows of a tile of a 17-64-row product."""
    return 32 if M <= 32 else 64


def _gate_up_tiles(M: int, weight_dtype: torch.dtype) -> tuple:
    """``matmul_config`` of gate/up at 17-64 rows, SiLU x up fused or not (any matrix with it fused:
    its two weight tiles per stage fit shared memory in these tiles, not in the other shapes')."""
    if weight_dtype == torch.float8_e4m3fn:
        return _block_m(M), 128, 128, 8, 4, 1, "tma_swapped"
    if weight_dtype == torch.int8:
        return _block_m(M), 128, 128, 4, 3, 1, "tma"
    return _block_m(M), 128, 64, 4, 4, 1, "tma_swapped"


@functools.lru_cache(maxsize=None)
def num_sms(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def tma_ready(*tensors) -> bool:
    """Whether TMA can load tiles of these 2-D tensors: a Hopper (or newer) GPU, 16-byte aligned
    bases and row strides (or Triton's interpreter, which emulates it)."""
    if not INTERPRET and not (tensors[0].is_cuda and compute_capability(tensors[0].device)[0] >= 9):
        return False
    return all(t.data_ptr() % 16 == 0 and t.stride(0) * t.element_size() % 16 == 0 and t.stride(1) == 1
               for t in tensors)


@functools.lru_cache(maxsize=None)
def _tensor_core_gemv():
    from minillama import tensor_core_gemv  # imported where it may run: Gluon is experimental
    return tensor_core_gemv


@functools.lru_cache(maxsize=None)
def _hopper_matmul():
    from minillama import hopper_matmul  # imported where it may run: Gluon is experimental

    return hopper_matmul


def matmul(x: torch.Tensor, weight: torch.Tensor, scale: Optional[torch.Tensor] = None, *, swiglu: bool = False,
           rope=None, config=None, norm=None, norm_next=None):
    """x (M, K) @ weight (N_w, K)^T for a few rows x, in x's dtype: weight has x's dtype (scale
    None), or is 8-bit (int8 / float8_e4m3fn) with per-row float32 scales (N_w,):
    x @ (weight * scale[:, None])^T. swiglu: weight holds [gate; up] and the result is
    ``silu_mul`` of the product, (M, N_w / 2). rope: (cos, sin, n_heads, head_dim), cos and sin
    (M, head_dim): the product's first n_heads heads rotated as :func:`rope_` rotates them. Both in
    the matmul's epilogue up to :func:`fused_epilogue_rows` rows (RoPE for heads of 32 dims or more),
    by their own kernel after it past that.
    config: the tiling of the Triton kernel (default :func:`matmul_config`). Without one, 8-bit
    weights on a Hopper GPU run ``minillama.hopper_matmul``'s Gluon kernel where its
    :func:`~minillama.hopper_matmul.tiling` says it is faster (prefill chunks of 65-512 rows, gate/up
    with SiLU x up at 17-64 rows; not with RoPE or norm_next in the epilogue).

    The residual add + RMSNorm between two products, in their launches (no kernel of its own):
    norm_next: (residual (M, N) of x's dtype, gain (N,)): returns (h, gained, sumsq), h = product +
    residual rounded as :func:`add_rms_norm` rounds it, gained = h * gain rounded to x's dtype, and
    sumsq (tiles, M) float32, the sums of squares of pieces of h's rows. norm: (sumsq, eps): x is
    such a gained, and the product is of RMSNorm(h) * gain: the product of x, each row's dot
    products times its 1 / rms (from its pieces' sums, summed in order: the same bits every run).
    The same function as the product of ``add_rms_norm(h, None, gain, eps)[0]``, rounded
    differently: that rounds h * (1 / rms) and then its product with the gain, this rounds h * gain
    only (as the GEMV, which applies its norm's 1 / rms to its dot products, rounds none)."""
    M, K = x.shape
    N_w = weight.shape[0]
    assert not (swiglu and rope is not None)
    assert norm_next is None or not (swiglu or rope is not None or norm is not None)
    if swiglu and M > FUSED_SWIGLU_ROWS:
        return silu_mul(matmul(x, weight, scale, config=config, norm=norm))
    if rope is not None and (M > FUSED_EPILOGUE_ROWS or rope[3] < 32):
        y = matmul(x, weight, scale, config=config, norm=norm)
        rope_(y, *rope)
        return y
    N = N_w // 2 if swiglu else N_w
    assert x.stride(1) == 1 and weight.stride(1) == 1 and weight.shape[1] == K and not (swiglu and N_w % 2)
    assert (scale is not None) == (weight.dtype in (torch.int8, torch.float8_e4m3fn)), (weight.dtype, scale is None)
    assert scale is None or (scale.dtype == torch.float32 and scale.shape == (N_w,))
    assert scale is not None or weight.dtype == x.dtype, (weight.dtype, x.dtype)
    # 8-bit weights on Hopper: the Gluon kernel where it was measured faster (prefill chunks; gate/up
    # at 17-64 rows, then silu_mul)
    if (config is None and scale is not None and not INTERPRET and rope is None and norm_next is None
            and tma_ready(x, weight)):
        hopper = _hopper_matmul()
        hopper_tiling = hopper.tiling(M, N_w, K, swiglu) if hopper.usable(x) else None
        if hopper_tiling is not None:
            y = hopper.matmul_8bit(x, weight, scale, hopper_tiling, norm=norm)
            return silu_mul(y) if swiglu else y
    out = torch.empty((M, N), dtype=x.dtype, device=x.device)
    if config is None:
        config = INTERPRET_MATMUL if INTERPRET else matmul_config(M, N_w, K, weight.dtype, swiglu, rope is not None)
    block_m, block_n, block_k, num_warps, num_stages, split_k, loads = config
    half, n_rotated, cos, sin = 1, 0, x, x
    if rope is not None:
        cos, sin, n_heads, head_dim = rope
        half, n_rotated = head_dim // 2, n_heads * head_dim
        assert N % head_dim == 0 and n_rotated <= N and cos.shape == sin.shape == (M, head_dim), (N, rope)
        assert cos.stride(1) == 1 and cos.stride(0) == sin.stride(0) and sin.stride(1) == 1
        while half % block_n:
            block_n //= 2
    assert loads in MATMUL_LOADS, loads
    if loads != "pointers" and not tma_ready(x, weight):
        loads = "pointers"
        if block_m > 64:  # the prefill tiles need TMA's shared-memory layout; these fit any recent GPU
            block_m, block_n, block_k, num_stages = 128, 128, 64, 3
    k_split = triton.cdiv(triton.cdiv(K, split_k), block_k) * block_k  # whole K tiles per split
    split_k = triton.cdiv(K, k_split)
    assert not (rope is not None and loads == "tma_swapped_persistent"), config
    grid = (triton.cdiv(M, block_m), N // (2 * block_n) if rope is not None else triton.cdiv(N, block_n), split_k)
    if split_k > 1:
        partial = torch.empty((split_k, M, N_w), dtype=torch.float32, device=x.device)
        arrivals = _split_arrivals(x.device, grid[0] * triton.cdiv(N, block_n))  # the kernel's tile index
    else:
        partial = arrivals = out  # not read
    w_arg = weight if loads == "pointers" else TensorDescriptor.from_tensor(weight, [block_n, block_k])
    swap = loads.startswith("tma_swapped")
    x_arg = TensorDescriptor.from_tensor(x, [block_m, block_k]) if swap else x
    persistent = loads == "tma_swapped_persistent"
    if persistent:  # one program per SM (two in the interpreter, so that its loop is tested)
        grid = (min(grid[0] * grid[1] * split_k, 2 if INTERPRET else num_sms(x.device)),)
    scale_arg = scale if scale is not None else x
    residual, sumsq, gain, gained, eps, sumsq_tiles = x, x, x, x, 0.0, 0
    if norm is not None:
        sumsq, eps = norm
        sumsq_tiles = sumsq.shape[0]
        assert sumsq.dtype == torch.float32 and sumsq.shape[1] == M and sumsq.is_contiguous(), sumsq.shape
    if norm_next is not None:
        residual, gain = norm_next
        assert residual.shape == (M, N) and residual.dtype == x.dtype and residual.stride(1) == 1, residual.shape
        assert gain.shape == (N,) and gain.stride(0) == 1, gain.shape
        gained = torch.empty_like(out)  # out's strides: the kernel writes both at out's offsets
        sumsq_tiles = triton.cdiv(N, block_n)  # the kernel's pid_n
        sumsq = torch.empty((sumsq_tiles, M), dtype=torch.float32, device=x.device)
    # int8 -> bfloat16 by pairs in the swapped form (H200, 2026-12-03, us per matrix at 32 rows: qkv
    # 14.5 -> 12.4, down 25.2 -> 20.9; batch-32 decode steps +12%), where each warpgroup's register
    # operand is 64 weight rows: tiles of 128 rows in one warpgroup (4 warps) computed wrong products
    # with it at row counts that are not multiples of 16 (100, 130), so they keep Triton's conversion
    int8_pairs = (weight.dtype == torch.int8 and x.dtype == torch.bfloat16 and swap and block_n <= 16 * num_warps
                  and not INTERPRET)
    _matmul_fwd[grid](
        x_arg, w_arg, scale_arg, out, partial, arrivals, cos, sin, residual, sumsq, gain, gained, M, N, K, k_split,
        x.stride(0), weight.stride(0), out.stride(0), cos.stride(0), n_rotated, residual.stride(0), sumsq_tiles, eps,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, EVEN_K=K % block_k == 0, SPLIT_K=split_k,
        W_TMA=loads != "pointers", SWAP=swap, PERSISTENT=persistent,
        SCALE=scale is not None, SWIGLU=swiglu, ROPE=rope is not None, HALF=half,
        NORM=norm is not None, NORM_NEXT=norm_next is not None,
        BLOCK_T=triton.next_power_of_2(max(sumsq_tiles, 1)),
        UPCAST=INTERPRET and x.dtype == torch.bfloat16, INT8_PAIRS=int8_pairs,
        num_warps=num_warps, num_stages=num_stages,
    )
    return out if norm_next is None else (out, gained, sumsq)


_ARRIVALS: dict = {}
MAX_SPLIT_TILES = 1 << 16  # output tiles of one split-K product; the 8B / 70B's need a few hundred


def _split_arrivals(device: torch.device, tiles: int) -> torch.Tensor:
    """The per-tile arrival counters of split-K products on ``device`` (and of ``max_argmax``'s
    rows): int32 zeros, allocated once and kept (CUDA graphs bake its
    address in; the kernel sets each counter back to zero). Launches on one device share them, so
    they must not run concurrently on two streams."""
    if tiles > MAX_SPLIT_TILES:
        raise ValueError(f"a split-K product of {tiles} output tiles exceeds MAX_SPLIT_TILES={MAX_SPLIT_TILES}")
    arrivals = _ARRIVALS.get(device)
    if arrivals is None:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError("the split-K counters are allocated by a product run before any CUDA graph "
                               "capture (a warm-up run does it)")
        arrivals = _ARRIVALS[device] = torch.zeros(MAX_SPLIT_TILES, dtype=torch.int32, device=device)
    return arrivals


def dequantize(weight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``weight.float() * scale[:, None]`` rounded once to ``dtype`` for an 8-bit weight (N, K): one
    pass, reading 1 byte and writing 2 per element (the float32 ops of
    ``minillama.quantization.dequantize`` move 11)."""
    N, K = weight.shape
    assert weight.stride(1) == 1 and scale.dtype == torch.float32 and scale.shape == (N,)
    out = torch.empty((N, K), dtype=dtype, device=weight.device)
    block_n, block_k = (64, 64) if INTERPRET else (8, 1024)
    _launch(_dequantize_fwd, (triton.cdiv(N, block_n), triton.cdiv(K, block_k)), (weight, scale, out),
            (N, K, weight.stride(0), out.stride(0)), num_warps=4, BLOCK_N=block_n, BLOCK_K=block_k)
    return out


def max_argmax(x: torch.Tensor, block: Optional[int] = None, non_finite: Optional[int] = None):
    """``(x.amax(-1), x.argmax(-1))`` of logits x (B, V) in one launch: the max as float32 (NaN
    where a row holds one), the first index of it as int64 (of the first NaN where a row holds one),
    as torch's amax / argmax give them; with ``non_finite`` (an int), that index instead where a
    row's max is not finite (NaN, +inf, or a row of -inf). Each row is split into chunks of
    ``block`` values (default 2048), so a row of Llama 3's 128256 logits is reduced by 63 programs
    at once (torch's argmax reduced it in one block: 36 us a row on the H200, 2026-12-03)."""
    B, V = x.shape
    x = _unit_stride_rows(x)
    block = block or (64 if INTERPRET else 2048)
    chunks = triton.cdiv(V, block)
    top = torch.empty(B, dtype=torch.float32, device=x.device)
    first = torch.empty(B, dtype=torch.int64, device=x.device)
    parts = torch.empty(B, chunks, dtype=torch.float32, device=x.device)
    part_index = torch.empty(B, chunks, dtype=torch.int32, device=x.device)
    _launch(_max_argmax_fwd, (chunks, B), (x, parts, part_index, _split_arrivals(x.device, B), top, first),
            (V, x.stride(0)), num_warps=4, BLOCK=block, CHUNKS=chunks, BLOCK_CHUNKS=triton.next_power_of_2(chunks),
            NON_FINITE=non_finite)
    return top, first
