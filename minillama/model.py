"""LLaMA 3.1: RMSNorm, RoPE (rotate-half layout, llama3 frequency scaling), GQA attention over a
(K, V, seq_lens) cache through flashcore, SwiGLU MLP. The one forward: every backend, fast path,
quantized or parallel layer runs through these modules.

References: Touvron et al. 2023 (LLaMA), Meta's llama-models `apply_scaling` for Llama 3.1 RoPE,
Hugging Face `modeling_llama.py` (the checkpoint layout this model reads; q/k in the rotate-half
layout, so no permutation).

Shapes: B batch, S new tokens, H_q query heads, H_kv key/value heads, D head_dim, V vocab.
Positions come from ``seq_lens`` (tokens already cached per row), never from a tensor's shape.
q/k/v are one fused projection and gate/up another (``wqkv``, ``w13``), filled at load time from
the checkpoint's separate tensors (``minillama.weights``).

A forward runs T new tokens flattened to (T, hidden): every projection, norm and SwiGLU runs once
over all of them, so each weight is read once per forward. Two layouts say where the tokens sit in
the cache, and only attention differs between them: :class:`Rows` (S new tokens on each of B rows,
at each row's fill: ``forward``; flashcore's (K, V, seq_lens) kernel) and :class:`Packed` (each
row its own count at its own position, e.g. a continuous-batching step's decoding rows with prompt
chunks: ``forward_packed``; flashcore's varlen kernel, whose metadata live on the device so that
a CUDA graph can replay the step).
"""
import math
from typing import NamedTuple, Optional

import torch
from torch import nn

from minillama.backend import Rope, TorchBackend
from minillama.config import LlamaConfig
from minillama.kv_cache import KVCache
from minillama.layers import GateUpLinear, Linear, RMSNorm


def rope_inv_freq(config: LlamaConfig) -> torch.Tensor:
    """Inverse RoPE frequencies (D/2,) in float32, with Llama 3.1's scaling when configured."""
    D = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, D, 2, dtype=torch.int64).float() / D))
    if config.rope_scaling is None:
        return inv_freq
    s = config.rope_scaling
    factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    old_len = s["original_max_position_embeddings"]
    low_freq_wavelen = old_len / low
    high_freq_wavelen = old_len / high
    wavelen = 2 * math.pi / inv_freq
    # long wavelengths are slowed by `factor`, short ones kept, the band between interpolated
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


class Rows(NamedTuple):
    """Layout of :meth:`Transformer.forward`: S new tokens on each of B cache rows, at each row's
    fill, flattened (B, S) row-major. Attention runs flashcore's (K, V, seq_lens) kernel."""

    B: int
    S: int
    cache: KVCache  # B rows

    def attend(self, backend, q, k, v, layer: int) -> torch.Tensor:
        B, S = self.B, self.S
        o = backend.attention(q.view(B, S, *q.shape[1:]), k.view(B, S, *k.shape[1:]), v.view(B, S, *v.shape[1:]),
                              self.cache.layer(layer))
        return o.reshape(B * S, *q.shape[1:])


class Packed(NamedTuple):
    """Layout of :meth:`Transformer.forward_packed`: new tokens of several cache rows packed along one
    dimension, described by flashcore's varlen tiles. Attention runs flashcore's varlen kernel."""

    tiles: torch.Tensor  # (n, 4) int64 (start, length, row, position): flashcore.varlen_tiles
    cache: KVCache

    def attend(self, backend, q, k, v, layer: int) -> torch.Tensor:
        return backend.varlen_attention(q, k, v, self.cache.layer(layer), self.tiles)


