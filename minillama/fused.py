"""The GPU fast path's forward: the same function as ``model.Transformer``, in fewer, fused launches.

``FusedTransformer(model)`` wraps a loaded ``Transformer`` from outside (``model.py`` stays plain):

* Load-time fusion: q/k/v become one (Nq + 2 Nkv, hidden) matrix and gate/up one (2 F, hidden)
  matrix. The model's own parameters are re-pointed to row slices of the fused matrices, so no
  weight is stored twice and the plain model keeps computing exactly what it did.
* Single-token steps (B * S == 1, decode at batch 1) run a Triton GEMV per matrix with the
  elementwise work folded in: RMSNorm in the prologue (``W (g * x) * rsqrt(mean(x^2) + eps)``:
  the per-row scale factors out of the dot product, so one pass reads x once), SiLU(gate) * up in
  the gate/up epilogue, the residual add in the o- and down-projection epilogues. A layer is then
  4 weight-streaming launches + RoPE + flashcore's two decode launches.
* Larger steps (prefill, decode at batch > 1) keep cuBLAS for the matrices and fuse the
  elementwise work into Triton kernels: residual add + RMSNorm, RoPE on q and k in place, SiLU * up.

Rounding: the elementwise kernels round to the model dtype wherever the plain model does
(``bf16(w * bf16(x * r))``, ``bf16(bf16(x cos) + bf16(rot(x) sin))``, ...), so they agree with it
bit for bit up to the reduction order of the mean and the matrix products. The GEMV's factored
RMSNorm skips the plain model's rounding of the normalized input: differences stay at bf16 rounding
level. RoPE's cos/sin come from ``model.rope_cos_sin`` (the one RoPE), once per step.

Supported: CUDA (or the CPU under ``TRITON_INTERPRET=1``, for tests), no attention or MLP biases.
"""
import os
from typing import List, NamedTuple, Optional, Sequence

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import nn

import flashcore
from minillama.kv_cache import KVCache
from minillama.model import Transformer, rope_cos_sin


def unsupported_reason(model: Transformer) -> Optional[str]:
    """Why ``FusedTransformer`` cannot wrap this model (None: it can)."""
    cfg = model.config
    if cfg.attention_bias or cfg.mlp_bias:
        return "the fused path does not implement attention/MLP biases"
    device = model.tok_embeddings.weight.device
    if device.type != "cuda" and not _interpreting(device):
        return f"the fused path runs Triton kernels, which need a CUDA device (model is on {device})"
    return None


def fast_forward(model: Transformer, fast: Optional[bool] = None):
    """The ``forward=`` for ``TokenLoop``: CUDA-graph decode over the fused model, or None (plain).

    fast: None turns the fast path on for supported models on CUDA; True requires it (ValueError
    naming the reason when it cannot run); False keeps the plain path.
    """
    if fast is False:
        return None
    device = model.tok_embeddings.weight.device
    reason = unsupported_reason(model) if device.type == "cuda" else f"the model is on {device}, not CUDA"
    if reason is not None:
        if fast:
            raise ValueError(f"fast=True but {reason}; pass fast=None or False")
        return None
    from minillama.cuda_graphs import DecodeGraphs

    return DecodeGraphs(FusedTransformer(model))


def _interpreting(device: torch.device) -> bool:
    return device.type == "cpu" and os.environ.get("TRITON_INTERPRET", "0") == "1"


# ---------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------


