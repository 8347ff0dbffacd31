"""LLaMA 3.1 in plain PyTorch: RMSNorm, RoPE (rotate-half layout, llama3 frequency scaling), GQA
attention over a (K, V, seq_lens) cache through flashcore, SwiGLU MLP.

References: Touvron et al. 2023 (LLaMA), Meta's llama-models `apply_scaling` for Llama 3.1 RoPE,
Hugging Face `modeling_llama.py` (the checkpoint layout this model reads).

Shapes: B batch, S new tokens, H_q query heads, H_kv key/value heads, D head_dim, V vocab.
Positions come from ``seq_lens`` (tokens already cached per row), never from a tensor's shape.
"""
import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

import flashcore
from minillama.config import LlamaConfig
from minillama.kv_cache import KVCache


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
    """cos, sin of shape (B, S, 1, D) for integer positions (B, S), computed in float32."""
    freqs = positions[..., None].float() * inv_freq  # (B, S, D/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (B, S, D): rotate-half layout
    return emb.cos()[:, :, None, :].to(dtype), emb.sin()[:, :, None, :].to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate (B, S, H, D) by position; HF layout: dims i and i + D/2 form a pair."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return x * cos + rotated * sin


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()  # accumulate in float32 whatever the model dtype
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


class Attention(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.n_heads = config.num_attention_heads
        self.n_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        bias = config.attention_bias
        self.wq = nn.Linear(config.hidden_size, self.n_heads * self.head_dim, bias=bias)
        self.wk = nn.Linear(config.hidden_size, self.n_kv_heads * self.head_dim, bias=bias)
        self.wv = nn.Linear(config.hidden_size, self.n_kv_heads * self.head_dim, bias=bias)
        self.wo = nn.Linear(self.n_heads * self.head_dim, config.hidden_size, bias=bias)

    def forward(self, x, cos, sin, k_cache, v_cache, seq_lens, seq_lens_cpu=None):
        B, S, _ = x.shape
        q = self.wq(x).view(B, S, self.n_heads, self.head_dim)  # (B, S, H_q, D)
        k = self.wk(x).view(B, S, self.n_kv_heads, self.head_dim)  # (B, S, H_kv, D)
        v = self.wv(x).view(B, S, self.n_kv_heads, self.head_dim)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        out = flashcore.attention_with_kv_cache(
            q, k, v, k_cache, v_cache, seq_lens, seq_lens_cpu=seq_lens_cpu
        )  # (B, S, H_q, D); k/v appended at each row's fill
        return self.wo(out.reshape(B, S, self.n_heads * self.head_dim))


class FeedForward(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        bias = config.mlp_bias
        self.w1 = nn.Linear(config.hidden_size, config.intermediate_size, bias=bias)  # gate
        self.w3 = nn.Linear(config.hidden_size, config.intermediate_size, bias=bias)  # up
        self.w2 = nn.Linear(config.intermediate_size, config.hidden_size, bias=bias)  # down

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.attention_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.attention = Attention(config)
        self.ffn_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.feed_forward = FeedForward(config)

    def forward(self, x, cos, sin, k_cache, v_cache, seq_lens, seq_lens_cpu=None):
        h = x + self.attention(self.attention_norm(x), cos, sin, k_cache, v_cache, seq_lens, seq_lens_cpu)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.config = config
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(TransformerBlock(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.output = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.output.weight = self.tok_embeddings.weight
        self.register_buffer("inv_freq", rope_inv_freq(config), persistent=False)

    def forward(
        self,
        tokens: torch.Tensor,
        k_cache: Optional[torch.Tensor] = None,
        v_cache: Optional[torch.Tensor] = None,
        seq_lens: Optional[torch.Tensor] = None,
        *,
        seq_lens_cpu: Optional[Sequence[int]] = None,
        logits_at: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """Run S new tokens per row through the model.

        Args:
            tokens: (B, S) token ids.
            k_cache, v_cache: (n_layers, B, S_max, H_kv, D), written in place at each row's fill.
                None: a fresh cache just large enough for ``tokens`` (no state kept; training).
            seq_lens: (B,) int32, tokens already cached per row (positions start there). The caller
                advances it after this call; the model never does.
            seq_lens_cpu: optional host copy of seq_lens, for capacity checks without a device sync.
            logits_at: optional (B,) index into S: return logits only there, shape (B, 1, V).
        Returns:
            logits (B, S, V) (or (B, 1, V) with ``logits_at``) in the model's dtype.
        """
        B, S = tokens.shape
        if k_cache is None:
            cache = KVCache.allocate(self.config, B, S, tokens.device, self.tok_embeddings.weight.dtype)
            k_cache, v_cache, seq_lens, seq_lens_cpu = cache.k, cache.v, cache.seq_lens, cache.lengths
        positions = seq_lens[:, None].long() + torch.arange(S, device=tokens.device)  # (B, S)
        h = self.tok_embeddings(tokens)  # (B, S, hidden)
        cos, sin = rope_cos_sin(positions, self.inv_freq, h.dtype)
        for i, layer in enumerate(self.layers):
            h = layer(h, cos, sin, k_cache[i], v_cache[i], seq_lens, seq_lens_cpu)
        if logits_at is not None:
            h = h[torch.arange(B, device=h.device), logits_at][:, None]  # (B, 1, hidden)
        return self.output(self.norm(h))