class Attention(nn.Module):
    def __init__(self, config: LlamaConfig, backend, tp=None):
        super().__init__()
        n = tp.world_size if tp is not None else 1
        self.n_heads = config.num_attention_heads // n  # this rank's heads
        self.n_kv_heads = config.num_key_value_heads // n
        self.head_dim = D = config.head_dim
        q, kv = config.num_attention_heads * D, config.num_key_value_heads * D
        self.wqkv = Linear(config.hidden_size, q + 2 * kv, config.attention_bias, backend, parts=(q, kv, kv),
                           parallel="column", tp=tp)
        self.wo = Linear(q, config.hidden_size, config.attention_bias, backend, parallel="row", tp=tp, feeds_norm=True)
        self.backend = backend

    def forward(self, h, cos, sin, layout, layer: int) -> torch.Tensor:
        """wo(attention(h)) for the normed input h (T, hidden) of the new tokens in ``layout``
        (:class:`Rows` or :class:`Packed`), whose k, v are appended to layer ``layer``'s cache."""
        H, H_kv, D = self.n_heads, self.n_kv_heads, self.head_dim
        T = h.shape[0]
        # (T, (H + 2 H_kv) D): q heads, then k heads (rotated), then v heads
        qkv = self.wqkv(h, rope=Rope(cos, sin, H + H_kv, D))
        q = qkv[:, : H * D].view(T, H, D)
        k = qkv[:, H * D : (H + H_kv) * D].view(T, H_kv, D)
        v = qkv[:, (H + H_kv) * D :].view(T, H_kv, D)
        o = layout.attend(self.backend, q, k, v, layer)  # (T, H, D)
        return self.wo(o.reshape(T, H * D))  # (T, hidden)


class FeedForward(nn.Module):
    def __init__(self, config: LlamaConfig, backend, tp=None):
        super().__init__()
        F_dim = config.intermediate_size
        self.w13 = GateUpLinear(config.hidden_size, 2 * F_dim, config.mlp_bias, backend, parts=(F_dim, F_dim),
                                parallel="column", tp=tp)
        self.w2 = Linear(F_dim, config.hidden_size, config.mlp_bias, backend, parallel="row", tp=tp, feeds_norm=True)

    def forward(self, h) -> torch.Tensor:
        """w2(silu(w1 h) * w3 h) for the normed input h (T, hidden)."""
        return self.w2(self.w13(h))


class TransformerBlock(nn.Module):
    def __init__(self, config: LlamaConfig, backend, tp=None):
        super().__init__()
        self.attention_norm = RMSNorm(config.hidden_size, config.rms_norm_eps, backend)
        self.attention = Attention(config, backend, tp)
        self.ffn_norm = RMSNorm(config.hidden_size, config.rms_norm_eps, backend)
        self.feed_forward = FeedForward(config, backend, tp)

    def forward(self, x, residual, cos, sin, layout, layer: int):
        """x (T, hidden): the previous block's output, not yet added to the residual stream (None
        at the first)."""
        h, residual = self.attention_norm(x, residual)  # residual = x + residual; h = norm(residual)
        x = self.attention(h, cos, sin, layout, layer)
        h, residual = self.ffn_norm(x, residual)
        return self.feed_forward(h), residual