@triton.jit
def _add_rmsnorm_fwd(X, Delta, H_out, Normed, W, stride_x, stride_d, stride_h, stride_n, N, eps,
                     ADD: tl.constexpr, BLOCK: tl.constexpr):
    # One program per token row: h = x + delta (rounded), normed = w * (h * rsqrt(mean(h^2) + eps)).
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < N
    x = tl.load(X + row * stride_x + offs, mask=mask, other=0.0)
    if ADD:
        d = tl.load(Delta + row * stride_d + offs, mask=mask, other=0.0)
        x = (x.to(tl.float32) + d.to(tl.float32)).to(X.dtype.element_ty)
        tl.store(H_out + row * stride_h + offs, x, mask=mask)
    x32 = x.to(tl.float32)
    r = tl.rsqrt(tl.sum(x32 * x32, 0) / N + eps)
    n = (x32 * r).to(X.dtype.element_ty).to(tl.float32)  # the plain model rounds before the gain
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
INTERPRET_GEMV = (16, 64, 4)  # few, large loop steps: the interpreter pays per step


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


# ---------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------


def add_rmsnorm(x: torch.Tensor, delta: Optional[torch.Tensor], weight: torch.Tensor, eps: float):
    """(h, normed) for rows of x (T, N): h = x + delta (x itself when delta is None)."""
    T, N = x.shape
    normed = torch.empty_like(x)
    h = torch.empty_like(x) if delta is not None else x
    d = delta if delta is not None else x
    _add_rmsnorm_fwd[(T,)](
        x, d, h, normed, weight, x.stride(0), d.stride(0), h.stride(0), normed.stride(0), N, eps,
        ADD=delta is not None, BLOCK=triton.next_power_of_2(N), num_warps=8 if N >= 2048 else 4,
    )
    return h, normed


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
    if _interpreting(x.device):
        config = INTERPRET_GEMV
    block_n, block_k, num_warps = config or GEMV_CONFIGS[0]
    _gemv_fwd[(triton.cdiv(N, block_n),)](
        x, weight, out, residual if residual is not None else out,
        norm_weight if norm_weight is not None else x, N, K, weight.stride(0), eps,
        NORM=norm_weight is not None, SWIGLU=swiglu, RESIDUAL=residual is not None,
        BLOCK_N=block_n, BLOCK_K=block_k, EVEN_K=K % block_k == 0, num_warps=num_warps,
    )
    return out


# ---------------------------------------------------------------------------------------------
# The fused model
# ---------------------------------------------------------------------------------------------


class FusedLayer(NamedTuple):
    attn_norm: torch.Tensor  # (hidden,)
    wqkv: torch.Tensor  # (Nq + 2 Nkv, hidden): rows of wq, then wk, then wv
    wo: torch.Tensor  # (hidden, Nq)
    ffn_norm: torch.Tensor  # (hidden,)
    w13: torch.Tensor  # (2 F, hidden): rows of the gate (w1), then the up projection (w3)
    w2: torch.Tensor  # (hidden, F)


def _fuse_rows(linears: Sequence[nn.Linear]) -> torch.Tensor:
    """Concatenate the weights of ``linears`` along the output dim and re-point each to its slice."""
    with torch.no_grad():
        fused = torch.cat([lin.weight for lin in linears], dim=0)
        start = 0
        for lin in linears:
            n = lin.weight.shape[0]
            lin.weight = nn.Parameter(fused[start : start + n], requires_grad=False)
            start += n
    return fused


