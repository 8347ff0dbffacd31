"""An independent LLaMA 3.1 forward pass in plain PyTorch float64: the oracle for minillama's tests.

Written from the Hugging Face ``LlamaForCausalLM`` / Meta reference specification and sharing no
code with ``minillama``. It takes what a Hugging Face checkpoint folder holds -- the ``config.json``
dict and a state dict with HF tensor names -- and re-scores a whole token sequence at once: no KV
cache, full causal attention, every step in float64.

Conventions, stated once:
  * q/k are stored for the rotate-half RoPE layout (HF's): the first half of each head's dimensions
    pairs with the second half, frequency ``i`` acting on dims ``i`` and ``i + head_dim/2``.
  * GQA: query head ``h`` reads key/value head ``h // (n_heads // n_kv_heads)`` (HF ``repeat_kv``).
  * ``rope_scaling`` is ``None`` or rope_type ``llama3`` (Llama 3.1's smooth frequency scaling,
    as HF's ``_compute_llama3_parameters`` / Meta's ``apply_scaling``). Anything else raises.

References: Touvron et al. 2023 (LLaMA); Meta ``llama-models`` ``apply_scaling`` for 3.1;
HF ``transformers/models/llama/modeling_llama.py`` and ``modeling_rope_utils.py``.
"""
import math
from typing import Dict, List, NamedTuple, Sequence

import torch

Tensor = torch.Tensor

_QUERY_CHUNK = 1024  # queries per attention block, so (heads, chunk, len) scores stay small


def head_dim_of(config: dict) -> int:
    """head_dim from the config, defaulting to hidden_size / num_attention_heads as HF does."""
    head_dim = config.get("head_dim")
    if head_dim is None:
        head_dim = config["hidden_size"] // config["num_attention_heads"]
    return head_dim


def rope_inv_freq(config: dict, dtype: torch.dtype = torch.float64) -> Tensor:
    """Inverse frequencies of RoPE, (head_dim // 2,), computed in ``dtype``.

    ``dtype=torch.float32`` repeats HF's arithmetic op for op (HF computes these in float32), so the
    result equals ``LlamaRotaryEmbedding.inv_freq``; float64 gives the exact values of the formula.
    """
    dim = head_dim_of(config)
    base = float(config["rope_theta"])
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).to(dtype) / dim))
    scaling = config.get("rope_scaling")
    if scaling is None:
        return inv_freq
    rope_type = scaling.get("rope_type", scaling.get("type"))
    if rope_type != "llama3":
        raise NotImplementedError(f"reference supports rope_scaling null or llama3, got {rope_type!r}")
    factor = float(scaling["factor"])
    low_freq_factor = float(scaling["low_freq_factor"])
    high_freq_factor = float(scaling["high_freq_factor"])
    old_context_len = float(scaling["original_max_position_embeddings"])

    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    # Long wavelengths (low frequencies) are slowed down by `factor`; short ones are kept.
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    # In between, interpolate linearly in 1/wavelen between the two.
    smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def rope_cos_sin(config: dict, n_positions: int, rope_dtype: torch.dtype = torch.float64):
    """cos and sin tables, each (n_positions, head_dim) float64, for positions 0 .. n_positions - 1.

    ``rope_dtype`` is the dtype in which inverse frequencies and angles (position * inv_freq) are
    formed: float64 is the exact formula; float32 reproduces HF's (and Meta's) float32 angles, whose
    rounding reaches ~5e-4 rad at position 9000. cos/sin themselves are always taken in float64.
    """
    inv_freq = rope_inv_freq(config, rope_dtype)  # (D/2,)
    positions = torch.arange(n_positions, dtype=rope_dtype)  # (S,)
    angles = positions[:, None] * inv_freq[None, :]  # (S, D/2)
    angles = torch.cat([angles, angles], dim=-1).to(torch.float64)  # (S, D): rotate-half layout
    return angles.cos(), angles.sin()


def _rotate_half(x: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def _rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    return x * torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + eps) * weight


def _linear(x: Tensor, sd: Dict[str, Tensor], name: str, bias: bool) -> Tensor:
    y = x @ sd[name + ".weight"].T
    if bias:
        y = y + sd[name + ".bias"]
    return y


def _check_config(config: dict) -> None:
    if config.get("model_type", "llama") != "llama":
        raise ValueError(f"reference is for model_type llama, got {config['model_type']!r}")
    if config.get("hidden_act", "silu") != "silu":
        raise ValueError(f"reference supports hidden_act silu, got {config['hidden_act']!r}")
    if config["num_attention_heads"] % config["num_key_value_heads"]:
        raise ValueError(
            f"num_attention_heads {config['num_attention_heads']} is not a multiple of "
            f"num_key_value_heads {config['num_key_value_heads']}"
        )
    if head_dim_of(config) % 2:
        raise ValueError(f"head_dim must be even for RoPE, got {head_dim_of(config)}")


def _causal_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """q (H, S, D), k/v (H, S, D) already expanded to H heads -> (H, S, D); query i sees keys 0..i."""
    n_heads, seq_len, head_dim = q.shape
    out = torch.empty_like(q)
    key_pos = torch.arange(seq_len)
    for start in range(0, seq_len, _QUERY_CHUNK):
        stop = min(start + _QUERY_CHUNK, seq_len)  # queries start..stop-1 see keys 0..stop-1 at most
        scores = q[:, start:stop] @ k[:, :stop].transpose(1, 2) / math.sqrt(head_dim)  # (H, chunk, stop)
        future = key_pos[None, :stop] > torch.arange(start, stop)[:, None]  # (chunk, stop)
        scores = scores.masked_fill(future[None], float("-inf"))
        out[:, start:stop] = torch.softmax(scores, dim=-1) @ v[:, :stop]  # (H, chunk, D)
    return out