class Transformer(nn.Module):
    """The model. ``backend`` (``minillama.backend``) runs its ops; default plain PyTorch.
    ``tp`` (``minillama.parallel.TensorParallel``): this process's share of a tensor-parallel model."""

    def __init__(self, config: LlamaConfig, backend=None, tp=None):
        super().__init__()
        backend = backend or TorchBackend()
        self.config = config
        self.backend = backend
        self.tp = tp
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)  # replicated
        self.layers = nn.ModuleList(TransformerBlock(config, backend, tp) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, backend)
        n = tp.world_size if tp is not None else 1
        self.output = Linear(config.hidden_size, config.vocab_size, False, backend,
                             parallel="vocab" if config.vocab_size % n == 0 else None, tp=tp)
        self.tie_weights()
        self.register_buffer("inv_freq", rope_inv_freq(config), persistent=False)

    def tie_weights(self) -> None:
        """With tied embeddings the head is the embedding table (this rank's rows of it)."""
        if not self.config.tie_word_embeddings:
            return
        if self.output.parallel is None:
            self.output.weight = self.tok_embeddings.weight
        else:
            rows = self.output.out_features
            self.output.weight = nn.Parameter(self.tok_embeddings.weight.narrow(0, self.tp.rank * rows, rows),
                                              requires_grad=self.tok_embeddings.weight.requires_grad)

    def new_cache(self, batch: int, max_len: int) -> KVCache:
        """An empty cache of ``batch`` rows for this model (this rank's KV heads)."""
        weight = self.tok_embeddings.weight
        return KVCache.allocate(self.config, batch, max_len, weight.device, weight.dtype,
                                n_kv_heads=self.layers[0].attention.n_kv_heads)

    def forward(self, tokens: torch.Tensor, cache: Optional[KVCache] = None,
                logits_at: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Run S new tokens per row through the model.

        Args:
            tokens: (B, S) token ids.
            cache: a :class:`KVCache` of B rows; each row's new keys/values are written at its fill
                (``seq_lens``), which this call reads but never advances (the caller does, after).
                None: a fresh cache just large enough for ``tokens`` (no state kept; training).
            logits_at: optional (B,) index into S (on any device): return logits only there, shape
                (B, 1, V).
        Returns:
            logits (B, S, V) (or (B, 1, V) with ``logits_at``) in the model's dtype.
        """
        B, S = tokens.shape
        if cache is None:
            cache = self.new_cache(B, S)
        rows = None
        if logits_at is not None and S > 1:
            rows = torch.arange(B, device=tokens.device) * S + logits_at.to(tokens.device)  # (B,) into B * S tokens
        if S == 1:  # each row's one new token sits at its fill
            positions = cache.seq_lens  # (B,) int32
        else:
            positions = (cache.seq_lens[:, None].long() + torch.arange(S, device=tokens.device)).view(-1)  # (B S,)
        logits = self._forward(tokens.reshape(-1), positions, Rows(B, S, cache), rows)
        return logits.view(B, -1, logits.shape[-1])  # (B, S or 1, V)

    def forward_packed(self, tokens: torch.Tensor, positions: torch.Tensor, tiles: torch.Tensor, cache: KVCache,
                       logits_rows: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Run new tokens of several rows of ``cache``, each row its own count, in one pass (a
        continuous-batching step: decoding rows one token each, prompt chunks of other rows).
        Every weight is read once for all of them.

        Args:
            tokens: (T,) token ids, packed: each row's new tokens consecutive.
            positions: (T,) int64, each token's position in its row (its RoPE position and cache slot).
            tiles: (n, 4) int64 on the device: flashcore's varlen tiles (``flashcore.varlen_tiles``)
                naming, for each run of tokens, its row and first position; tokens outside every
                tile are padding (their results are meaningless and nothing of them is cached).
            cache: the pool the tiles' rows index; its ``seq_lens`` are neither read nor advanced.
            logits_rows: optional (N,) int64 indices into the T tokens: return logits only there.
        Returns:
            logits (N, V) (or (T, V) without ``logits_rows``) in the model's dtype.
        """
        return self._forward(tokens, positions, Packed(tiles, cache), logits_rows)

    def _forward(self, tokens, positions, layout, logits_rows) -> torch.Tensor:
        """The one forward: embeddings, the blocks (attention through ``layout``), norm and head."""
        # (T, hidden). Several rows by indexing, which gathers them in parallel: nn.Embedding's CUDA
        # kernel walks up to 16 indices one after another (13.7 us of a batch-16 decode step on the
        # H200; 2026-12-03, batch 16 +0.2-0.3% for every format); one row through nn.Embedding, as
        # fast or faster (batch 1: the indexing 0.1-0.2% slower). The same values either way.
        emb = self.tok_embeddings
        x = emb.weight[tokens] if tokens.numel() > 1 else emb(tokens)
        cos, sin = self.backend.rope_cos_sin(positions, self.inv_freq, x.dtype)  # (T, D)
        residual = None
        for i, layer in enumerate(self.layers):
            x, residual = layer(x, residual, cos, sin, layout, i)
        if logits_rows is not None:
            if logits_rows.numel() == 0:
                return residual.new_empty(0, self.config.vocab_size)
            x, residual = x[logits_rows], residual[logits_rows]  # (N, hidden)
        h, _ = self.norm(x, residual)
        return self.output(h)  # (T or N, V)
