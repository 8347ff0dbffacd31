"""Triton kernels for :func:`flashcore.attention_with_kv_cache` (append + attend in one launch) and
:func:`flashcore.varlen_attention_with_kv_cache` (append, then attend: two launches).

Two paths, one contract (read the public docstring in ``flashcore/__init__.py``):

* Prefill (many new queries): ``_attn_fwd_prefill``, FlashAttention-2 style. One program per
  (block of BLOCK_M queries, row, query head) walks the keys in BLOCK_N tiles with an online
  softmax. Heaviest causal blocks are launched first. On Hopper GPUs, causal prefill of rows with
  nothing cached, or of one row (known from ``seq_lens_cpu``), runs ``flashcore.hopper_attention``
  instead (Gluon, FlashAttention-3's schedule; the plan holds both and picks per call).
* Decode (S_q * group <= DECODE_MAX_ROWS): flash-decoding. One program per (kv split, row, kv head)
  packs the GQA group's query heads and the S_q new queries into the M dimension, so each K/V tile
  is loaded once per group; ``_attn_fwd_decode_reduce`` combines the partial (out, lse). The
  number of splits depends on shapes only (B, H_kv, S_max): one CUDA-graph capture serves every
  decode step, and splits past a row's fill do no work.

Varlen: ``_varlen_append`` copies every tile's new k/v to its cache slots, then
``_attn_fwd_varlen`` runs one program per (tile, kv head), packing the tile's tokens (16 at most)
and the GQA group's query heads into the M dimension as the decode kernel does, and walks the
row's cache up to the tile's last position (the tile's own positions causally masked). A tile
reads slots that other tiles' programs write (earlier tiles of the same row), hence two launches.

Race-free append in the same launch (the (K, V, seq_lens) kernels): positions ``< seq_lens[b]`` are read from the cache, positions
``seq_lens[b] + n`` (the new tokens) are read from ``k``/``v`` directly, and exactly one program per
(row, kv head, block of new tokens) copies its new rows into the cache. No program reads a cache
row that another program writes, so no ordering between programs is needed.

Numerics: scores are scaled by ``softmax_scale * log2(e)`` so the softmax uses exp2; the running
max ``m_i``, sum ``l_i`` and partial log-sum-exps are kept in that log2 domain, in float32. P is
cast to the input dtype for the second matmul (as FlashAttention does); accumulation is float32.
float32 inputs use IEEE float32 matmuls (no TF32). Masked keys are loaded as zeros (so garbage,
even inf/nan, in unfilled cache slots never reaches a product) and their scores are set to -inf.
Every query row sees at least key 0, so no row's maximum stays -inf.
"""
import math
from typing import NamedTuple, Optional, Tuple

import torch
import triton
import triton.language as tl

from flashcore import INTERPRET, hopper_attention  # INTERPRET: Triton's interpreter switch, read once at import
from flashcore.checks import check_attention_inputs, check_capacity, check_varlen_inputs
from flashcore.launch import Launch, current_stream, dependent_launch_supported

LOG2E = 1.4426950408889634  # 1 / ln(2): exp(x) = exp2(x * LOG2E)
DECODE_MAX_ROWS = 64  # S_q * group up to this many rows runs the split-KV decode kernel


class KernelConfig(NamedTuple):
    block_m: int  # prefill: queries per program; decode: ignored (rows = S_q * group, padded)
    block_n: int  # keys per tile
    num_warps: int
    num_stages: int


