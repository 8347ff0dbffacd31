"""flashcore: attention that appends new keys/values to a preallocated cache and attends over it.

One Triton kernel serves prefill and decode, GQA and causal masking, for rows of different lengths
(``attention_with_kv_cache``: S_q new tokens on each row); another serves new tokens of several rows
packed along one dimension, each row its own count (``varlen_attention_with_kv_cache``), with its
metadata on the device so that a CUDA graph can replay it for any such step. On Hopper GPUs a Gluon
kernel (``flashcore.hopper_attention``) takes causal prefill of one row, or of rows with nothing cached yet.
``flashcore.reference`` holds the plain-PyTorch version of both contracts (the CPU path and the
test oracle). flashcore knows nothing of minillama.
"""
import functools
import os
from typing import List, Optional, Sequence, Tuple

import torch

from flashcore import reference

__all__ = ["attention_with_kv_cache", "varlen_attention_with_kv_cache", "varlen_tiles", "VARLEN_TILE", "reference",
           "IMPLEMENTATIONS", "resolve_implementation"]

IMPLEMENTATIONS = ("auto", "triton", "reference")
# Triton decides at import whether its kernels are interpreted; read the switch once, as it does.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
VARLEN_TILE = 16  # new tokens per tile of varlen_attention_with_kv_cache at most


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
            It also tells the kernel entry the fills before any launch: on Hopper, causal prefill
            of one row, or of rows with nothing cached, runs the Gluon kernel of
            ``flashcore.hopper_attention``.
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
    # "triton" on CUDA (what a hot path passes, resolved once) skips the resolving: ~1 us per call
    if not (implementation == "triton" and q.is_cuda) and resolve_implementation(implementation, q.device) != "triton":
        return reference.attention_with_kv_cache(
            q, k, v, k_cache, v_cache, seq_lens,
            softmax_scale=softmax_scale, causal=causal, seq_lens_cpu=seq_lens_cpu,
        )
    return _kernels().triton_attention_with_kv_cache(q, k, v, k_cache, v_cache, seq_lens, softmax_scale, causal,
                                                     seq_lens_cpu)


def varlen_tiles(spans: Sequence[Tuple[int, int, int, int]]) -> List[Tuple[int, int, int, int]]:
    """The tiles of :func:`varlen_attention_with_kv_cache` for ``spans``: each span
    ``(start, length, row, position)`` (tokens ``start .. start + length - 1`` of the packed
    tensors are the new tokens of cache row ``row`` at positions ``position ..``) cut into tiles of
    the same form, ``VARLEN_TILE`` tokens at most each."""
    tiles = []
    for start, length, row, position in spans:
        for i in range(0, length, VARLEN_TILE):
            tiles.append((start + i, min(VARLEN_TILE, length - i), row, position + i))
    return tiles


def varlen_attention_with_kv_cache(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    tiles: torch.Tensor,
    *,
    softmax_scale: Optional[float] = None,
    implementation: str = "auto",
) -> torch.Tensor:
    """Attention for new tokens of several cache rows packed along one dimension (each row its own
    number of new tokens at its own position): append their keys/values, then attend, causally.

    Arguments:
        q: (T, H_q, D), the packed new tokens' queries (RoPE applied).
        k, v: (T, H_kv, D), their keys (RoPE applied) and values.
        k_cache, v_cache: (B, S_max, H_kv, D), as for :func:`attention_with_kv_cache`.
        tiles: (n, 4) int64 on q's device, rows ``(start, length, row, position)``: tokens
            ``start .. start + length - 1`` are new tokens of cache row ``row`` at positions
            ``position ..``, with ``0 <= length <= VARLEN_TILE`` (build them with
            :func:`varlen_tiles`). Tiles of length 0 are ignored (padding, e.g. in a CUDA graph
            whose tile count is fixed). No two tiles may name the same cache slot, and
            ``position + length <= S_max``: the caller checks both on the host (the tiles live on
            the device, and reading them here would wait for it).
        softmax_scale: defaults to 1 / sqrt(D).
        implementation: as for :func:`attention_with_kv_cache`.

    Every tile's keys and values are first written to its cache slots; then token ``start + i``
    of a tile attends to positions ``0 .. position + i`` of its row: the row's earlier tokens, the
    new tokens of other tiles of the same row before it, and itself. Nothing else is read: slots
    past that may hold garbage. Tokens that no tile covers get zeros.

    Returns:
        (T, H_q, D) in q's dtype. Depends on shapes only besides the tensors' contents, so one CUDA
        graph capture serves every step of the same T and tile count.
    """
    if not (implementation == "triton" and q.is_cuda) and resolve_implementation(implementation, q.device) != "triton":
        return reference.varlen_attention_with_kv_cache(q, k, v, k_cache, v_cache, tiles,
                                                        softmax_scale=softmax_scale)
    return _kernels().triton_varlen_attention_with_kv_cache(q, k, v, k_cache, v_cache, tiles, softmax_scale)


@functools.cache
def _kernels():
    """``flashcore.triton_attention``, imported at the first kernel call (it imports Triton, which
    reads TRITON_INTERPRET then) and kept: an import statement costs ~1 us per eager call."""
    from flashcore import triton_attention

    return triton_attention
