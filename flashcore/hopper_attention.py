"""Causal prefill attention on Hopper GPUs, written in Gluon (Triton's lower-level language:
layouts, shared memory, barriers, wgmma and warp specialization by hand).

It computes what ``_attn_fwd_prefill`` computes, for fresh rows (every ``seq_lens[b] == 0``) or for
one row whatever it has cached (a long prompt's later chunks, a chat's next turn), known on the host
from ``seq_lens_cpu``: append the new keys/values to the cache, attend causally. FlashAttention-3's
schedule, without its persistent scheduler:

* one loader warp issues the TMA loads of Q and of a ring of K/V tiles (3 deep, 128 keys each):
  the row's cached tiles first, then the new ones;
* two consumer warpgroups own 64 query rows each of a 128-row block and share every K/V tile;
  registers move from the loader to them (``setmaxnreg``: 240 each, 24 for the loader);
* each consumer issues tile j's S = Q K^T together with tile j-1's O += P V, then runs tile j's
  softmax while they execute; the two consumers take turns issuing (two mbarriers), so one's
  exponentials run during the other's products ("ping-pong").

Measured on the H200 (BENCHMARKS.md, 2026-12-02, B=1, 32 query / 8 KV heads of 128, TFLOP/s of
causal attention over fresh rows): S=4096 536 (flashcore's Triton kernel 424, cuDNN 539), S=16384
702 (526, 656).

New keys are read from k/v, never from the cache (the cache slots are written by this launch: the
program of the group's first query head copies its block's 128 keys/values from shared memory to
the slots after the fill). Cached keys are read through descriptors of exactly the row's filled
slots: TMA fills the rest of the last cached tile with zeros, whose scores are masked, so whatever
the slots past the fill hold (nan, inf) never reaches a product. Keys past a row's end in the last
new tile are other rows' keys or TMA's zero fill, finite either way, and the causal mask hides them.

Gluon is experimental: where it is missing or its API differs, :data:`AVAILABLE` is False (with
:data:`UNAVAILABLE_REASON`) and the Triton kernel runs.
"""
from typing import Optional, Sequence

import torch
import triton

from flashcore.launch import Launch, compute_capability

try:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import mbarrier, tma, warpgroup_mma, warpgroup_mma_wait
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
    # the TMA load's name: async_copy_global_to_shared in Triton 3.6, async_load in later ones
    _tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared
    _warp_specialize = gl.warp_specialize
    AVAILABLE, UNAVAILABLE_REASON = True, None
except (ImportError, AttributeError) as e:  # an older Triton, or another Gluon API
    AVAILABLE, UNAVAILABLE_REASON = False, f"triton {triton.__version__} has no usable Gluon for Hopper: {e}"

HEAD_DIM = 128
BLOCK_M = 64  # query rows per consumer warpgroup (two per program)
BLOCK_N = 128  # keys per tile
STAGES = 3  # K/V tiles in flight
CONSUMER_REGS, LOADER_REGS, MAXNREG = 240, 24, 168  # 2 x 128 x 240 + 128 x 24 <= 64K registers
# Smaller calls run the Triton kernel: an eager call of this kernel costs ~35 us of host time (five
# TMA descriptors encoded per launch) against ~20 for the Triton kernel, and below about this many
# (query, key) pairs per head the GPU work takes less than that, so the host time is the call's.
# H200, 2026-12-02, eager calls back to back, one row of 32 query / 8 KV heads, (new, cached) tokens:
# this kernel slower at (1024, 0) 50 vs 39 us, (512, 512) 52 vs 27, (300, 1000) 52 vs 31; faster at
# (2048, 0) 92 vs 107, (300, 4000) 57 vs 82, (1024, 1024) 59 vs 72 (BENCHMARKS.md).
MIN_PAIRS = 1 << 20


