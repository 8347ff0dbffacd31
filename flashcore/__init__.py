"""flashcore: attention that appends new keys/values to a preallocated cache and attends over it.

One Triton kernel serves prefill and decode, GQA and causal masking, for rows of different lengths.
``flashcore.reference`` holds the plain-PyTorch version of the same contract (the CPU path and the
test oracle). flashcore knows nothing of minillama.
"""
import os
from typing import Optional, Sequence

import torch

from flashcore import reference
from flashcore.checks import check_attention_inputs

__all__ = ["attention_with_kv_cache", "reference", "IMPLEMENTATIONS", "resolve_implementation"]

IMPLEMENTATIONS = ("auto", "triton", "reference")
# Triton decides at import whether its kernels are interpreted; read the switch once, as it does.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def resolve_implementation(implementation: str, device: torch.device) -> str:
    """"triton" or "reference" for ``implementation`` on ``device``; ValueError where it cannot run.

    "auto" is the Triton kernel on CUDA and the reference elsewhere. "triton" on the CPU needs
    Triton's interpreter (``TRITON_INTERPRET=1`` set before Triton is imported; slow, for tests).
    """
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}")
    device = torch.device(device)
    if implementation == "auto":
        return "triton" if device.type == "cuda" else "reference"
    if implementation == "triton" and device.type != "cuda" and not (device.type == "cpu" and INTERPRET):
        raise ValueError(
            f"implementation='triton' cannot run on {device}: it needs a CUDA device, or TRITON_INTERPRET=1 "
            f"set before Triton is imported (Triton's interpreter on the CPU, slow); use 'auto' or 'reference'"
        )
    return implementation


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
    implementation: str = "auto",
) -> torch.Tensor:
    """Append ``k``/``v`` to the cache at each row's fill length, then attend ``q`` over the cache.

    Arguments:
        q: (B, S_q, H_q, D), the new tokens' queries (RoPE already applied).
        k, v: (B, S_q, H_kv, D), the new tokens' keys and values (RoPE already applied to k).
        k_cache, v_cache: (B, S_max, H_kv, D), same dtype and device as q. Rows
            ``[seq_lens[b], seq_lens[b] + S_q)`` are written in place with k/v; nothing else is
            written. Per-layer views of one (n_layers, B, S_max, H_kv, D) tensor work; the last
            dimension must be contiguous (stride 1), as it is in such views.
        seq_lens: (B,) int32 on q's device: tokens already cached in each row before this call.
            Read, never modified: the caller advances it once per forward, after all layers.
        softmax_scale: defaults to 1 / sqrt(D).
        causal: bottom-right aligned causal mask (see below). With ``causal=False`` every new
            query sees all ``seq_lens[b] + S_q`` filled positions of its row.
        seq_lens_cpu: optional host copy of seq_lens (list of ints). When given, the capacity check
            uses it, so a CUDA caller never syncs; when seq_lens is on the CPU it is checked itself.
        implementation: "triton" (the kernel), "reference" (plain PyTorch, ``flashcore.reference``)
            or "auto" (the kernel on CUDA, the reference elsewhere). "triton" on the CPU runs the
            kernel in Triton's interpreter and needs ``TRITON_INTERPRET=1`` (ValueError otherwise).

    Returns:
        (B, S_q, H_q, D) in q's dtype.

    Query i of row b attends to cache positions ``0 .. seq_lens[b] + i`` (causal). For example
    with seq_lens[b] = 2 and S_q = 3 (1 = attends, 0 = masked; columns are cache positions)::

            0 1 2 3 4
        q0  1 1 1 0 0
        q1  1 1 1 1 0
        q2  1 1 1 1 1

    GQA: query head h uses KV head ``h // (H_q // H_kv)``; H_kv = 1 (MQA) and H_kv = H_q (MHA)
    are the ends of that range. Cache slots at or past ``seq_lens[b] + S_q`` are never read and
    may hold garbage.

    Supported: float16, bfloat16, float32; head_dim 8 to 256; any S_q >= 1 and B >= 1.
    ``seq_lens[b] + S_q > S_max`` raises ValueError naming both numbers (checked on the host copy).

    Callers on a hot path resolve ``implementation`` once (:func:`resolve_implementation`) and
    pass "triton" or "reference"; nothing here reads the environment per call.
    """
    if resolve_implementation(implementation, q.device) == "reference":
        return reference.attention_with_kv_cache(
            q, k, v, k_cache, v_cache, seq_lens,
            softmax_scale=softmax_scale, causal=causal, seq_lens_cpu=seq_lens_cpu,
        )
    check_attention_inputs(q, k, v, k_cache, v_cache, seq_lens, seq_lens_cpu)
    from flashcore.triton_attention import triton_attention_with_kv_cache

    return triton_attention_with_kv_cache(q, k, v, k_cache, v_cache, seq_lens, softmax_scale, causal)