class FusedTransformer:
    """Callable with ``Transformer.forward``'s signature, computing the same function faster.

    Args:
        model: a loaded ``Transformer``; its q/k/v and gate/up weights are re-pointed to slices
            of fused matrices (same values, no second copy).
        gemv_max_tokens: steps with at most this many tokens in total use the fused GEMV
            (only 1 is implemented: decode at batch 1); 0 turns the GEMV off (cuBLAS everywhere).
    """

    def __init__(self, model: Transformer, gemv_max_tokens: int = 1):
        reason = unsupported_reason(model)
        if reason is not None:
            raise ValueError(reason)
        if gemv_max_tokens not in (0, 1):
            raise ValueError(f"gemv_max_tokens must be 0 or 1, got {gemv_max_tokens}")
        self.model = model
        self.config = model.config
        self.gemv_max_tokens = gemv_max_tokens
        self.gemv_configs: Optional[dict] = None  # {kind: (BLOCK_N, BLOCK_K, num_warps)}, by tune_gemv
        self.gemv_timings: dict = {}  # {kind: {config: ms per matrix}}, by tune_gemv
        self.layers: List[FusedLayer] = []
        for layer in model.layers:
            attn, ffn = layer.attention, layer.feed_forward
            self.layers.append(FusedLayer(
                attn_norm=layer.attention_norm.weight.detach(),
                wqkv=_fuse_rows([attn.wq, attn.wk, attn.wv]),
                wo=attn.wo.weight.detach(),
                ffn_norm=layer.ffn_norm.weight.detach(),
                w13=_fuse_rows([ffn.w1, ffn.w3]),
                w2=ffn.w2.weight.detach(),
            ))

    @torch.inference_mode()
    def __call__(
        self,
        tokens: torch.Tensor,
        k_cache: Optional[torch.Tensor] = None,
        v_cache: Optional[torch.Tensor] = None,
        seq_lens: Optional[torch.Tensor] = None,
        *,
        seq_lens_cpu: Optional[Sequence[int]] = None,
        logits_at: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """Same arguments and result as ``Transformer.forward``."""
        model, cfg = self.model, self.config
        B, S = tokens.shape
        if k_cache is None:
            cache = KVCache.allocate(cfg, B, S, tokens.device, model.tok_embeddings.weight.dtype)
            k_cache, v_cache, seq_lens, seq_lens_cpu = cache.k, cache.v, cache.seq_lens, cache.lengths
        positions = seq_lens[:, None].long() + torch.arange(S, device=tokens.device)  # (B, S)
        h = F.embedding(tokens, model.tok_embeddings.weight)  # (B, S, hidden)
        cos, sin = rope_cos_sin(positions, model.inv_freq, h.dtype)  # (B, S, 1, D)
        cos, sin = cos.view(B * S, -1), sin.view(B * S, -1)
        caches = (k_cache, v_cache, seq_lens, seq_lens_cpu)
        if B * S <= self.gemv_max_tokens:
            logits = self._forward_gemv(h.view(-1), cos, sin, caches)
        else:
            logits = self._forward_matmul(h.view(B * S, -1), cos, sin, caches, B, S, logits_at)
        return logits.view(B, -1, cfg.vocab_size)

    def _attention(self, qkv: torch.Tensor, i: int, caches, B: int, S: int) -> torch.Tensor:
        """Attention of layer i over qkv (B * S, Nq + 2 Nkv) with RoPE applied; (B * S, Nq)."""
        cfg = self.config
        H, H_kv, D = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        k_cache, v_cache, seq_lens, seq_lens_cpu = caches
        qkv = qkv.view(B, S, -1)
        q = qkv[..., : H * D].view(B, S, H, D)  # (B, S, H_q, D)
        k = qkv[..., H * D : (H + H_kv) * D].view(B, S, H_kv, D)  # (B, S, H_kv, D)
        v = qkv[..., (H + H_kv) * D :].view(B, S, H_kv, D)
        out = flashcore.attention_with_kv_cache(
            q, k, v, k_cache[i], v_cache[i], seq_lens, seq_lens_cpu=seq_lens_cpu
        )  # (B, S, H_q, D)
        return out.reshape(B * S, H * D)

    def gemv_calls(self, x: torch.Tensor):
        """{kind: fn(layer_or_None, config)} for the five single-token matrix products (tuning, benchmarks)."""
        eps, F_dim = self.config.rms_norm_eps, self.config.intermediate_size
        act = torch.randn(F_dim, dtype=x.dtype, device=x.device)
        head, final_norm = self.model.output.weight, self.model.norm.weight
        return {
            "qkv": lambda L, c: gemv(x, L.wqkv, norm_weight=L.attn_norm, eps=eps, config=c),
            "o": lambda L, c: gemv(x, L.wo, residual=x, config=c),
            "gate_up": lambda L, c: gemv(x, L.w13, norm_weight=L.ffn_norm, eps=eps, swiglu=True, config=c),
            "down": lambda L, c: gemv(act, L.w2, residual=x, config=c),
            "head": lambda L, c: gemv(x, head, norm_weight=final_norm, eps=eps, config=c),
        }

    def tune_gemv(self) -> dict:
        """Pick each matrix kind's fastest GEMV tiling on this GPU (timed in CUDA graphs); once."""
        if self.gemv_configs is not None:
            return self.gemv_configs
        device = self.model.tok_embeddings.weight.device
        if _interpreting(device):
            self.gemv_configs = {}
            return self.gemv_configs
        if torch.cuda.is_current_stream_capturing():
            raise RuntimeError("FusedTransformer.tune_gemv must run before a CUDA graph capture: warm up first")
        x = torch.randn(self.config.hidden_size, dtype=self.model.tok_embeddings.weight.dtype, device=device)
        chosen, self.gemv_timings = {}, {}
        for kind, call in self.gemv_calls(x).items():
            layers = [None] if kind == "head" else self.layers
            times = {cfg: time_in_graph(lambda: [call(L, cfg) for L in layers]) for cfg in GEMV_CONFIGS}
            chosen[kind] = min(times, key=times.get)
            self.gemv_timings[kind] = {str(cfg): ms / len(layers) for cfg, ms in times.items()}
        self.gemv_configs = chosen
        return chosen

    def _forward_gemv(self, x: torch.Tensor, cos, sin, caches) -> torch.Tensor:
        """One token: x (hidden,) -> logits (V,)."""
        cfg, eps = self.config, self.config.rms_norm_eps
        n_rot = cfg.num_attention_heads + cfg.num_key_value_heads
        tiles = self.tune_gemv()
        for i, L in enumerate(self.layers):
            qkv = gemv(x, L.wqkv, norm_weight=L.attn_norm, eps=eps, config=tiles.get("qkv"))
            rope_(qkv.view(1, -1), cos, sin, n_rot, cfg.head_dim)
            attn = self._attention(qkv, i, caches, 1, 1).reshape(-1)
            h = gemv(attn, L.wo, residual=x, config=tiles.get("o"))
            act = gemv(h, L.w13, norm_weight=L.ffn_norm, eps=eps, swiglu=True, config=tiles.get("gate_up"))
            x = gemv(act, L.w2, residual=h, config=tiles.get("down"))
        return gemv(x, self.model.output.weight, norm_weight=self.model.norm.weight, eps=eps,
                    config=tiles.get("head"))

    def _forward_matmul(self, x: torch.Tensor, cos, sin, caches, B: int, S: int,
                        logits_at: Optional[torch.Tensor]) -> torch.Tensor:
        """B * S tokens: x (B * S, hidden) -> logits (B * S, V), or (B, V) with logits_at."""
        cfg, eps = self.config, self.config.rms_norm_eps
        n_rot = cfg.num_attention_heads + cfg.num_key_value_heads
        norms = [L.attn_norm for L in self.layers[1:]] + [self.model.norm.weight]
        x, normed = add_rmsnorm(x, None, self.layers[0].attn_norm, eps)
        for i, L in enumerate(self.layers):
            qkv = F.linear(normed, L.wqkv)  # (B * S, Nq + 2 Nkv)
            rope_(qkv, cos, sin, n_rot, cfg.head_dim)
            h, normed = add_rmsnorm(x, F.linear(self._attention(qkv, i, caches, B, S), L.wo), L.ffn_norm, eps)
            down = F.linear(silu_mul(F.linear(normed, L.w13)), L.w2)
            x, normed = add_rmsnorm(h, down, norms[i], eps)  # next layer's input norm (final norm last)
        if logits_at is not None:
            rows = torch.arange(B, device=x.device) * S + logits_at  # (B,) flat row of each row's token
            normed = normed[rows]
        return F.linear(normed, self.model.output.weight)