if AVAILABLE:
    @gluon.jit
    def _loader(wg: gl.constexpr, q_desc, k_desc, v_desc, kc_desc, vc_desc, q_smem, k_smem, v_smem, bars, Out,
                K_cache, V_cache, strides, q_row, k_row, q_col, kv_col, S_q, seq_len, append, qk_scale):
        """Q's two 64-row tiles, then every K/V tile the block's queries see: the cached ones (through
        the caches' descriptors, which end at the fill: TMA zero-fills the rest of the last tile),
        then the new ones; each slot refilled once both consumers released it."""
        q_ready, k_ready, v_ready, kv_empty, turns = bars
        BM: gl.constexpr = q_desc.block_type.shape[0]
        BN: gl.constexpr = k_desc.block_type.shape[0]
        NUM_STAGES: gl.constexpr = k_smem.type.shape[0]
        start_m = q_row - k_row
        for i in gl.static_range(2):
            mbarrier.expect(q_ready.index(i), q_desc.block_type.nbytes)
            _tma_load(q_desc, [q_row + i * BM, q_col], q_ready.index(i), q_smem.index(i))
        n_cached = gl.cdiv(seq_len, BN)
        n_tiles = n_cached + gl.cdiv(gl.minimum(start_m + 2 * BM, S_q), BN)
        for j in range(n_tiles):
            slot = j % NUM_STAGES
            mbarrier.wait(kv_empty.index(slot), ((j // NUM_STAGES) & 1) ^ 1)  # a fresh barrier passes phase 1
            mbarrier.expect(k_ready.index(slot), k_desc.block_type.nbytes)
            mbarrier.expect(v_ready.index(slot), v_desc.block_type.nbytes)
            if j < n_cached:
                _tma_load(kc_desc, [j * BN, kv_col], k_ready.index(slot), k_smem.index(slot))
                _tma_load(vc_desc, [j * BN, kv_col], v_ready.index(slot), v_smem.index(slot))
            else:
                row = k_row + (j - n_cached) * BN
                _tma_load(k_desc, [row, kv_col], k_ready.index(slot), k_smem.index(slot))
                _tma_load(v_desc, [row, kv_col], v_ready.index(slot), v_smem.index(slot))

    @gluon.jit
    def _softmax_tile(s, m_i, l_i, qk_scale, offs_m, offs_n, n_start, n_end, MASK: gl.constexpr):
        """One tile's online-softmax step on raw scores s (m_i, l_i in the scaled log2 domain) of keys
        n_start + offs_n. MASK: 0 none, 1 causal (query offs_m sees new keys up to itself), 2 the
        keys from n_end on (past the cache's fill)."""
        if MASK == 1:
            s = gl.where(offs_m[:, None] >= (n_start + offs_n)[None, :], s, float("-inf"))
        if MASK == 2:
            s = gl.where((n_start + offs_n)[None, :] < n_end, s, float("-inf"))
        m_new = gl.maximum(m_i, gl.max(s, axis=1) * qk_scale)
        alpha = gl.exp2(m_i - m_new)
        p = gl.exp2(s * qk_scale - m_new[:, None])
        return p, alpha, m_new, l_i * alpha + gl.sum(p, axis=1)

    @gluon.jit
    def _softmax(s, m_i, l_i, qk_scale, offs_m, offs_n, j, n_cached, seq_len, first_masked, BN: gl.constexpr):
        """Tile j's softmax step: cached tiles first (keys j * BN ..), then new ones (keys (j - n_cached) * BN ..)."""
        if j < n_cached:
            if (j + 1) * BN > seq_len:  # the cached tile that ends past the fill
                p, alpha, m_i, l_i = _softmax_tile(s, m_i, l_i, qk_scale, offs_m, offs_n, j * BN, seq_len, 2)
            else:
                p, alpha, m_i, l_i = _softmax_tile(s, m_i, l_i, qk_scale, offs_m, offs_n, j * BN, seq_len, 0)
        elif j - n_cached >= first_masked:
            p, alpha, m_i, l_i = _softmax_tile(s, m_i, l_i, qk_scale, offs_m, offs_n, (j - n_cached) * BN, 0, 1)
        else:
            p, alpha, m_i, l_i = _softmax_tile(s, m_i, l_i, qk_scale, offs_m, offs_n, (j - n_cached) * BN, 0, 0)
        return p, alpha, m_i, l_i

    @gluon.jit
    def _append_rows(src, dst, keys, mine, cols, stride_s, layout: gl.constexpr):
        """Copy this warpgroup's rows (``mine``) of a K or V tile from shared memory to the cache."""
        x = src.load(layout)
        gl.store(dst + keys.to(gl.int64)[:, None] * stride_s + cols[None, :], x, mask=mine[:, None])

    @gluon.jit
    def _consumer(wg: gl.constexpr, q_desc, k_desc, v_desc, kc_desc, vc_desc, q_smem, k_smem, v_smem, bars, Out,
                  K_cache, V_cache, strides, q_row, k_row, q_col, kv_col, S_q, seq_len, append, qk_scale):
        q_ready, k_ready, v_ready, kv_empty, turns = bars
        stride_os, stride_kcs, stride_vcs, out_base, kc_base, vc_base = strides
        BM: gl.constexpr = q_desc.block_type.shape[0]
        D: gl.constexpr = q_desc.block_type.shape[1]
        BN: gl.constexpr = k_desc.block_type.shape[0]
        NUM_STAGES: gl.constexpr = k_smem.type.shape[0]
        dtype: gl.constexpr = q_desc.dtype
        s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                           instr_shape=[16, BN, 16])
        o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                           instr_shape=[16, D, 16])
        p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
        start_m = q_row - k_row
        row0 = start_m + wg * BM  # this warpgroup's first query (= key index of the diagonal)
        n_cached = gl.cdiv(seq_len, BN)
        n_tiles = n_cached + gl.cdiv(gl.minimum(row0 + BM, S_q), BN)
        first_masked = row0 // BN  # new tiles from here on reach past the warpgroup's first query
        offs_m = row0 + gl.arange(0, BM, layout=gl.SliceLayout(1, s_layout))
        offs_n = gl.arange(0, BN, layout=gl.SliceLayout(0, s_layout))
        m_i = gl.full([BM], float("-inf"), gl.float32, layout=gl.SliceLayout(1, s_layout))
        l_i = gl.zeros([BM], gl.float32, layout=gl.SliceLayout(1, s_layout))
        o = gl.zeros([BM, D], gl.float32, layout=o_layout)
        s_zero = gl.zeros([BM, BN], gl.float32, layout=s_layout)
        q = q_smem.index(wg)
        mbarrier.wait(q_ready.index(wg), 0)

        # turn 0: tile 0's scores
        mbarrier.wait(k_ready.index(0), 0)
        mbarrier.wait(turns.index(wg), 0)
        s = warpgroup_mma(q, k_smem.index(0).permute((1, 0)), s_zero, use_acc=False, is_async=True)
        mbarrier.arrive(turns.index(1 - wg), count=1)
        s = warpgroup_mma_wait(num_outstanding=0, deps=(s, ))
        p, alpha, m_i, l_i = _softmax(s, m_i, l_i, qk_scale, offs_m, offs_n, 0, n_cached, seq_len, first_masked, BN)
        p16 = gl.convert_layout(p.to(dtype), p_layout)
        # turn j: tile j's scores and tile j-1's P V, then tile j's softmax while they run
        for j in range(1, n_tiles):
            slot = j % NUM_STAGES
            prev = (j - 1) % NUM_STAGES
            mbarrier.wait(k_ready.index(slot), (j // NUM_STAGES) & 1)
            mbarrier.wait(turns.index(wg), j & 1)
            s = warpgroup_mma(q, k_smem.index(slot).permute((1, 0)), s_zero, use_acc=False, is_async=True)
            o = o * gl.convert_layout(alpha, gl.SliceLayout(1, o_layout))[:, None]
            mbarrier.wait(v_ready.index(prev), ((j - 1) // NUM_STAGES) & 1)
            o = warpgroup_mma(p16, v_smem.index(prev), o, is_async=True)
            mbarrier.arrive(turns.index(1 - wg), count=1)
            s = warpgroup_mma_wait(num_outstanding=1, deps=(s, ))
            p, alpha, m_i, l_i = _softmax(s, m_i, l_i, qk_scale, offs_m, offs_n, j, n_cached, seq_len, first_masked,
                                          BN)
            o, p16 = warpgroup_mma_wait(num_outstanding=0, deps=(o, p16))  # P's registers live until here
            mbarrier.arrive(kv_empty.index(prev), count=1)
            p16 = gl.convert_layout(p.to(dtype), p_layout)
        # turn n_tiles: the last tile's P V
        last = (n_tiles - 1) % NUM_STAGES
        mbarrier.wait(turns.index(wg), n_tiles & 1)
        o = o * gl.convert_layout(alpha, gl.SliceLayout(1, o_layout))[:, None]
        mbarrier.wait(v_ready.index(last), ((n_tiles - 1) // NUM_STAGES) & 1)
        o = warpgroup_mma(p16, v_smem.index(last), o, is_async=True)
        mbarrier.arrive(turns.index(1 - wg), count=1)
        o, p16 = warpgroup_mma_wait(num_outstanding=0, deps=(o, p16))

        # the last tile holds this block's new keys (BN == 2 * BM): this warpgroup's 64 go to the cache,
        # at the slots after the fill
        if append:
            copy_layout: gl.constexpr = gl.BlockedLayout([1, 8], [2, 16], [4, 1], [1, 0])
            tile_rows = gl.arange(0, BN, layout=gl.SliceLayout(1, copy_layout))
            cols = gl.arange(0, D, layout=gl.SliceLayout(0, copy_layout))
            keys = start_m + tile_rows
            mine = (tile_rows // BM == wg) & (keys < S_q)
            _append_rows(k_smem.index(last), K_cache + kc_base + kv_col, seq_len + keys, mine, cols, stride_kcs,
                         copy_layout)
            _append_rows(v_smem.index(last), V_cache + vc_base + kv_col, seq_len + keys, mine, cols, stride_vcs,
                         copy_layout)
        mbarrier.arrive(kv_empty.index(last), count=1)

        o = o / gl.convert_layout(l_i, gl.SliceLayout(1, o_layout))[:, None]
        rows_o = row0 + gl.arange(0, BM, layout=gl.SliceLayout(1, o_layout))
        cols_o = gl.arange(0, D, layout=gl.SliceLayout(0, o_layout))
        gl.store(Out + out_base + rows_o.to(gl.int64)[:, None] * stride_os + q_col + cols_o[None, :],
                 o.to(Out.dtype.element_ty), mask=(rows_o < S_q)[:, None])

    @gluon.jit
    def _attn_fwd_prefill_hopper(q_desc, k_desc, v_desc, kc_desc, vc_desc, Out, K_cache, V_cache, Seq_lens, qk_scale,
                                 stride_ob, stride_os, stride_kcb, stride_kcs, stride_vcb, stride_vcs,
                                 S_q, H_q, GROUP: gl.constexpr, NUM_STAGES: gl.constexpr,
                                 CONSUMER_REGS: gl.constexpr, LOADER_REGS: gl.constexpr):
        """Program (m, (b, h)): queries [m * 128, +128) of row b, head h; the heaviest blocks first.
        Tensors are 2-D views: q (B * S_q, H_q * D), k/v (B * S_q, H_kv * D) by TMA; out and the
        caches by pointer, head h's columns at h * D (the caches' head stride is D). The cached keys
        (a row's first Seq_lens[b] slots) are read by TMA through kc_desc / vc_desc: one row's
        (Seq_lens[b], H_kv * D) slots, which only a call of one row (B = 1) may have (the host sees
        to it)."""
        BM: gl.constexpr = q_desc.block_type.shape[0]
        D: gl.constexpr = q_desc.block_type.shape[1]
        pid_m = gl.num_programs(0) - 1 - gl.program_id(0)
        pid_bh = gl.program_id(1)
        b = pid_bh // H_q
        h = pid_bh % H_q
        start_m = pid_m * 2 * BM
        k_row = b * S_q
        q_row = k_row + start_m
        q_col = h * D
        kv_col = (h // GROUP) * D
        b64 = b.to(gl.int64)
        strides = (stride_os, stride_kcs, stride_vcs, b64 * stride_ob, b64 * stride_kcb, b64 * stride_vcb)
        append = h % GROUP == 0
        seq_len = gl.load(Seq_lens + b)

        q_smem = gl.allocate_shared_memory(q_desc.dtype, [2] + q_desc.block_type.shape, q_desc.layout)
        k_smem = gl.allocate_shared_memory(k_desc.dtype, [NUM_STAGES] + k_desc.block_type.shape, k_desc.layout)
        v_smem = gl.allocate_shared_memory(v_desc.dtype, [NUM_STAGES] + v_desc.block_type.shape, v_desc.layout)
        q_ready = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        turns = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        k_ready = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
        v_ready = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
        kv_empty = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(2):
            mbarrier.init(q_ready.index(i), count=1)
            mbarrier.init(turns.index(i), count=1)
        for i in gl.static_range(NUM_STAGES):
            mbarrier.init(k_ready.index(i), count=1)
            mbarrier.init(v_ready.index(i), count=1)
            mbarrier.init(kv_empty.index(i), count=2)  # both consumers release a tile
        mbarrier.arrive(turns.index(0), count=1)  # the first consumer issues first
        bars = (q_ready, k_ready, v_ready, kv_empty, turns)
        # Literal tuples: arguments built by concatenation in here lose their constexpr-ness.
        _warp_specialize([
            (_consumer, (0, q_desc, k_desc, v_desc, kc_desc, vc_desc, q_smem, k_smem, v_smem, bars, Out, K_cache,
                         V_cache, strides, q_row, k_row, q_col, kv_col, S_q, seq_len, append, qk_scale)),
            (_consumer, (1, q_desc, k_desc, v_desc, kc_desc, vc_desc, q_smem, k_smem, v_smem, bars, Out, K_cache,
                         V_cache, strides, q_row, k_row, q_col, kv_col, S_q, seq_len, append, qk_scale)),
            (_loader, (0, q_desc, k_desc, v_desc, kc_desc, vc_desc, q_smem, k_smem, v_smem, bars, Out, K_cache,
                       V_cache, strides, q_row, k_row, q_col, kv_col, S_q, seq_len, append, qk_scale)),
        ], [4, 1], [CONSUMER_REGS, LOADER_REGS])


def _rows_view_ok(t: torch.Tensor) -> bool:
    """t (B, S, H, D) is a 2-D (B * S, H * D) TMA view: heads contiguous, rows evenly strided,
    16-byte aligned."""
    B, S, H, D = t.shape
    return (t.stride(3) == 1 and t.stride(2) == D and (B == 1 or t.stride(0) == S * t.stride(1))
            and t.stride(1) * t.element_size() % 16 == 0 and t.data_ptr() % 16 == 0)


def _cache_view_ok(c: torch.Tensor) -> bool:
    """A cache (B, S_max, H_kv, D) whose rows are 2-D (S_max, H_kv * D) TMA views: heads
    contiguous, slots 16-byte aligned."""
    return (c.stride(3) == 1 and c.stride(2) == c.shape[3] and c.stride(1) * c.element_size() % 16 == 0
            and c.stride(0) * c.element_size() % 16 == 0 and c.data_ptr() % 16 == 0)


def supports(q, k, v, k_cache, v_cache, causal: bool) -> bool:
    """Whether this kernel runs the layout of these inputs (the fills are checked per call:
    :func:`serves`): Gluon on a Hopper GPU (sm_90), bf16/fp16, head_dim 128, causal, more queries
    than one warpgroup's block, TMA-ready views of q/k/v and of the caches' rows."""
    return (AVAILABLE and causal and q.is_cuda and q.dtype in (torch.bfloat16, torch.float16)
            and q.shape[-1] == HEAD_DIM and q.shape[1] > BLOCK_M
            and compute_capability(q.device)[0] == 9
            and all(_rows_view_ok(t) for t in (q, k, v)) and all(_cache_view_ok(c) for c in (k_cache, v_cache)))


def serves(seq_lens_cpu: Optional[Sequence[int]], S_q: int) -> bool:
    """Whether this kernel takes a call of S_q new tokens per row over these fills (host copy
    known): one row, whatever it holds (its cached keys are read through descriptors that end at
    its fill), or several with nothing cached; and at least MIN_PAIRS (query, key) pairs per head."""
    if seq_lens_cpu is None:
        return False
    if len(seq_lens_cpu) == 1:
        pairs = S_q * (seq_lens_cpu[0] + (S_q + 1) / 2)
    elif any(seq_lens_cpu):
        return False
    else:
        pairs = len(seq_lens_cpu) * S_q * (S_q + 1) / 2
    return pairs >= MIN_PAIRS


class HopperPrefillPlan:
    """A launch of :func:`_attn_fwd_prefill_hopper` for one layout (see flashcore.triton_attention).

    Everything but the data pointers and the fill is fixed by the layout, so it is computed here
    once: the grid, the integer arguments and each TMA descriptor's fields. A call makes its five
    descriptors from those fields without TensorDescriptor's checks (~2 us each on the H200's host,
    2026-12-02), which hold for every tensor of this layout: shapes and strides are the layout's,
    the 16-byte alignment of each pointer is part of the plan's key, and a cache descriptor's rows
    (the fill, at least 1) are within the cache's."""

    def __init__(self, q, k, v, k_cache, v_cache, softmax_scale: float, log2e: float):
        B, S_q, H_q, D = q.shape
        H_kv = k.shape[2]
        self.grid = (triton.cdiv(S_q, 2 * BLOCK_M), B * H_q, 1)
        gl_dtype = gl.bfloat16 if q.dtype == torch.bfloat16 else gl.float16
        q_layout = gl.NVMMASharedLayout.get_default_for([BLOCK_M, D], gl_dtype)
        kv_layout = gl.NVMMASharedLayout.get_default_for([BLOCK_N, D], gl_dtype)
        # TensorDescriptor's fields but its base, checked once (by TensorDescriptor itself)
        self.fields = tuple(self._fields(t[:1, :1] if cache else t, BLOCK_M if t is q else BLOCK_N,
                                         q_layout if t is q else kv_layout)
                            for t, cache in ((q, False), (k, False), (v, False), (k_cache, True), (v_cache, True)))
        out = torch.empty_like(q)
        self.ints = (softmax_scale * log2e, out.stride(0), out.stride(1), k_cache.stride(0), k_cache.stride(1),
                     v_cache.stride(0), v_cache.stride(1), S_q, H_q)
        self.launch = Launch(_attn_fwd_prefill_hopper, num_warps=4, maxnreg=MAXNREG, GROUP=H_q // H_kv,
                             NUM_STAGES=STAGES, CONSUMER_REGS=CONSUMER_REGS, LOADER_REGS=LOADER_REGS)

    @staticmethod
    def _fields(t: torch.Tensor, block_rows: int, layout) -> dict:
        """The fields of t's descriptor as a (B * S, H * D) matrix of (block_rows, D) tiles, base aside."""
        B, S, H, D = t.shape
        fields = dict(TensorDescriptor(base=t, shape=[B * S, H * D], strides=[t.stride(1), 1],
                                       block_shape=[block_rows, D], layout=layout).__dict__)
        del fields["base"]  # a plan keeps no tensor alive
        return fields

    @staticmethod
    def _desc(base: torch.Tensor, fields: dict, rows: Optional[int] = None):
        """A descriptor of base with these fields; rows: its number of rows instead of the fields'."""
        desc = object.__new__(TensorDescriptor)
        desc.__dict__.update(fields)
        desc.base = base
        if rows is not None:
            desc.shape = [rows, fields["shape"][1]]
        return desc

    def __call__(self, q, k, v, k_cache, v_cache, seq_lens, seq_lens_cpu: Sequence[int]) -> torch.Tensor:
        """seq_lens_cpu: fills that :func:`serves` accepts. The caches' descriptors cover row 0's filled
        slots (a fresh row reads none of them; TMA takes no empty box, hence at least 1 row)."""
        out = torch.empty_like(q)
        q_fields, k_fields, v_fields, kc_fields, vc_fields = self.fields
        filled = max(seq_lens_cpu[0], 1)
        self.launch(self.grid, self._desc(q, q_fields), self._desc(k, k_fields), self._desc(v, v_fields),
                    self._desc(k_cache, kc_fields, filled), self._desc(v_cache, vc_fields, filled), out,
                    k_cache, v_cache, seq_lens, *self.ints)
        return out