@triton.jit
def _load_rows(ptrs, row_mask, offs_d, MASK_ROWS: tl.constexpr, HEAD_DIM: tl.constexpr,
               BLOCK_D: tl.constexpr, UPCAST: tl.constexpr):
    # Rows outside row_mask and the head-dim padding load as 0.
    if MASK_ROWS:
        if HEAD_DIM == BLOCK_D:
            x = tl.load(ptrs, mask=row_mask[:, None], other=0.0)
        else:
            x = tl.load(ptrs, mask=row_mask[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)
    else:
        if HEAD_DIM == BLOCK_D:
            x = tl.load(ptrs)
        else:
            x = tl.load(ptrs, mask=offs_d[None, :] < HEAD_DIM, other=0.0)
    if UPCAST:  # Triton's interpreter computes bfloat16 wrongly: work in float32 there
        x = x.to(tl.float32)
    return x


@triton.jit
def _softmax_step(acc, l_i, m_i, qk, v, qk_scale, INPUT_PRECISION: tl.constexpr):
    """One step of the online softmax (log2 domain): fold a tile's scores qk (masked keys -inf)
    and its values v into (acc, l_i, m_i)."""
    m_ij = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
    p = tl.math.exp2(qk * qk_scale - m_ij[:, None])
    alpha = tl.math.exp2(m_i - m_ij)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    acc = tl.dot(p.to(v.dtype), v, acc, input_precision=INPUT_PRECISION)
    return acc, l_i, m_ij


@triton.jit
def _attn_fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_vn,
                    lo, hi, n_end, offs_i, offs_n, offs_d, qk_scale,
                    BOUNDS: tl.constexpr, CAUSAL: tl.constexpr, HEAD_DIM: tl.constexpr,
                    BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, UPCAST: tl.constexpr,
                    INPUT_PRECISION: tl.constexpr):
    """Online softmax over key tiles [lo, hi) of one source (cache or new k/v).

    BOUNDS masks keys at or past n_end; CAUSAL masks key n for query rows with offs_i < n (both in
    the new tokens' numbering). Tiles without either flag are loaded unmasked.
    """
    for start_n in tl.range(lo, hi, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        offs_kv = start_n + offs_n
        kv_mask = offs_kv < n_end
        # -- compute qk --
        k = _load_rows(k_base + offs_kv[:, None] * stride_kn + offs_d[None, :], kv_mask, offs_d,
                       BOUNDS, HEAD_DIM, BLOCK_D, UPCAST)
        qk = tl.dot(q, tl.trans(k), input_precision=INPUT_PRECISION)
        if BOUNDS:
            qk = tl.where(kv_mask[None, :], qk, float("-inf"))
        if CAUSAL:
            qk = tl.where(offs_kv[None, :] <= offs_i[:, None], qk, float("-inf"))
        v = _load_rows(v_base + offs_kv[:, None] * stride_vn + offs_d[None, :], kv_mask, offs_d,
                       BOUNDS, HEAD_DIM, BLOCK_D, UPCAST)
        acc, l_i, m_i = _softmax_step(acc, l_i, m_i, qk, v, qk_scale, INPUT_PRECISION)
    return acc, l_i, m_i


@triton.jit
def _attn_fwd_prefill(
    Q, K, V, K_cache, V_cache, Seq_lens, Out, qk_scale,
    stride_qb, stride_qs, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_kcb, stride_kcs, stride_kch,
    stride_vcb, stride_vcs, stride_vch,
    stride_ob, stride_os, stride_oh,
    S_q, H_q,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
    UPCAST: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    tl.static_assert(BLOCK_M % BLOCK_N == 0)  # the causal diagonal band starts on a tile boundary
    # Reverse order: under causal masking the last query blocks do the most work, launch them first.
    start_m = (tl.num_programs(0) - 1 - tl.program_id(0)) * BLOCK_M
    pid_bh = tl.program_id(1)
    b = pid_bh // H_q
    h = pid_bh % H_q
    hk = h // GROUP
    b64 = b.to(tl.int64)
    seq_len = tl.load(Seq_lens + b)

    offs_m = start_m + tl.arange(0, BLOCK_M)  # query index among the new tokens
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    row_mask = offs_m < S_q
    k_new = K + b64 * stride_kb + hk * stride_kh
    v_new = V + b64 * stride_vb + hk * stride_vh
    k_old = K_cache + b64 * stride_kcb + hk * stride_kch
    v_old = V_cache + b64 * stride_vcb + hk * stride_vch

    # -- append: the group's first query head copies this block's new k/v rows into the cache --
    append_end = tl.where(h % GROUP == 0, S_q, 0)
    append_mask = offs_m < append_end
    k_rows = _load_rows(k_new + offs_m[:, None] * stride_ks + offs_d[None, :], append_mask, offs_d,
                        True, HEAD_DIM, BLOCK_D, False)
    tl.store(k_old + (seq_len + offs_m)[:, None] * stride_kcs + offs_d[None, :], k_rows,
             mask=append_mask[:, None] & (offs_d[None, :] < HEAD_DIM))
    v_rows = _load_rows(v_new + offs_m[:, None] * stride_vs + offs_d[None, :], append_mask, offs_d,
                        True, HEAD_DIM, BLOCK_D, False)
    tl.store(v_old + (seq_len + offs_m)[:, None] * stride_vcs + offs_d[None, :], v_rows,
             mask=append_mask[:, None] & (offs_d[None, :] < HEAD_DIM))

    q = _load_rows(Q + b64 * stride_qb + h * stride_qh + offs_m[:, None] * stride_qs + offs_d[None, :],
                   row_mask, offs_d, True, HEAD_DIM, BLOCK_D, UPCAST)
    m_i = tl.zeros([BLOCK_M], dtype=tl.float32) - float("inf")
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    # -- cached keys [0, seq_len): every new query sees all of them --
    cache_full = (seq_len // BLOCK_N) * BLOCK_N
    acc, l_i, m_i = _attn_fwd_inner(acc, l_i, m_i, q, k_old, v_old, stride_kcs, stride_vcs,
                                    0, cache_full, seq_len, offs_m, offs_n, offs_d, qk_scale,
                                    False, False, HEAD_DIM, BLOCK_D, BLOCK_N, UPCAST, INPUT_PRECISION)
    acc, l_i, m_i = _attn_fwd_inner(acc, l_i, m_i, q, k_old, v_old, stride_kcs, stride_vcs,
                                    cache_full, seq_len, seq_len, offs_m, offs_n, offs_d, qk_scale,
                                    True, False, HEAD_DIM, BLOCK_D, BLOCK_N, UPCAST, INPUT_PRECISION)
    # -- new keys n in [0, S_q) at cache position seq_len + n, read from k/v --
    if CAUSAL:
        # bottom-right alignment: query i sees new key n iff n <= i. Tiles left of the block's
        # diagonal band are fully visible; the band itself is masked.
        band_end = tl.minimum(start_m + BLOCK_M, S_q)
        acc, l_i, m_i = _attn_fwd_inner(acc, l_i, m_i, q, k_new, v_new, stride_ks, stride_vs,
                                        0, start_m, S_q, offs_m, offs_n, offs_d, qk_scale,
                                        False, False, HEAD_DIM, BLOCK_D, BLOCK_N, UPCAST, INPUT_PRECISION)
        acc, l_i, m_i = _attn_fwd_inner(acc, l_i, m_i, q, k_new, v_new, stride_ks, stride_vs,
                                        start_m, band_end, S_q, offs_m, offs_n, offs_d, qk_scale,
                                        True, True, HEAD_DIM, BLOCK_D, BLOCK_N, UPCAST, INPUT_PRECISION)
    else:
        new_full = (S_q // BLOCK_N) * BLOCK_N
        acc, l_i, m_i = _attn_fwd_inner(acc, l_i, m_i, q, k_new, v_new, stride_ks, stride_vs,
                                        0, new_full, S_q, offs_m, offs_n, offs_d, qk_scale,
                                        False, False, HEAD_DIM, BLOCK_D, BLOCK_N, UPCAST, INPUT_PRECISION)
        acc, l_i, m_i = _attn_fwd_inner(acc, l_i, m_i, q, k_new, v_new, stride_ks, stride_vs,
                                        new_full, S_q, S_q, offs_m, offs_n, offs_d, qk_scale,
                                        True, False, HEAD_DIM, BLOCK_D, BLOCK_N, UPCAST, INPUT_PRECISION)

    # -- epilogue --
    acc = acc / l_i[:, None]
    out_ptrs = Out + b64 * stride_ob + h * stride_oh + offs_m[:, None] * stride_os + offs_d[None, :]
    tl.store(out_ptrs, acc.to(Out.dtype.element_ty), mask=row_mask[:, None] & (offs_d[None, :] < HEAD_DIM))


@triton.jit
def _attn_fwd_decode_split(
    Q, K, V, K_cache, V_cache, Seq_lens, Part, Out, qk_scale,
    stride_qb, stride_qs, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_kcb, stride_kcs, stride_kch,
    stride_vcb, stride_vcs, stride_vch,
    stride_ob, stride_os, stride_oh,
    S_q, H_kv, Num_splits, New_split, Lse_offset,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_NEW: tl.constexpr, CAUSAL: tl.constexpr,
    DIRECT: tl.constexpr, UPCAST: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    # Programs 0 .. Num_splits-1 each take an even share of the cached tiles [0, seq_len); program
    # New_split takes the S_q <= BLOCK_NEW new keys and appends them to the cache: the last split's
    # (New_split == Num_splits - 1) or a program of its own (New_split == Num_splits, no cached
    # tiles). DIRECT (one program per (row, kv head)): write the output itself, no partials.
    # BLOCK_NEW == 1: one new key (S_q == 1), attended by elementwise products instead of a padded
    # 16-key tl.dot (the plan picks it where a split holds 4 or more cached tiles: see _DecodePlan).
    # Part (float32) holds the partial outputs (B * H_kv, parts, S_q * GROUP, HEAD_DIM), then from
    # Lse_offset on their log2-sum-exps (B * H_kv, parts, S_q * GROUP).
    split = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H_kv
    hk = pid_bh % H_kv
    b64 = b.to(tl.int64)
    seq_len = tl.load(Seq_lens + b)

    # Row r of the M dimension is query i = r // GROUP of the new tokens, head hk * GROUP + r % GROUP.
    offs_r = tl.arange(0, BLOCK_M)
    offs_i = offs_r // GROUP
    offs_h = hk * GROUP + offs_r % GROUP
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    num_rows = S_q * GROUP
    row_mask = offs_r < num_rows
    d_mask = offs_d[None, :] < HEAD_DIM
    k_old = K_cache + b64 * stride_kcb + hk * stride_kch
    v_old = V_cache + b64 * stride_vcb + hk * stride_vch

    q = _load_rows(Q + b64 * stride_qb + offs_i[:, None] * stride_qs + offs_h[:, None] * stride_qh + offs_d[None, :],
                   row_mask, offs_d, True, HEAD_DIM, BLOCK_D, UPCAST)
    # -- the new keys n in [0, S_q) are loaded first, so their latency hides behind the cached tiles --
    n_new = tl.where(split == New_split, S_q, 0)
    offs_new = tl.arange(0, BLOCK_NEW)
    new_mask = offs_new < n_new
    k_n = _load_rows(K + b64 * stride_kb + hk * stride_kh + offs_new[:, None] * stride_ks + offs_d[None, :],
                     new_mask, offs_d, True, HEAD_DIM, BLOCK_D, False)
    v_n = _load_rows(V + b64 * stride_vb + hk * stride_vh + offs_new[:, None] * stride_vs + offs_d[None, :],
                     new_mask, offs_d, True, HEAD_DIM, BLOCK_D, False)
    m_i = tl.zeros([BLOCK_M], dtype=tl.float32) - float("inf")
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    # -- cached keys: this split's tiles, in one loop with every tile masked at seq_len. A loop of full
    # tiles and then one for the partial last tile measured slower: the second loop's loads issue
    # only once the first has drained (H200, 2026-12-03: B=16, 512 cache slots 14.4-14.6 -> 13.5-13.7
    # us; B=8 11.0 -> 10.4; B=1, 8192 slots 15.4 -> 15.1-15.2) --
    tiles_per_split = tl.cdiv(tl.cdiv(seq_len, BLOCK_N), Num_splits)
    lo = split * tiles_per_split * BLOCK_N
    hi = tl.minimum(lo + tiles_per_split * BLOCK_N, seq_len)
    acc, l_i, m_i = _attn_fwd_inner(acc, l_i, m_i, q, k_old, v_old, stride_kcs, stride_vcs,
                                    lo, hi, seq_len, offs_i, offs_n, offs_d, qk_scale,
                                    True, False, HEAD_DIM, BLOCK_D, BLOCK_N, UPCAST, INPUT_PRECISION)

    # -- the new keys, at cache positions seq_len + n: append, then attend --
    if n_new > 0:
        tl.store(k_old + (seq_len + offs_new)[:, None] * stride_kcs + offs_d[None, :], k_n,
                 mask=new_mask[:, None] & d_mask)
        tl.store(v_old + (seq_len + offs_new)[:, None] * stride_vcs + offs_d[None, :], v_n,
                 mask=new_mask[:, None] & d_mask)
        if BLOCK_NEW == 1:  # one new key, seen by every query: its score and value by elementwise products
            qk = tl.sum(q.to(tl.float32) * k_n.to(tl.float32), 1) * qk_scale
            m_ij = tl.maximum(m_i, qk)
            p = tl.math.exp2(qk - m_ij)
            alpha = tl.math.exp2(m_i - m_ij)
            l_i = l_i * alpha + p
            acc = acc * alpha[:, None] + p[:, None] * v_n.to(tl.float32)
            m_i = m_ij
        else:
            if UPCAST:
                k_n = k_n.to(tl.float32)
                v_n = v_n.to(tl.float32)
            qk = tl.dot(q, tl.trans(k_n), input_precision=INPUT_PRECISION)
            visible = new_mask[None, :]
            if CAUSAL:
                visible = visible & (offs_new[None, :] <= offs_i[:, None])
            acc, l_i, m_i = _softmax_step(acc, l_i, m_i, tl.where(visible, qk, float("-inf")), v_n, qk_scale,
                                          INPUT_PRECISION)

    # -- epilogue: the output, or a normalized partial output and its log2-sum-exp (an empty split
    # gives (0, -inf)) --
    has_keys = l_i > 0
    acc = acc / tl.where(has_keys, l_i, 1.0)[:, None]
    if DIRECT:
        out_ptrs = Out + b64 * stride_ob + offs_i[:, None] * stride_os + offs_h[:, None] * stride_oh + offs_d[None, :]
        tl.store(out_ptrs, acc.to(Out.dtype.element_ty), mask=row_mask[:, None] & d_mask)
    else:
        lse = tl.where(has_keys, m_i + tl.math.log2(tl.where(has_keys, l_i, 1.0)), float("-inf"))
        part = pid_bh * tl.num_programs(0) + split
        tl.store(Part + Lse_offset + part * num_rows + offs_r, lse, mask=row_mask)
        tl.store(Part + (part * num_rows + offs_r)[:, None] * HEAD_DIM + offs_d[None, :], acc,
                 mask=row_mask[:, None] & d_mask)


@triton.jit
def _attn_fwd_decode_reduce(
    Part, Out,
    stride_ob, stride_os, stride_oh,
    S_q, H_kv, Num_parts, Lse_offset,
    GROUP: tl.constexpr, BLOCK_PARTS: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, DEPENDENT: tl.constexpr,
):
    # One program per (row, kv head, packed query row r): out = sum_s w_s o_s / sum_s w_s with
    # w_s = exp2(lse_s - max lse). One part holds the new keys (every query sees new key 0), so
    # max lse is finite. DEPENDENT: launched as a programmatic dependent (PDL) of the split kernel:
    # it lets the next kernel launch at once (that one waits in turn if it is a dependent), then
    # waits for the split grid to finish, its partials visible, before it reads any memory.
    if DEPENDENT:
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()
    num_rows = S_q * GROUP
    pid = tl.program_id(0)
    r = pid % num_rows
    pid_bh = pid // num_rows
    b = pid_bh // H_kv
    h = (pid_bh % H_kv) * GROUP + r % GROUP
    offs_p = tl.arange(0, BLOCK_PARTS)
    offs_d = tl.arange(0, BLOCK_D)
    p_mask = offs_p < Num_parts
    d_mask = offs_d < HEAD_DIM
    parts = pid_bh * Num_parts + offs_p
    lse = tl.load(Part + Lse_offset + parts * num_rows + r, mask=p_mask, other=float("-inf"))
    w = tl.math.exp2(lse - tl.max(lse, 0))
    o = tl.load(Part + (parts * num_rows + r)[:, None] * HEAD_DIM + offs_d[None, :],
                mask=p_mask[:, None] & d_mask[None, :], other=0.0)
    out = tl.sum(w[:, None] * o, 0) / tl.sum(w, 0)
    out_ptrs = Out + b.to(tl.int64) * stride_ob + (r // GROUP) * stride_os + h * stride_oh + offs_d
    tl.store(out_ptrs, out.to(Out.dtype.element_ty), mask=d_mask)


@triton.jit
def _load_tile(Tiles, tile):
    """One varlen tile's (start, length, row, position)."""
    base = Tiles + tile * 4
    return tl.load(base), tl.load(base + 1), tl.load(base + 2), tl.load(base + 3)


@triton.jit
def _varlen_append(
    K, V, K_cache, V_cache, Tiles,
    stride_kt, stride_kh, stride_vt, stride_vh,
    stride_kcb, stride_kcs, stride_kch,
    stride_vcb, stride_vcs, stride_vch,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, TILE: tl.constexpr,
):
    # One program per (tile, kv head): copy the tile's new k/v rows to their cache slots.
    tile = tl.program_id(0)
    hk = tl.program_id(1)
    start, n, row, pos = _load_tile(Tiles, tile)
    offs_i = tl.arange(0, TILE)
    offs_d = tl.arange(0, BLOCK_D)
    mask = offs_i < n
    store_mask = mask[:, None] & (offs_d[None, :] < HEAD_DIM)
    k_rows = _load_rows(K + (start + offs_i)[:, None] * stride_kt + hk * stride_kh + offs_d[None, :], mask, offs_d,
                        True, HEAD_DIM, BLOCK_D, False)
    tl.store(K_cache + row * stride_kcb + (pos + offs_i)[:, None] * stride_kcs + hk * stride_kch + offs_d[None, :],
             k_rows, mask=store_mask)
    v_rows = _load_rows(V + (start + offs_i)[:, None] * stride_vt + hk * stride_vh + offs_d[None, :], mask, offs_d,
                        True, HEAD_DIM, BLOCK_D, False)
    tl.store(V_cache + row * stride_vcb + (pos + offs_i)[:, None] * stride_vcs + hk * stride_vch + offs_d[None, :],
             v_rows, mask=store_mask)


@triton.jit
def _attn_fwd_varlen(
    Q, K_cache, V_cache, Tiles, Out, qk_scale,
    stride_qt, stride_qh,
    stride_kcb, stride_kcs, stride_kch,
    stride_vcb, stride_vcs, stride_vch,
    stride_ot, stride_oh,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    UPCAST: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    # One program per (tile, kv head) packs the tile's new tokens and the GQA group's query heads
    # into the M dimension (row r: token r // GROUP, head hk * GROUP + r % GROUP), as the decode
    # kernel does, and walks the row's cache: keys before the tile's first position unmasked, the
    # tile's own positions causally. The keys were appended by _varlen_append, launched before.
    tile = tl.program_id(0)
    hk = tl.program_id(1)
    start, n, row, pos = _load_tile(Tiles, tile)
    offs_r = tl.arange(0, BLOCK_M)
    offs_i = offs_r // GROUP
    offs_h = hk * GROUP + offs_r % GROUP
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    row_mask = offs_i < n
    q = _load_rows(Q + (start + offs_i)[:, None] * stride_qt + offs_h[:, None] * stride_qh + offs_d[None, :],
                   row_mask, offs_d, True, HEAD_DIM, BLOCK_D, UPCAST)
    m_i = tl.zeros([BLOCK_M], dtype=tl.float32) - float("inf")
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    k_base = K_cache + row * stride_kcb + hk * stride_kch
    v_base = V_cache + row * stride_vcb + hk * stride_vch
    end = tl.where(n > 0, pos + n, 0)  # a padding tile (n = 0) reads nothing
    full = tl.where(n > 0, (pos // BLOCK_N) * BLOCK_N, 0)
    offs_pos = pos + offs_i  # each packed row's query position
    acc, l_i, m_i = _attn_fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_kcs, stride_vcs,
                                    0, full, end, offs_pos, offs_n, offs_d, qk_scale,
                                    False, False, HEAD_DIM, BLOCK_D, BLOCK_N, UPCAST, INPUT_PRECISION)
    acc, l_i, m_i = _attn_fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_kcs, stride_vcs,
                                    full, end, end, offs_pos, offs_n, offs_d, qk_scale,
                                    True, True, HEAD_DIM, BLOCK_D, BLOCK_N, UPCAST, INPUT_PRECISION)
    acc = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    out_ptrs = Out + (start + offs_i)[:, None] * stride_ot + offs_h[:, None] * stride_oh + offs_d[None, :]
    tl.store(out_ptrs, acc.to(Out.dtype.element_ty), mask=row_mask[:, None] & (offs_d[None, :] < HEAD_DIM))


def _interpreting(device: torch.device) -> bool:
    return device.type == "cpu" and INTERPRET


def _block_d(head_dim: int) -> int:
    return max(16, triton.next_power_of_2(head_dim))  # tl.dot needs K >= 16 on the GPU


def _prefill_config(head_dim: int, dtype: torch.dtype, interpret: bool) -> KernelConfig:
    if interpret:  # the interpreter pays per loop iteration, not per element: few, large tiles
        return KernelConfig(block_m=32, block_n=32, num_warps=4, num_stages=1)
    # Keep q, the accumulator and the pipelined K/V tiles within registers and shared memory.
    if dtype == torch.float32 and head_dim > 128:
        return KernelConfig(block_m=32, block_n=32, num_warps=8, num_stages=1)
    if dtype == torch.float32 or head_dim > 128:
        return KernelConfig(block_m=64, block_n=32, num_warps=8 if head_dim > 128 else 4, num_stages=2)
    return KernelConfig(block_m=64, block_n=64, num_warps=4, num_stages=3)


def _decode_config(head_dim: int, dtype: torch.dtype, interpret: bool, batch_kv_heads: int,
                   s_max: int, num_sms: int) -> KernelConfig:
    """Tiles by shape only (never seq_lens), measured on the H200 (2026-12-02, Llama shapes, bf16, the
    candidates against each other in one process: BENCHMARKS.md, "flashcore decode: one program per SM"
    and, for more pairs than SMs, "Batched decode at 17-64 rows").

    Many (row, kv head) pairs (one program each). Up to one pair per SM: 4 warps, 64-key tiles, or
    128-key past 2048 cache slots (B=16, fill 512: 13.9 us; 8192 slots: 125.4). More pairs than SMs:
    2 warps and tiles small enough for every program to be on an SM at once, 64 keys up to two pairs
    per SM, 32 past that; 128-key tiles (one program per SM) took two waves there (B=20, 2114 slots:
    59.9 us against 46.1; B=64, 2114: 135.9 against 127.5; B=64 fill 512: 37.1 against 37.5 with 4
    warps; 8192 slots: within 0.5% of the best of 18 tilings at B=32 and 64). Few pairs (split):
    64-key tiles, pipelined 2 deep where a split holds at most two tiles, 4 deep from 16 (B=1, 32768
    slots: 38.8 us against 39.7 at 3), else 3."""
    if interpret:
        return KernelConfig(block_m=0, block_n=32, num_warps=4, num_stages=1)
    if dtype == torch.float32 or head_dim > 128:
        return KernelConfig(block_m=0, block_n=32, num_warps=4, num_stages=2)
    if batch_kv_heads > num_sms:
        block_n = 64 if batch_kv_heads <= 2 * num_sms else 32
        return KernelConfig(block_m=0, block_n=block_n, num_warps=2, num_stages=3)
    if 2 * batch_kv_heads >= num_sms:
        return KernelConfig(block_m=0, block_n=128 if s_max > 2048 else 64, num_warps=4, num_stages=3)
    splits = _num_splits(batch_kv_heads, s_max, 64, num_sms)
    tiles_per_split = triton.cdiv(triton.cdiv(s_max, 64), splits)
    stages = 2 if tiles_per_split <= 2 else 4 if tiles_per_split >= 16 else 3
    return KernelConfig(block_m=0, block_n=64, num_warps=4, num_stages=stages)


_SM_COUNTS = {}


def _dependent_launch(device: torch.device) -> bool:
    """Whether the decode reduce launches as a programmatic dependent: on Hopper or later, compiled.
    Whole batch-1 decode steps of Llama-3.1-8B at cache 512 (H200, 2026-12-03, interleaved, the
    GEMVs dependents too): fp8 388.0 -> 391.3 tok/s, bf16 250.4 -> 251.5, batch 16 unchanged,
    logits the same bits. Not kept (later that day, BENCHMARKS.md): the split kernel as a dependent
    (fp8 384.8; with its first cached tile loaded before its wait, 391.1 against 392.6, batch 16
    -1.2 to -1.8%); the split letting the reduce launch at its start (fp8 +0.5% at cache 512, -1.2%
    at 8192; flashcore's own decode at B=1 / 8192 1988-2008 against 2147-2193 GB/s)."""
    return dependent_launch_supported(device)


def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 2
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SM_COUNTS:
        _SM_COUNTS[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _SM_COUNTS[index]


def _num_splits(batch_kv_heads: int, s_max: int, block_n: int, num_sms: int) -> int:
    """KV splits per (row, kv head): about one program per SM, at least one tile per split.

    H200, 2026-12-02, Llama shapes: at B=1 16 splits (128 programs) took 7.3 us at 1024 cache slots
    (4 splits, the former rule of two programs per SM and four tiles per split: 9.9), 16.3 at 8192
    (32 splits: 17.0); at B=16 one split, without the reduce launch, 14.3 us at fill 512 (two: 16.5)
    and 126.9 at 8192 (130.3). Where the pairs fill only part of the SMs it can lose: B=9 at 8192
    slots 89.1 us in one split against 82.4 in three (B=10 and B=12 were faster in one). Depends on
    shapes only, never on seq_lens, so a captured CUDA graph stays valid.
    """
    by_occupancy = num_sms // batch_kv_heads
    by_length = triton.cdiv(s_max, block_n)
    return max(1, min(by_occupancy, by_length))


def _strides3(t: torch.Tensor):
    return t.stride(0), t.stride(1), t.stride(2)


def _input_precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


def _varlen_config(block_m: int, head_dim: int, dtype: torch.dtype, interpret: bool) -> KernelConfig:
    if interpret:
        return KernelConfig(block_m=block_m, block_n=32, num_warps=4, num_stages=1)
    if dtype == torch.float32 or head_dim > 128:
        return KernelConfig(block_m=block_m, block_n=32, num_warps=8 if block_m >= 128 else 4, num_stages=2)
    return KernelConfig(block_m=block_m, block_n=64, num_warps=8 if block_m >= 128 else 4, num_stages=3)


# -- Launch plans. A plan holds everything a call's launches need that depends on the inputs'
# layout only (shapes, strides, dtypes, 16-byte alignment of each pointer): grids, integer
# arguments, tilings, and the compiled kernels (flashcore.launch). The entry points key plans on
# exactly that layout, so an eager call costs a dictionary lookup, the output allocation and the
# launches (H200, 2026-12-01: an eager decode call took ~110 us of host time before plans). A plan's
# call takes the inputs' data_ptr()s where its caller has read them (the entry points do, for the
# key's alignment) and launches with those integers (flashcore.launch).


class _PrefillPlan:
    def __init__(self, q, k, v, k_cache, v_cache, softmax_scale: float, causal: bool, config: KernelConfig,
                 hopper: bool = True):
        B, S_q, H_q, D = q.shape
        # on Hopper, the fills it serves (one row, or fresh rows): the Gluon kernel (flashcore.hopper_attention)
        self.hopper = (hopper_attention.HopperPrefillPlan(q, k, v, k_cache, v_cache, softmax_scale, LOG2E)
                       if hopper and hopper_attention.supports(q, k, v, k_cache, v_cache, causal) else None)
        H_kv = k.shape[2]
        self.grid = (triton.cdiv(S_q, config.block_m), B * H_q, 1)
        self.ints = (softmax_scale * LOG2E, *_strides3(q), *_strides3(k), *_strides3(v), *_strides3(k_cache),
                     *_strides3(v_cache), *_strides3(torch.empty_like(q)), S_q, H_q)
        self.launch = Launch(
            _attn_fwd_prefill, num_warps=config.num_warps, num_stages=config.num_stages,
            GROUP=H_q // H_kv, HEAD_DIM=D, BLOCK_D=_block_d(D),
            BLOCK_M=config.block_m, BLOCK_N=config.block_n, CAUSAL=causal,
            UPCAST=_interpreting(q.device) and q.dtype == torch.bfloat16, INPUT_PRECISION=_input_precision(q.dtype),
        )

    def __call__(self, q, k, v, k_cache, v_cache, seq_lens, pointers: Optional[tuple] = None,
                 seq_lens_cpu=None) -> torch.Tensor:
        if self.hopper is not None and hopper_attention.serves(seq_lens_cpu, q.shape[1]):
            return self.hopper(q, k, v, k_cache, v_cache, seq_lens, seq_lens_cpu)
        out = torch.empty_like(q)  # q's strides where q is dense, else contiguous: as at planning
        self.launch(self.grid, q, k, v, k_cache, v_cache, seq_lens, out, *self.ints,
                    pointers=None if pointers is None else (*pointers, out.data_ptr()))
        return out


class _DecodePlan:
    def __init__(self, q, k, v, k_cache, v_cache, softmax_scale: float, causal: bool, config: KernelConfig,
                 num_splits: Optional[int] = None, new_keys_apart: bool = False):
        B, S_q, H_q, D = q.shape
        S_max, H_kv = k_cache.shape[1], k_cache.shape[2]
        group = H_q // H_kv
        if num_splits is None:
            num_splits = _num_splits(B * H_kv, S_max, config.block_n, _num_sms(q.device))
        num_rows = S_q * group
        # The new keys go to the last split (default): they load first and are attended last, so their
        # latency hides behind the cached tiles; with one split the program writes the output itself.
        new_split = num_splits if new_keys_apart else num_splits - 1
        num_parts = new_split + 1
        self.direct = num_parts == 1
        # One new key (decode) with splits of 4 or more cached tiles: the split kernel attends it by
        # elementwise products (BLOCK_NEW 1), not a tl.dot over a 16-key tile held through the loop.
        # H200, 2026-12-04, bf16, us per call at B=1 (16 splits), tl.dot -> elementwise: 4096 slots 11.7
        # -> 11.4, 8192 15.1-15.9 -> 15.2, 32768 40.2-40.8 -> 37.4-37.6; B=8, fill 512 (2 splits of 4
        # tiles) 11.65 -> 11.45. Slower where splits are short or there are none: B=1, fill 512 (8
        # splits of 1 tile) 6.03 -> 6.25, B=4 (2 tiles a split) 10.08 -> 10.29, one split (B=16, 1024
        # slots) 21.35 -> 21.63, B=32 (2 warps) 21.02 -> 21.43.
        tiles_per_split = triton.cdiv(triton.cdiv(S_max, config.block_n), num_splits)
        block_new = 1 if S_q == 1 and not self.direct and tiles_per_split >= 4 else max(16, triton.next_power_of_2(S_q))
        lse_offset = B * H_kv * num_parts * num_rows * D  # Part: the partial outputs, then their lse
        self.part_numel = 0 if self.direct else lse_offset + B * H_kv * num_parts * num_rows
        # The partials of one call are read by its reduce launch, the next kernel on the same stream,
        # so every call on a stream can reuse one workspace: one allocation less per call (4-9 us of
        # host time on the H200's host, 2026-12-01). Keyed by stream, so concurrent streams never share.
        self.parts: dict = {}
        out_strides = _strides3(torch.empty_like(q))
        block_d = _block_d(D)
        self.split_grid = (num_parts, B * H_kv, 1)
        self.split_ints = (softmax_scale * LOG2E, *_strides3(q), *_strides3(k), *_strides3(v), *_strides3(k_cache),
                           *_strides3(v_cache), *out_strides, S_q, H_kv, num_splits, new_split, lse_offset)
        self.split = Launch(
            _attn_fwd_decode_split, num_warps=config.num_warps, num_stages=config.num_stages,
            GROUP=group, HEAD_DIM=D, BLOCK_D=block_d,
            BLOCK_M=max(16, triton.next_power_of_2(num_rows)), BLOCK_N=config.block_n,
            BLOCK_NEW=block_new, CAUSAL=causal, DIRECT=self.direct,
            UPCAST=_interpreting(q.device) and q.dtype == torch.bfloat16, INPUT_PRECISION=_input_precision(q.dtype),
        )
        if not self.direct:
            self.reduce_grid = (B * H_kv * num_rows, 1, 1)
            self.reduce_ints = (*out_strides, S_q, H_kv, num_parts, lse_offset)
            dependent = _dependent_launch(q.device)
            self.reduce = Launch(_attn_fwd_decode_reduce, num_warps=4 if D >= 128 else 1, GROUP=group,
                                 BLOCK_PARTS=triton.next_power_of_2(num_parts), HEAD_DIM=D, BLOCK_D=block_d,
                                 DEPENDENT=dependent, launch_pdl=dependent)

    def __call__(self, q, k, v, k_cache, v_cache, seq_lens, pointers: Optional[tuple] = None,
                 seq_lens_cpu=None) -> torch.Tensor:
        out = torch.empty_like(q)  # q's strides where q is dense, else contiguous: as at planning
        if self.direct:
            self.split(self.split_grid, q, k, v, k_cache, v_cache, seq_lens, out, out, *self.split_ints,
                       pointers=None if pointers is None else (*pointers, out.data_ptr(), out.data_ptr()))
            return out
        stream = current_stream()
        part = self.parts.get(stream)
        if part is None:
            part = self.parts[stream] = q.new_empty(self.part_numel, dtype=torch.float32)
        split_pointers = reduce_pointers = None
        if pointers is not None:
            reduce_pointers = (part.data_ptr(), out.data_ptr())
            split_pointers = (*pointers, *reduce_pointers)
        self.split(self.split_grid, q, k, v, k_cache, v_cache, seq_lens, part, out, *self.split_ints, stream=stream,
                   pointers=split_pointers)
        self.reduce(self.reduce_grid, part, out, *self.reduce_ints, stream=stream, pointers=reduce_pointers)
        return out


class _VarlenPlan:
    def __init__(self, q, k, v, k_cache, v_cache, tiles, softmax_scale: float):
        from flashcore import VARLEN_TILE

        T, H_q, D = q.shape
        H_kv = k.shape[1]
        group = H_q // H_kv
        interpret = _interpreting(q.device)
        block_d = _block_d(D)
        self.grid = (tiles.shape[0], H_kv, 1)
        self.append_ints = (k.stride(0), k.stride(1), v.stride(0), v.stride(1), *_strides3(k_cache), *_strides3(v_cache))
        self.append = Launch(_varlen_append, num_warps=4, HEAD_DIM=D, BLOCK_D=block_d, TILE=VARLEN_TILE)
        config = _varlen_config(max(16, triton.next_power_of_2(VARLEN_TILE * group)), D, q.dtype, interpret)
        self.attend_ints = (softmax_scale * LOG2E, q.stride(0), q.stride(1), *_strides3(k_cache), *_strides3(v_cache),
                            *torch.empty_like(q).stride()[:2])
        self.attend = Launch(
            _attn_fwd_varlen, num_warps=config.num_warps, num_stages=config.num_stages,
            GROUP=group, HEAD_DIM=D, BLOCK_D=block_d, BLOCK_M=config.block_m, BLOCK_N=config.block_n,
            UPCAST=interpret and q.dtype == torch.bfloat16, INPUT_PRECISION=_input_precision(q.dtype),
        )

    def __call__(self, q, k, v, k_cache, v_cache, tiles, pointers: Optional[tuple] = None) -> torch.Tensor:
        out = torch.zeros_like(q)  # q's strides where q is dense, else contiguous: as at planning
        if self.grid[0] == 0:
            return out
        stream = current_stream()
        append_pointers = attend_pointers = None
        if pointers is not None:
            p_q, p_k, p_v, p_k_cache, p_v_cache, p_tiles = pointers
            append_pointers = (p_k, p_v, p_k_cache, p_v_cache, p_tiles)
            attend_pointers = (p_q, p_k_cache, p_v_cache, p_tiles, out.data_ptr())
        self.append(self.grid, k, v, k_cache, v_cache, tiles, *self.append_ints, stream=stream, pointers=append_pointers)
        self.attend(self.grid, q, k_cache, v_cache, tiles, out, *self.attend_ints, stream=stream,
                    pointers=attend_pointers)
        return out


_PLANS: dict = {}
_MAX_PLANS = 4096  # bounded: a process that meets more layouts (prompt lengths) starts over


def _layout(kind: str, tensors: tuple, options: tuple) -> Tuple[tuple, tuple]:
    """(key, pointers) of an entry point's six input tensors: the key is what decides a plan, the
    validity of the inputs' shapes and Triton's specialization of the launches (each tensor's
    shape, strides, dtype, device and 16-byte alignment, then the call's ``options``); the pointers
    are the tensors' data_ptr()s, for the launches. Written out rather than looped: this runs on
    every eager call."""
    a, b, c, d, e, f = tensors
    pointers = pa, pb, pc, pd, pe, pf = (a.data_ptr(), b.data_ptr(), c.data_ptr(), d.data_ptr(), e.data_ptr(),
                                         f.data_ptr())
    return (kind, a.shape, a.stride(), a.dtype, a.device, b.shape, b.stride(), b.dtype, b.device,
            c.shape, c.stride(), c.dtype, c.device, d.shape, d.stride(), d.dtype, d.device,
            e.shape, e.stride(), e.dtype, e.device, f.shape, f.stride(), f.dtype, f.device,
            pa % 16 == 0, pb % 16 == 0, pc % 16 == 0, pd % 16 == 0, pe % 16 == 0, pf % 16 == 0, *options), pointers


def _remember(key: tuple, plan):
    if len(_PLANS) >= _MAX_PLANS:
        _PLANS.clear()
    _PLANS[key] = plan
    return plan


def _check_cache_strides(k_cache: torch.Tensor, v_cache: torch.Tensor) -> None:
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        if t.stride(-1) != 1:
            raise ValueError(f"{name} must be contiguous in head_dim (stride {t.stride(-1)}): it is written in place")


def _check_kernel_dtype(q: torch.Tensor) -> None:
    """float64 is the reference's alone: the kernels keep their softmax state in float32, and
    Triton's compiler rejects them for float64 pointers (a CompilationError from the float64 dot
    results meeting that state); only the interpreter (numpy) ran them."""
    if q.dtype == torch.float64:
        raise ValueError("dtype torch.float64 is not supported by the Triton kernel (float16, bfloat16 or float32); "
                         "use implementation='reference' for float64")


def _launch_prefill(q, k, v, k_cache, v_cache, seq_lens, softmax_scale: float, causal: bool,
                    config: KernelConfig) -> torch.Tensor:
    """The prefill kernel with a given tiling (tests and sweeps; the entry point plans its own)."""
    return _PrefillPlan(q, k, v, k_cache, v_cache, softmax_scale, causal, config, hopper=False)(
        q, k, v, k_cache, v_cache, seq_lens)


def _launch_decode(q, k, v, k_cache, v_cache, seq_lens, softmax_scale: float, causal: bool,
                   config: KernelConfig, num_splits: Optional[int] = None,
                   new_keys_apart: bool = False) -> torch.Tensor:
    """The decode kernels with a given tiling and split (tests and sweeps)."""
    return _DecodePlan(q, k, v, k_cache, v_cache, softmax_scale, causal, config, num_splits,
                       new_keys_apart)(q, k, v, k_cache, v_cache, seq_lens)


def _attention_plan(q, k, v, k_cache, v_cache, softmax_scale: Optional[float], causal: bool):
    _check_cache_strides(k_cache, v_cache)
    D = q.shape[-1]
    scale = 1.0 / math.sqrt(D) if softmax_scale is None else softmax_scale
    interpret = _interpreting(q.device)
    if q.shape[1] * (q.shape[2] // k.shape[2]) <= DECODE_MAX_ROWS:
        config = _decode_config(D, q.dtype, interpret, q.shape[0] * k.shape[2], k_cache.shape[1], _num_sms(q.device))
        return _DecodePlan(q, k, v, k_cache, v_cache, scale, causal, config)
    return _PrefillPlan(q, k, v, k_cache, v_cache, scale, causal, _prefill_config(D, q.dtype, interpret))


def triton_attention_with_kv_cache(q, k, v, k_cache, v_cache, seq_lens, softmax_scale: Optional[float],
                                   causal: bool, seq_lens_cpu=None) -> torch.Tensor:
    """Kernel entry of :func:`flashcore.attention_with_kv_cache`. Inputs of a layout seen before
    were validated then (``flashcore.checks``); only the fills' capacity is checked every call.
    No host sync."""
    key, pointers = _layout("kv_cache", (q, k, v, k_cache, v_cache, seq_lens), (softmax_scale, causal))
    plan = _PLANS.get(key)
    if plan is None and (q.stride(-1) != 1 or k.stride(-1) != 1 or v.stride(-1) != 1
                         or seq_lens.dim() == 1 and seq_lens.stride(0) != 1):  # seq_lens[b] is read at Seq_lens + b
        q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
        seq_lens = seq_lens.contiguous()
        key, pointers = _layout("kv_cache", (q, k, v, k_cache, v_cache, seq_lens), (softmax_scale, causal))
        plan = _PLANS.get(key)
    if plan is None:
        check_attention_inputs(q, k, v, k_cache, v_cache, seq_lens, seq_lens_cpu)
        _check_kernel_dtype(q)
        plan = _remember(key, _attention_plan(q, k, v, k_cache, v_cache, softmax_scale, causal))
    elif seq_lens_cpu is not None or seq_lens.is_cpu:
        check_capacity(seq_lens, seq_lens_cpu, q.shape[0], q.shape[1], k_cache.shape[1])
    return plan(q, k, v, k_cache, v_cache, seq_lens, pointers, seq_lens_cpu)


def triton_varlen_attention_with_kv_cache(q, k, v, k_cache, v_cache, tiles, softmax_scale: Optional[float]):
    """Kernel entry of :func:`flashcore.varlen_attention_with_kv_cache`; inputs validated at the
    first call of their layout. Two launches: the append, then the attention (a tile reads slots
    that other tiles' programs write, so the writes must all land first). No host sync."""
    key, pointers = _layout("varlen", (q, k, v, k_cache, v_cache, tiles), (softmax_scale,))
    plan = _PLANS.get(key)
    if plan is None and (q.stride(-1) != 1 or k.stride(-1) != 1 or v.stride(-1) != 1 or not tiles.is_contiguous()):
        q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
        tiles = tiles.contiguous()
        key, pointers = _layout("varlen", (q, k, v, k_cache, v_cache, tiles), (softmax_scale,))
        plan = _PLANS.get(key)
    if plan is None:
        check_varlen_inputs(q, k, v, k_cache, v_cache, tiles)
        _check_kernel_dtype(q)
        _check_cache_strides(k_cache, v_cache)
        scale = 1.0 / math.sqrt(q.shape[-1]) if softmax_scale is None else softmax_scale
        plan = _remember(key, _VarlenPlan(q, k, v, k_cache, v_cache, tiles, scale))
    return plan(q, k, v, k_cache, v_cache, tiles, pointers)
