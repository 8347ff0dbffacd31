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
"""
import math
from typing import Optional

import torch
from torch import nn

from minillama.backend import TorchBackend
from minillama.config import LlamaConfig
from minillama.kv_cache import KVCache, LayerCache
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


def rope_cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype):
    """cos, sin of shape (T, D) for integer positions (T,), computed in float32."""
    freqs = positions[:, None].float() * inv_freq  # (T, D/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (T, D): rotate-half layout
    return emb.cos().to(dtype), emb.sin().to(dtype)


class Attention(nn.Module):
    def __init__(self, config: LlamaConfig, backend):
        super().__init__()
        self.n_heads = config.num_attention_heads
        self.n_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        q, kv = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        self.wqkv = Linear(config.hidden_size, q + 2 * kv, config.attention_bias, backend, parts=(q, kv, kv))
        self.wo = Linear(q, config.hidden_size, config.attention_bias, backend)
        self.backend = backend

    def forward(self, x: torch.Tensor, norm: RMSNorm, cos, sin, cache: LayerCache) -> torch.Tensor:
        """x + wo(attention(norm(x))) for x (B, S, hidden)."""
        B, S, _ = x.shape
        H, H_kv, D = self.n_heads, self.n_kv_heads, self.head_dim
        qkv = self.wqkv(x, norm=norm)  # (B, S, (H + 2 H_kv) D): q heads, then k heads, then v heads
        self.backend.rope_(qkv.view(B * S, -1), cos, sin, H + H_kv, D)  # q and k heads, in place
        q = qkv[..., : H * D].view(B, S, H, D)
        k = qkv[..., H * D : (H + H_kv) * D].view(B, S, H_kv, D)
        v = qkv[..., (H + H_kv) * D :].view(B, S, H_kv, D)
        out = self.backend.attention(q, k, v, cache)  # (B, S, H, D); k, v appended at each row's fill
        return self.wo(out.reshape(B, S, H * D), residual=x)


class FeedForward(nn.Module):
    def __init__(self, config: LlamaConfig, backend):
        super().__init__()
        F_dim = config.intermediate_size
        self.w13 = GateUpLinear(config.hidden_size, 2 * F_dim, config.mlp_bias, backend, parts=(F_dim, F_dim))
        self.w2 = Linear(F_dim, config.hidden_size, config.mlp_bias, backend)

    def forward(self, x: torch.Tensor, norm: RMSNorm) -> torch.Tensor:
        """x + w2(silu(w1 norm(x)) * w3 norm(x)) for x (B, S, hidden)."""
        return self.w2(self.w13(x, norm=norm), residual=x)


class TransformerBlock(nn.Module):
    def __init__(self, config: LlamaConfig, backend):
        super().__init__()
        self.attention_norm = RMSNorm(config.hidden_size, config.rms_norm_eps, backend)
        self.attention = Attention(config, backend)
        self.ffn_norm = RMSNorm(config.hidden_size, config.rms_norm_eps, backend)
        self.feed_forward = FeedForward(config, backend)

    def forward(self, x, cos, sin, cache: LayerCache) -> torch.Tensor:
        h = self.attention(x, self.attention_norm, cos, sin, cache)  # x + attention(attention_norm(x))
        return self.feed_forward(h, self.ffn_norm)  # h + feed_forward(ffn_norm(h))


class Transformer(nn.Module):
    """The model. ``backend`` (``minillama.backend``) runs its ops; default plain PyTorch."""

    def __init__(self, config: LlamaConfig, backend=None):
        super().__init__()
        backend = backend or TorchBackend()
        self.config = config
        self.backend = backend
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(TransformerBlock(config, backend) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, backend)
        self.output = Linear(config.hidden_size, config.vocab_size, False, backend)
        if config.tie_word_embeddings:
            self.output.weight = self.tok_embeddings.weight
        self.register_buffer("inv_freq", rope_inv_freq(config), persistent=False)

    def forward(self, tokens: torch.Tensor, cache: Optional[KVCache] = None,
                logits_at: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Run S new tokens per row through the model.

        Args:
            tokens: (B, S) token ids.
            cache: a :class:`KVCache` of B rows; each row's new keys/values are written at its fill
                (``seq_lens``), which this call reads but never advances (the caller does, after).
                None: a fresh cache just large enough for ``tokens`` (no state kept; training).
            logits_at: optional (B,) index into S: return logits only there, shape (B, 1, V).
        Returns:
            logits (B, S, V) (or (B, 1, V) with ``logits_at``) in the model's dtype.
        """
        B, S = tokens.shape
        if cache is None:
            cache = KVCache.allocate(self.config, B, S, tokens.device, self.tok_embeddings.weight.dtype)
        positions = cache.seq_lens[:, None].long() + torch.arange(S, device=tokens.device)  # (B, S)
        h = self.tok_embeddings(tokens)  # (B, S, hidden)
        cos, sin = rope_cos_sin(positions.view(-1), self.inv_freq, h.dtype)  # (B * S, D)
        for i, layer in enumerate(self.layers):
            h = layer(h, cos, sin, cache.layer(i))
        if logits_at is not None:
            h = h[torch.arange(B, device=h.device), logits_at][:, None]  # (B, 1, hidden)
        return self.output(h, norm=self.norm)  # (B, S or 1, V): the head with the final norm fused
