"""Input validation shared by the Triton path and the reference: errors name the value and the fix."""
from typing import Optional, Sequence

import torch

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_attention_inputs(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    seq_lens: torch.Tensor,
    seq_lens_cpu: Optional[Sequence[int]] = None,
) -> None:
    if q.dim() != 4:
        raise ValueError(f"q must be (B, S_q, H_q, D), got shape {tuple(q.shape)}")
    B, S_q, H_q, D = q.shape
    if k_cache.dim() != 4:
        raise ValueError(f"k_cache must be (B, S_max, H_kv, D), got shape {tuple(k_cache.shape)}")
    S_max, H_kv = k_cache.shape[1], k_cache.shape[2]
    if tuple(k.shape) != (B, S_q, H_kv, D) or tuple(v.shape) != tuple(k.shape):
        raise ValueError(
            f"k and v must be (B, S_q, H_kv, D) = {(B, S_q, H_kv, D)}, got {tuple(k.shape)} and {tuple(v.shape)}"
        )
    if tuple(k_cache.shape) != (B, S_max, H_kv, D) or tuple(v_cache.shape) != tuple(k_cache.shape):
        raise ValueError(
            f"k_cache and v_cache must be (B, S_max, H_kv, D) with B={B}, D={D}, "
            f"got {tuple(k_cache.shape)} and {tuple(v_cache.shape)}"
        )
    if S_q == 0:
        raise ValueError("S_q is 0: pass at least one new token")
    if B == 0:
        raise ValueError("B is 0: pass at least one cache row")
    _check_heads_dtypes_devices(q, k, v, k_cache, v_cache, H_q, H_kv, D)
    if seq_lens.dtype != torch.int32 or tuple(seq_lens.shape) != (B,):
        raise ValueError(f"seq_lens must be int32 of shape ({B},), got {seq_lens.dtype} {tuple(seq_lens.shape)}")
    if seq_lens.device != q.device:
        raise ValueError(f"seq_lens is on {seq_lens.device} but q is on {q.device}: keep it on the same device")
    check_capacity(seq_lens, seq_lens_cpu, B, S_q, S_max)


def check_capacity(seq_lens: torch.Tensor, seq_lens_cpu: Optional[Sequence[int]], B: int, S_q: int, S_max: int) -> None:
    """Every row's fill plus the S_q new tokens fits the cache, checked on the host copy of the fills
    (seq_lens itself where it lives on the CPU; nothing where neither is on the host)."""
    if seq_lens_cpu is not None:
        lens = [int(x) for x in seq_lens_cpu]
    elif seq_lens.device.type == "cpu":
        lens = seq_lens.tolist()
    else:
        return  # no host copy given: checking the device tensor would force a sync
    if len(lens) != B:
        raise ValueError(f"seq_lens_cpu has {len(lens)} entries but the batch is {B}")
    for b, n in enumerate(lens):
        if n < 0:
            raise ValueError(f"seq_lens[{b}] is {n}: cache fill lengths cannot be negative")
        if n + S_q > S_max:
            raise ValueError(
                f"row {b}: {n} cached + {S_q} new tokens = {n + S_q} exceeds the cache capacity S_max={S_max}; "
                f"allocate a larger cache"
            )


def check_varlen_inputs(q, k, v, k_cache, v_cache, tiles) -> None:
    """Shapes, dtypes and devices of :func:`flashcore.varlen_attention_with_kv_cache` (never the
    tiles' contents: they live on the device)."""
    if q.dim() != 3:
        raise ValueError(f"q must be (T, H_q, D), got shape {tuple(q.shape)}")
    T, H_q, D = q.shape
    if k_cache.dim() != 4:
        raise ValueError(f"k_cache must be (B, S_max, H_kv, D), got shape {tuple(k_cache.shape)}")
    H_kv = k_cache.shape[2]
    if tuple(k.shape) != (T, H_kv, D) or tuple(v.shape) != tuple(k.shape):
        raise ValueError(f"k and v must be (T, H_kv, D) = {(T, H_kv, D)}, got {tuple(k.shape)} and {tuple(v.shape)}")
    if k_cache.shape[3] != D or tuple(v_cache.shape) != tuple(k_cache.shape):
        raise ValueError(f"k_cache and v_cache must be (B, S_max, H_kv, D) with D={D}, "
                         f"got {tuple(k_cache.shape)} and {tuple(v_cache.shape)}")
    _check_heads_dtypes_devices(q, k, v, k_cache, v_cache, H_q, H_kv, D)
    if tiles.dim() != 2 or tiles.shape[1] != 4 or tiles.dtype != torch.int64:
        raise ValueError(f"tiles must be int64 of shape (n, 4), got {tiles.dtype} {tuple(tiles.shape)}")
    if tiles.device != q.device:
        raise ValueError(f"tiles is on {tiles.device} but q is on {q.device}: keep it on the same device")


def _check_heads_dtypes_devices(q, k, v, k_cache, v_cache, H_q: int, H_kv: int, D: int) -> None:
    """What both contracts require of the head counts, dtypes, devices and head_dim."""
    if H_kv == 0 or H_q % H_kv != 0:
        raise ValueError(f"H_q={H_q} must be a multiple of H_kv={H_kv} (GQA groups query heads evenly)")
    if q.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"dtype {q.dtype} is not supported; use float16, bfloat16 or float32")
    for name, t in (("k", k), ("v", v), ("k_cache", k_cache), ("v_cache", v_cache)):
        if t.dtype != q.dtype:
            raise ValueError(f"{name} has dtype {t.dtype} but q has {q.dtype}: cast them to one dtype")
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}")
    if not 8 <= D <= 256:
        raise ValueError(f"head_dim {D} is not supported: it must be between 8 and 256")
