"""Triton kernels behind :class:`minillama.backend.TritonBackend`: RMSNorm, RoPE in place, SiLU x mul,
and the single-token GEMV with RMSNorm prologue, SiLU x up and residual-add epilogues.

Rounding: the elementwise kernels round to the model dtype wherever the torch backend does
(``bf16(w * bf16(x * r))``, ``bf16(bf16(x cos) + bf16(rot(x) sin))``, ...), so the two backends agree
bit for bit up to the reduction order of the mean and the matrix products. The GEMV's factored
RMSNorm skips the rounding of the normalized input: differences stay at bf16 rounding level.

Runs on CUDA, or on the CPU in Triton's interpreter when ``TRITON_INTERPRET=1`` was set before
Triton was imported (the tests). Triton decides that once, at import; so does this module.
"""
import os
from typing import Optional

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"  # read once, as Triton itself does


def runs_on(device: torch.device) -> bool:
    """Whether these kernels run on ``device``: CUDA, or the CPU under Triton's interpreter."""
    return device.type == "cuda" or (device.type == "cpu" and INTERPRET)


@triton.jit
def _rmsnorm_fwd(X, Normed, W, stride_x, stride_n, N, eps, BLOCK: tl.constexpr):
    # One program per token row: normed = w * (x * rsqrt(mean(x^2) + eps)).
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < N
    x32 = tl.load(X + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
    r = tl.rsqrt(tl.sum(x32 * x32, 0) / N + eps)
    n = (x32 * r).to(X.dtype.element_ty).to(tl.float32)  # the torch backend rounds before the gain
    w = tl.load(W + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(Normed + row * stride_n + offs, (w * n).to(Normed.dtype.element_ty), mask=mask)


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
    # x * cos + rotate_half(x) * sin, each product rounded as the plain model's tensor ops do
    o1 = (x1 * c1).to(ty).to(tl.float32) + (-x2 * s1).to(ty).to(tl.float32)
    o2 = (x2 * c2).to(ty).to(tl.float32) + (x1 * s2).to(ty).to(tl.float32)
    tl.store(p1, o1.to(ty), mask=mask)
    tl.store(p2, o2.to(ty), mask=mask)


@triton.jit
def _silu_mul_fwd(GU, Out, stride_gu, stride_o, F_dim, BLOCK: tl.constexpr):
    # out = silu(gate) * up with gate = GU[:, :F], up = GU[:, F:]; rounded as the plain model does.
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < F_dim
    ty = Out.dtype.element_ty
    g = tl.load(GU + row * stride_gu + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(GU + row * stride_gu + F_dim + offs, mask=mask, other=0.0).to(tl.float32)
    s = (g * tl.sigmoid(g)).to(ty).to(tl.float32)
    tl.store(Out + row * stride_o + offs, (s * u).to(ty), mask=mask)


@triton.jit
def _gemv_fwd(X, W, Out, Res, NormW, N, K, stride_wn, eps,
              NORM: tl.constexpr, SWIGLU: tl.constexpr, RESIDUAL: tl.constexpr,
              BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr):
    """out[n] = sum_k W[n, k] x[k] for one row x (K,), BLOCK_N outputs per program.

    NORM: x is replaced by RMSNorm(x) * NormW; the row scale rsqrt(mean(x^2) + eps) is applied
    after the dot product. SWIGLU: W holds [gate; up] (2N rows): out = silu(gate) * up.
    RESIDUAL: out = Res + W x (the projection rounded first, as the plain model adds rounded terms).
    """
    pid = tl.program_id(0)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    n_mask = offs_n < N
    w_rows = W + offs_n.to(tl.int64)[:, None] * stride_wn
    acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    if SWIGLU:
        u_rows = w_rows + N * stride_wn
        acc_up = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    if NORM:
        sumsq = tl.zeros([BLOCK_K], dtype=tl.float32)
    # -- stream the weight rows once; products accumulate elementwise, reduced once at the end --
    for k0 in tl.range(0, K, BLOCK_K):
        kk = k0 + offs_k
        if EVEN_K:
            x = tl.load(X + kk).to(tl.float32)
            w = tl.load(w_rows + kk[None, :], mask=n_mask[:, None], other=0.0)
        else:
            k_mask = kk < K
            x = tl.load(X + kk, mask=k_mask, other=0.0).to(tl.float32)
            w = tl.load(w_rows + kk[None, :], mask=n_mask[:, None] & k_mask[None, :], other=0.0)
        if NORM:
            sumsq += x * x
            if EVEN_K:
                x = x * tl.load(NormW + kk).to(tl.float32)
            else:
                x = x * tl.load(NormW + kk, mask=k_mask, other=0.0).to(tl.float32)
        acc += w.to(tl.float32) * x[None, :]
        if SWIGLU:
            if EVEN_K:
                u = tl.load(u_rows + kk[None, :], mask=n_mask[:, None], other=0.0)
            else:
                u = tl.load(u_rows + kk[None, :], mask=n_mask[:, None] & k_mask[None, :], other=0.0)
            acc_up += u.to(tl.float32) * x[None, :]
    y = tl.sum(acc, 1)
    if NORM:
        r = tl.rsqrt(tl.sum(sumsq, 0) / K + eps)
        y = y * r
    ty = Out.dtype.element_ty
    # -- epilogue --
    if SWIGLU:
        up = tl.sum(acc_up, 1)
        if NORM:
            up = up * r
        g = y.to(ty).to(tl.float32)
        s = (g * tl.sigmoid(g)).to(ty).to(tl.float32)
        y = s * up.to(ty).to(tl.float32)
    if RESIDUAL:
        y = y.to(ty).to(tl.float32) + tl.load(Res + offs_n, mask=n_mask, other=0.0).to(tl.float32)
    tl.store(Out + offs_n, y.to(ty), mask=n_mask)


# Candidate GEMV tilings (BLOCK_N, BLOCK_K, num_warps). On CUDA each matrix kind (qkv, o, gate/up,
# down, head) takes the fastest, timed once at the first single-token step in a CUDA graph over
# every layer's matrix (so the weights stream from HBM, not L2, and launch gaps are the graph's).
GEMV_CONFIGS = [(4, 1024, 4), (8, 512, 4), (2, 2048, 4), (4, 2048, 8), (8, 1024, 8), (16, 256, 4)]
INTERPRET_GEMV = (1024, 64, 4)  # few, large programs and loop steps: the interpreter pays per step


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


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """weight * RMSNorm(x) over the last dim of x (..., N)."""
    N = x.shape[-1]
    x2 = x.reshape(-1, N)
    normed = torch.empty_like(x2)
    _rmsnorm_fwd[(x2.shape[0],)](
        x2, normed, weight, x2.stride(0), normed.stride(0), N, eps,
        BLOCK=triton.next_power_of_2(N), num_warps=8 if N >= 2048 else 4,
    )
    return normed.view(x.shape)


def rope_(qk: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, n_heads: int, head_dim: int) -> None:
    """Rotate the first ``n_heads`` heads of each row of qk (T, >= n_heads * D) in place.

    cos, sin: (T, D), as ``rope_cos_sin`` returns them (flattened over batch and sequence).
    """
    T = qk.shape[0]
    assert qk.stride(-1) == 1 and cos.stride(-1) == 1 and cos.stride(0) == sin.stride(0)
    _rope_fwd[(T,)](
        qk, cos, sin, qk.stride(0), cos.stride(0), n_heads, D=head_dim,
        BLOCK_H=triton.next_power_of_2(n_heads), BLOCK_HALF=triton.next_power_of_2(head_dim // 2),
        num_warps=4,
    )


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for gate_up (T, 2F) = [gate | up] -> (T, F)."""
    T, two_f = gate_up.shape
    F_dim = two_f // 2
    out = torch.empty((T, F_dim), dtype=gate_up.dtype, device=gate_up.device)
    BLOCK = 1024
    _silu_mul_fwd[(T, triton.cdiv(F_dim, BLOCK))](
        gate_up, out, gate_up.stride(0), out.stride(0), F_dim, BLOCK=BLOCK, num_warps=4
    )
    return out


def gemv(x: torch.Tensor, weight: torch.Tensor, *, norm_weight: Optional[torch.Tensor] = None,
         eps: float = 0.0, swiglu: bool = False, residual: Optional[torch.Tensor] = None,
         config=None) -> torch.Tensor:
    """One row x (K,) times weight (N_w, K)^T, with the optional fusions of ``_gemv_fwd``.

    config: (BLOCK_N, BLOCK_K, num_warps); default the first of ``GEMV_CONFIGS``.
    Returns (N,) with N = N_w, or N_w / 2 with ``swiglu``.
    """
    K = x.shape[-1]
    N = weight.shape[0] // 2 if swiglu else weight.shape[0]
    assert x.is_contiguous() and weight.stride(1) == 1 and weight.shape[1] == K
    out = torch.empty(N, dtype=x.dtype, device=x.device)
    if INTERPRET:
        config = INTERPRET_GEMV
    block_n, block_k, num_warps = config or GEMV_CONFIGS[0]
    _gemv_fwd[(triton.cdiv(N, block_n),)](
        x, weight, out, residual if residual is not None else out,
        norm_weight if norm_weight is not None else x, N, K, weight.stride(0), eps,
        NORM=norm_weight is not None, SWIGLU=swiglu, RESIDUAL=residual is not None,
        BLOCK_N=block_n, BLOCK_K=block_k, EVEN_K=K % block_k == 0, num_warps=num_warps,
    )
    return out


