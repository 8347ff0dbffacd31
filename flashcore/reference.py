"""Plain-PyTorch attention over a (K, V, seq_lens) cache: the CPU path and the test oracle.

Same signature and semantics as :func:`flashcore.attention_with_kv_cache` (read its docstring for
the contract). Scores and softmax are computed in float32 (float64 for float64 inputs); the result
is cast back to ``q.dtype``.
"""
import math
from typing import Optional, Sequence

import torch

from flashcore.checks import check_attention_inputs, check_varlen_inputs


def attention_with_kv_cache(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    seq_lens: torch.Tensor,
    *,
    softmax_scale: Optional[float] = None,
    causal: bool = True,
    seq_lens_cpu: Optional[Sequence[int]] = None,
) -> torch.Tensor:
    check_attention_inputs(q, k, v, k_cache, v_cache, seq_lens, seq_lens_cpu)
    B, S_q, H_q, D = q.shape
    H_kv = k.shape[2]
    S_max = k_cache.shape[1]
    if softmax_scale is None:
        softmax_scale = 1.0 / math.sqrt(D)

    # -- append: rows [seq_lens[b], seq_lens[b] + S_q) of each cache row get the new keys/values --
    pos = seq_lens.long()[:, None] + torch.arange(S_q, device=q.device)  # (B, S_q)
    rows = torch.arange(B, device=q.device)[:, None].expand(B, S_q)  # (B, S_q)
    k_cache[rows, pos] = k
    v_cache[rows, pos] = v

    # -- attend over the filled part; on the CPU read only as far as the longest row reaches --
    kv_len = S_max
    if seq_lens.device.type == "cpu":
        kv_len = int(seq_lens.max()) + S_q
    compute_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    keys = k_cache[:, :kv_len].to(compute_dtype)  # (B, L, H_kv, D)
    values = v_cache[:, :kv_len].to(compute_dtype)
    group = H_q // H_kv
    keys = keys.repeat_interleave(group, dim=2)  # (B, L, H_q, D): query head h reads kv head h // group
    values = values.repeat_interleave(group, dim=2)

    key_pos = torch.arange(kv_len, device=q.device)  # (L,)
    if causal:
        last = pos  # query i of row b sees keys 0 .. seq_lens[b] + i
    else:
        last = (seq_lens.long() + S_q - 1)[:, None].expand(B, S_q)
    visible = key_pos[None, None, :] <= last[:, :, None]  # (B, S_q, L)
    # Slots past the fill may hold garbage (even inf/nan): zero them so no product can leak.
    filled = (key_pos[None, :] < (seq_lens.long() + S_q)[:, None])[:, :, None, None]  # (B, L, 1, 1)
    keys = torch.where(filled, keys, 0.0)
    values = torch.where(filled, values, 0.0)

    scores = torch.einsum("bqhd,bkhd->bhqk", q.to(compute_dtype), keys) * softmax_scale
    scores = scores.masked_fill(~visible[:, None, :, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1)  # (B, H_q, S_q, L)
    out = torch.einsum("bhqk,bkhd->bqhd", probs, values)
    return out.to(q.dtype)


def varlen_attention_with_kv_cache(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    tiles: torch.Tensor,
    *,
    softmax_scale: Optional[float] = None,
) -> torch.Tensor:
    """Same contract as :func:`flashcore.varlen_attention_with_kv_cache` (read it there)."""
    check_varlen_inputs(q, k, v, k_cache, v_cache, tiles)
    T, H_q, D = q.shape
    H_kv = k.shape[1]
    if softmax_scale is None:
        softmax_scale = 1.0 / math.sqrt(D)
    tiles = [tuple(t) for t in tiles.tolist() if t[1] > 0]
    for start, n, row, pos in tiles:  # every tile's keys and values first
        k_cache[row, pos: pos + n] = k[start: start + n]
        v_cache[row, pos: pos + n] = v[start: start + n]
    compute_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    out = torch.zeros(T, H_q, D, dtype=compute_dtype, device=q.device)
    group = H_q // H_kv
    for start, n, row, pos in tiles:
        keys = k_cache[row, : pos + n].to(compute_dtype).repeat_interleave(group, dim=1)  # (L, H_q, D)
        values = v_cache[row, : pos + n].to(compute_dtype).repeat_interleave(group, dim=1)
        scores = torch.einsum("qhd,khd->hqk", q[start: start + n].to(compute_dtype), keys) * softmax_scale
        visible = torch.arange(pos + n, device=q.device)[None, :] <= (pos + torch.arange(n, device=q.device))[:, None]
        scores = scores.masked_fill(~visible[None], float("-inf"))  # token i sees positions 0 .. pos + i
        out[start: start + n] = torch.einsum("hqk,khd->qhd", torch.softmax(scores, dim=-1), values)
    return out.to(q.dtype)