def forward(
    config: dict,
    state_dict: Dict[str, Tensor],
    token_ids: Sequence[int],
    *,
    rope_dtype: torch.dtype = torch.float64,
) -> Tensor:
    """Logits of every position of ``token_ids`` in one causal forward pass.

    Args:
        config: the contents of ``config.json`` (a LlamaForCausalLM config).
        state_dict: HF tensor names -> tensors (any float dtype; used in float64).
        token_ids: the sequence, starting at position 0.
        rope_dtype: dtype of RoPE angles, see :func:`rope_cos_sin`.
    Returns:
        (len(token_ids), vocab_size) float64 logits.
    """
    _check_config(config)
    sd = {name: t.to(torch.float64) for name, t in state_dict.items()}
    hidden = config["hidden_size"]
    n_heads = config["num_attention_heads"]
    n_kv_heads = config["num_key_value_heads"]
    head_dim = head_dim_of(config)
    group = n_heads // n_kv_heads
    eps = float(config["rms_norm_eps"])
    attn_bias = bool(config.get("attention_bias", False))
    mlp_bias = bool(config.get("mlp_bias", False))
    seq_len = len(token_ids)
    if seq_len == 0:
        raise ValueError("cannot forward an empty sequence")

    ids = torch.tensor(list(token_ids), dtype=torch.long)
    x = sd["model.embed_tokens.weight"][ids]  # (S, hidden)
    assert x.shape == (seq_len, hidden)
    cos, sin = rope_cos_sin(config, seq_len, rope_dtype)  # (S, D) each

    for layer in range(config["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        # -- attention block --
        h = _rms_norm(x, sd[p + "input_layernorm.weight"], eps)
        q = _linear(h, sd, p + "self_attn.q_proj", attn_bias)  # (S, H * D)
        k = _linear(h, sd, p + "self_attn.k_proj", attn_bias)  # (S, H_kv * D)
        v = _linear(h, sd, p + "self_attn.v_proj", attn_bias)
        q = q.view(seq_len, n_heads, head_dim).transpose(0, 1)  # (H, S, D)
        k = k.view(seq_len, n_kv_heads, head_dim).transpose(0, 1)  # (H_kv, S, D)
        v = v.view(seq_len, n_kv_heads, head_dim).transpose(0, 1)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        k = k.repeat_interleave(group, dim=0)  # (H, S, D): query head h reads kv head h // group
        v = v.repeat_interleave(group, dim=0)
        attn = _causal_attention(q, k, v)  # (H, S, D)
        attn = attn.transpose(0, 1).reshape(seq_len, n_heads * head_dim)  # (S, H * D)
        x = x + _linear(attn, sd, p + "self_attn.o_proj", attn_bias)
        # -- SwiGLU MLP block --
        h = _rms_norm(x, sd[p + "post_attention_layernorm.weight"], eps)
        gate = _linear(h, sd, p + "mlp.gate_proj", mlp_bias)  # (S, intermediate)
        up = _linear(h, sd, p + "mlp.up_proj", mlp_bias)
        x = x + _linear(torch.nn.functional.silu(gate) * up, sd, p + "mlp.down_proj", mlp_bias)

    x = _rms_norm(x, sd["model.norm.weight"], eps)
    if config.get("tie_word_embeddings", False):
        head = sd["model.embed_tokens.weight"]
    else:
        head = sd["lm_head.weight"]
    return x @ head.T  # (S, vocab)


class GreedyResult(NamedTuple):
    token_ids: List[int]  # new tokens only, the stop token excluded
    margins: List[float]  # top-1 minus top-2 logit at each step that chose a token
    finish_reason: str  # "stop" or "length"


def greedy_generate(
    config: dict,
    state_dict: Dict[str, Tensor],
    prompt_ids: Sequence[int],
    max_new_tokens: int,
    stop_ids: Sequence[int] = (),
    *,
    rope_dtype: torch.dtype = torch.float64,
) -> GreedyResult:
    """Greedy decoding that re-scores the whole sequence at every step (no cache, on purpose).

    Stops after ``max_new_tokens`` or when the argmax is in ``stop_ids`` (that token is not
    returned, but its margin is).
    """
    tokens = list(prompt_ids)
    new: List[int] = []
    margins: List[float] = []
    for _ in range(max_new_tokens):
        last = forward(config, state_dict, tokens, rope_dtype=rope_dtype)[-1]  # (vocab,)
        top2 = torch.topk(last, 2)
        margins.append(float(top2.values[0] - top2.values[1]))
        token = int(top2.indices[0])
        if token in stop_ids:
            return GreedyResult(new, margins, "stop")
        new.append(token)
        tokens.append(token)
    return GreedyResult(new, margins, "length")


def max_relative_error(actual: Tensor, expected: Tensor) -> float:
    """max |actual - expected| / max |expected|, both taken in float64."""
    actual = actual.to(torch.float64)
    expected = expected.to(torch.float64)
    return float((actual - expected).abs().max() / expected.abs().max())

