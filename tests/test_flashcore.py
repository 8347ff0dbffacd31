"""flashcore on the CPU: the reference and the Triton kernel (interpreted) against an fp64 oracle.

Kernel tests are marked ``triton``; conftest sets TRITON_INTERPRET=1 when there is no CUDA device.
Shapes are tiny because the interpreter pays ~5 ms per loop iteration; the interpreter's tiles are
32 x 32, so the shapes below still cover several key tiles, partial tiles, ragged rows and splits.
"""
import math
import os

import pytest
import torch

import flashcore
from flashcore import reference

# The kernel tests run CPU tensors through Triton's interpreter; on a CUDA machine use test_flashcore_gpu.py.
interpreted = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="needs TRITON_INTERPRET=1")

# Interpreted float32 dots are exact; float16 rounds P and the output to half precision.
TOLERANCE = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}


def naive_attention_fp64(q, k, v, k_cache, v_cache, seq_lens, softmax_scale, causal):
    """The contract spelled out one row and head at a time, in float64, from the cache *before* the call."""
    B, S_q, H_q, D = q.shape
    group = H_q // k.shape[2]
    out = torch.zeros(B, S_q, H_q, D, dtype=torch.float64)
    for b in range(B):
        n = int(seq_lens[b])
        keys = torch.cat([k_cache[b, :n], k[b]]).double()  # (n + S_q, H_kv, D): positions 0 .. n + S_q - 1
        values = torch.cat([v_cache[b, :n], v[b]]).double()
        pos = torch.arange(n + S_q)
        if causal:
            visible = pos[None, :] <= (n + torch.arange(S_q))[:, None]  # (S_q, n + S_q), bottom-right
        else:
            visible = torch.ones(S_q, n + S_q, dtype=torch.bool)
        for h in range(H_q):
            scores = q[b, :, h].double() @ keys[:, h // group].T * softmax_scale
            scores = scores.masked_fill(~visible, float("-inf"))
            out[b, :, h] = torch.softmax(scores, dim=-1) @ values[:, h // group]
    return out


def make_inputs(B, S_q, H_q, H_kv, D, seq_lens, S_max, dtype, seed=0):
    """Random q/k/v and caches whose slots past each row's fill hold noise, inf and nan."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g).to(dtype)

    q, k, v = randn(B, S_q, H_q, D), randn(B, S_q, H_kv, D), randn(B, S_q, H_kv, D)
    caches = []
    for _ in range(2):
        cache = randn(B, S_max, H_kv, D)
        for b, n in enumerate(seq_lens):
            garbage = randn(S_max - n, H_kv, D) * 100
            garbage.view(-1)[:: 7] = float("nan")
            garbage.view(-1)[3:: 11] = float("inf")
            cache[b, n:] = garbage
        caches.append(cache)
    return q, k, v, caches[0], caches[1], torch.tensor(seq_lens, dtype=torch.int32)


def bits(t):
    return t.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def expected_cache(cache, new, seq_lens):
    want = cache.clone()
    for b, n in enumerate(seq_lens.tolist()):
        want[b, n:n + new.shape[1]] = new[b]
    return want


def run_and_check(fn, B, S_q, H_q, H_kv, D, seq_lens, S_max, dtype=torch.float32, causal=True,
                  softmax_scale=None, seed=0):
    q, k, v, k_cache, v_cache, lens = make_inputs(B, S_q, H_q, H_kv, D, seq_lens, S_max, dtype, seed)
    want_k, want_v = expected_cache(k_cache, k, lens), expected_cache(v_cache, v, lens)
    lens_before = lens.clone()
    scale = 1.0 / math.sqrt(D) if softmax_scale is None else softmax_scale
    want = naive_attention_fp64(q, k, v, k_cache, v_cache, lens, scale, causal)

    out = fn(q, k, v, k_cache, v_cache, lens, softmax_scale, causal)

    assert out.shape == (B, S_q, H_q, D) and out.dtype == dtype
    assert torch.isfinite(out).all()
    err = (out.double() - want).abs().max().item()
    assert err <= TOLERANCE[dtype], f"max abs error {err:.3g} > {TOLERANCE[dtype]}"
    # The append wrote exactly rows [seq_lens[b], seq_lens[b] + S_q); all else (garbage too) is bit-identical.
    assert torch.equal(bits(k_cache), bits(want_k))
    assert torch.equal(bits(v_cache), bits(want_v))
    assert torch.equal(lens, lens_before)


def public(q, k, v, k_cache, v_cache, lens, softmax_scale, causal):
    return flashcore.attention_with_kv_cache(q, k, v, k_cache, v_cache, lens, softmax_scale=softmax_scale,
                                             causal=causal, implementation="triton")


def plain_reference(q, k, v, k_cache, v_cache, lens, softmax_scale, causal):
    return reference.attention_with_kv_cache(q, k, v, k_cache, v_cache, lens, softmax_scale=softmax_scale, causal=causal)


def prefill_kernel(config):
    from flashcore.triton_attention import _launch_prefill

    def fn(q, k, v, k_cache, v_cache, lens, softmax_scale, causal):
        scale = 1.0 / math.sqrt(q.shape[-1]) if softmax_scale is None else softmax_scale
        return _launch_prefill(q, k, v, k_cache, v_cache, lens, scale, causal, config)
    return fn


def decode_kernel(num_splits, new_keys_apart=None):
    from flashcore.triton_attention import KernelConfig, _launch_decode

    def fn(q, k, v, k_cache, v_cache, lens, softmax_scale, causal):
        scale = 1.0 / math.sqrt(q.shape[-1]) if softmax_scale is None else softmax_scale
        return _launch_decode(q, k, v, k_cache, v_cache, lens, scale, causal,
                              KernelConfig(0, 32, 4, 1), num_splits=num_splits, new_keys_apart=new_keys_apart)
    return fn


# (B, S_q, H_q, H_kv, D, seq_lens, S_max, causal)
REFERENCE_CASES = [
    (1, 1, 4, 4, 16, [40], 48, True),  # decode
    (3, 3, 8, 2, 8, [0, 17, 60], 70, True),  # (3, kv_len), ragged, GQA 4
    (2, 9, 4, 1, 32, [0, 0], 12, True),  # (N, N), MQA
    (2, 5, 6, 3, 24, [4, 11], 20, False),  # not causal
]


@pytest.mark.parametrize("case", REFERENCE_CASES)
def test_reference_matches_fp64_oracle(case):
    B, S_q, H_q, H_kv, D, seq_lens, S_max, causal = case
    run_and_check(plain_reference, B, S_q, H_q, H_kv, D, seq_lens, S_max, causal=causal)


def test_reference_fp64_inputs_are_exact():
    q, k, v, k_cache, v_cache, lens = make_inputs(2, 3, 4, 2, 16, [5, 0], 9, torch.float64)
    want = naive_attention_fp64(q, k, v, k_cache, v_cache, lens, 0.3, True)
    out = reference.attention_with_kv_cache(q, k, v, k_cache, v_cache, lens, softmax_scale=0.3)
    assert (out - want).abs().max().item() < 1e-12


# -- the kernel through the public API: dispatch picks decode (S_q * group <= 64) or prefill --
# (B, S_q, H_q, H_kv, D, seq_lens, S_max, causal)
KERNEL_CASES = [
    pytest.param(2, 1, 8, 2, 64, [150, 37], 160, True, id="decode-1xN-gqa4-d64"),
    pytest.param(1, 3, 8, 1, 16, [196], 200, True, id="decode-3x199-mqa-d16"),
    pytest.param(3, 2, 4, 4, 8, [0, 33, 64], 66, True, id="decode-ragged-with-0-mha-d8"),
    pytest.param(2, 4, 8, 1, 16, [0, 45], 50, False, id="decode-noncausal-mqa"),
    pytest.param(1, 70, 2, 2, 16, [0], 70, True, id="prefill-NxN-mha"),
    pytest.param(1, 40, 4, 2, 64, [0], 40, False, id="prefill-NxN-gqa2-noncausal"),
    pytest.param(2, 20, 8, 1, 8, [0, 23], 48, True, id="prefill-chunk-mqa-d8"),
    pytest.param(2, 12, 8, 1, 32, [31, 5], 45, False, id="prefill-chunk-gqa8-noncausal"),
    pytest.param(1, 33, 4, 2, 128, [9], 42, True, id="prefill-chunk-gqa2-d128"),
]


@pytest.mark.triton
@interpreted
@pytest.mark.parametrize("B,S_q,H_q,H_kv,D,seq_lens,S_max,causal", KERNEL_CASES)
def test_kernel_matches_fp64_oracle(B, S_q, H_q, H_kv, D, seq_lens, S_max, causal):
    run_and_check(public, B, S_q, H_q, H_kv, D, seq_lens, S_max, causal=causal)


@pytest.mark.triton
@interpreted
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("S_q", [1, 40])
def test_kernel_half_precision(dtype, S_q):
    run_and_check(public, 2, S_q, 4, 2, 32, [0, 29], 72, dtype=dtype)


@pytest.mark.triton
@interpreted
def test_kernel_softmax_scale():
    run_and_check(public, 1, 2, 4, 2, 16, [20], 24, softmax_scale=0.05)
    run_and_check(public, 1, 40, 2, 2, 16, [3], 44, softmax_scale=0.7)


# -- each kernel outside its dispatch range: decode with many splits and queries, prefill with few --
@pytest.mark.triton
@interpreted
@pytest.mark.parametrize("num_splits", [1, 3, 7])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("new_keys_apart", [True, False])
def test_decode_kernel_splits(num_splits, causal, new_keys_apart):
    # Rows of 0, 1 and 130 cached tokens: with 7 splits most programs of the short rows are empty.
    # The new keys in a program of their own, or in the last split's.
    run_and_check(decode_kernel(num_splits, new_keys_apart), 3, 5, 4, 2, 16, [0, 1, 130], 140, causal=causal)


@pytest.mark.triton
@interpreted
@pytest.mark.parametrize("num_splits,new_keys_apart,elementwise", [
    (2, False, True), (3, False, True), (4, False, False), (1, False, False), (1, True, True), (4, True, False)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_one_new_key_by_elementwise_products(num_splits, new_keys_apart, elementwise, dtype):
    """One new key with splits of 4 or more cached tiles (10 tiles of 32 keys in 2 or 3 splits, or
    one split and the new key in a program of its own) is attended by elementwise products, not a
    tl.dot; the plan picks that form by shape alone (not with 3-tile splits, nor with one program).
    Rows of 0, 1 and 290 cached tokens: the empty row's only key is the new one."""
    from flashcore.triton_attention import KernelConfig, _DecodePlan

    def planned(q, k, v, k_cache, v_cache, lens, softmax_scale, causal):
        plan = _DecodePlan(q, k, v, k_cache, v_cache, softmax_scale, causal, KernelConfig(0, 32, 4, 1), num_splits,
                           new_keys_apart)
        assert (plan.split.constexprs["BLOCK_NEW"] == 1) == elementwise
        return plan(q, k, v, k_cache, v_cache, lens)

    run_and_check(planned, 3, 1, 8, 2, 16, [0, 1, 290], 300, dtype=dtype, softmax_scale=0.25)


@pytest.mark.triton
@interpreted
def test_decode_workspace_is_one_per_stream(monkeypatch):
    """A decode plan's split kernel writes its partials to a workspace that the reduce launch right
    after it reads: calls on one stream reuse one workspace (fresh inputs, right answers every
    call), calls on another stream get their own."""
    from flashcore import triton_attention

    triton_attention._PLANS.clear()
    for seed, stream in enumerate([None, None, "side", "side", None]):
        monkeypatch.setattr(triton_attention, "current_stream", lambda: stream)
        run_and_check(decode_kernel_planned, 2, 1, 8, 2, 16, [130, 3], 140, seed=seed)
    (plan,) = triton_attention._PLANS.values()
    assert not plan.direct and sorted(plan.parts, key=str) == [None, "side"]


def decode_kernel_planned(q, k, v, k_cache, v_cache, lens, softmax_scale, causal):
    """The public entry point with a split count that needs the reduce launch, planned once."""
    from flashcore import triton_attention

    key, _ = triton_attention._layout("kv_cache", (q, k, v, k_cache, v_cache, lens), (softmax_scale, causal))
    if key not in triton_attention._PLANS:
        scale = 1.0 / math.sqrt(q.shape[-1])
        triton_attention._PLANS[key] = triton_attention._DecodePlan(
            q, k, v, k_cache, v_cache, scale, causal, triton_attention.KernelConfig(0, 32, 4, 1), num_splits=3)
    return public(q, k, v, k_cache, v_cache, lens, softmax_scale, causal)


@pytest.mark.triton
@interpreted
@pytest.mark.parametrize("S_q,seq_lens", [(1, [0, 70]), (3, [35, 64]), (64, [0, 1])])
def test_decode_kernel_many_rows(S_q, seq_lens):
    # S_q = 64 with group 1 fills all 64 packed rows: two tiles of new keys under the causal mask.
    run_and_check(decode_kernel(2), 2, S_q, 2, 2, 16, seq_lens, 130)


@pytest.mark.triton
@interpreted
@pytest.mark.parametrize("block_m,block_n", [(32, 32), (64, 32)])
@pytest.mark.parametrize("S_q,seq_lens", [(1, [0, 70]), (3, [35, 64]), (65, [0, 31])])
def test_prefill_kernel_blocks(block_m, block_n, S_q, seq_lens):
    from flashcore.triton_attention import KernelConfig

    config = KernelConfig(block_m, block_n, 4, 1)
    run_and_check(prefill_kernel(config), 2, S_q, 4, 1, 16, seq_lens, 100)


# -- boundary --
@pytest.mark.triton
@interpreted
def test_capacity_error_names_both_numbers():
    """Checked at every call, also for a layout already planned (shapes are checked once per layout)."""
    q, k, v, k_cache, v_cache, lens = make_inputs(2, 3, 4, 2, 16, [5, 8], 10, torch.float32)
    flashcore.attention_with_kv_cache(q, k, v, k_cache, v_cache, torch.tensor([5, 7], dtype=torch.int32),
                                      implementation="triton")
    with pytest.raises(ValueError, match=r"8 cached \+ 3 new tokens = 11 exceeds the cache capacity S_max=10"):
        flashcore.attention_with_kv_cache(q, k, v, k_cache, v_cache, lens, implementation="triton")
    ok = torch.tensor([5, 7], dtype=torch.int32)  # the host copy wins over the tensor when given
    with pytest.raises(ValueError, match="S_max=10"):
        flashcore.attention_with_kv_cache(q, k, v, k_cache, v_cache, ok, seq_lens_cpu=[5, 9], implementation="triton")


@pytest.mark.parametrize("implementation", ["reference", pytest.param("triton", marks=[pytest.mark.triton, interpreted])])
def test_empty_batch_is_a_value_error(implementation):
    """B = 0 is outside the contract (B >= 1): a ValueError naming it, before any launch (it was a
    ZeroDivisionError planning the decode splits, and a RuntimeError from torch in the reference)."""
    q, k, v, k_cache, v_cache, lens = make_inputs(1, 1, 4, 2, 16, [3], 8, torch.float32)
    with pytest.raises(ValueError, match="B is 0"):
        flashcore.attention_with_kv_cache(q[:0], k[:0], v[:0], k_cache[:0], v_cache[:0], lens[:0],
                                          implementation=implementation)


@pytest.mark.triton
@interpreted
def test_kernel_rejects_float64_before_launch():
    """float64 is the reference's dtype only: compiled for a GPU the kernels fail inside Triton
    (CompilationError: float64 dot results meet the float32 softmax state), while the interpreter
    (numpy) ran them. Both entries raise a ValueError naming the dtype before any launch."""
    q, k, v, k_cache, v_cache, lens = make_inputs(1, 2, 4, 2, 16, [3], 8, torch.float64)
    with pytest.raises(ValueError, match="float64 is not supported by the Triton kernel"):
        flashcore.attention_with_kv_cache(q, k, v, k_cache, v_cache, lens, implementation="triton")
    tiles = torch.tensor([(0, 2, 0, 3)], dtype=torch.int64)
    with pytest.raises(ValueError, match="float64 is not supported by the Triton kernel"):
        flashcore.varlen_attention_with_kv_cache(q[0], k[0], v[0], k_cache, v_cache, tiles, implementation="triton")


@pytest.mark.triton
@interpreted
def test_kernel_runs_in_the_interpreter(monkeypatch):
    """Under TRITON_INTERPRET=1, implementation="triton" runs the kernel on the CPU, not the reference."""
    import flashcore.triton_attention as ta

    calls = []
    real = ta.triton_attention_with_kv_cache
    monkeypatch.setattr(ta, "triton_attention_with_kv_cache", lambda *a: calls.append(1) or real(*a))
    run_and_check(public, 1, 1, 2, 1, 16, [3], 8)
    assert calls == [1]


def test_implementation_choice_is_explicit(monkeypatch):
    """"auto" is the reference on the CPU; "triton" there needs the interpreter, else a clear error."""
    assert flashcore.resolve_implementation("auto", torch.device("cpu")) == "reference"
    assert flashcore.resolve_implementation("auto", torch.device("cuda")) == "triton"
    with pytest.raises(ValueError, match="implementation must be one of"):
        flashcore.resolve_implementation("fast", torch.device("cpu"))
    monkeypatch.setattr(flashcore, "INTERPRET", False)
    with pytest.raises(ValueError, match="implementation='triton' cannot run on cpu: it needs a CUDA device, or TRITON_INTERPRET=1"):
        flashcore.resolve_implementation("triton", torch.device("cpu"))


# -- varlen: new tokens of several rows packed along one dimension ------------------------------

def varlen_inputs(spans, T, H_q, H_kv, D, S_max, B, dtype, seed):
    """Packed q/k/v of T tokens, caches whose slots past each span's position hold noise, inf and
    nan, and the tiles of ``spans`` [(start, n, row, position)] plus two padding tiles."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g).to(dtype)

    q, k, v = randn(T, H_q, D), randn(T, H_kv, D), randn(T, H_kv, D)
    caches = []
    for _ in range(2):
        cache = randn(B, S_max, H_kv, D)
        for _, _, row, pos in spans:
            garbage = randn(S_max - pos, H_kv, D) * 100
            garbage.view(-1)[:: 7] = float("nan")
            garbage.view(-1)[3:: 11] = float("inf")
            cache[row, pos:] = garbage
        caches.append(cache)
    tiles = torch.tensor(flashcore.varlen_tiles(spans) + [(0, 0, 0, 0)] * 2, dtype=torch.int64)
    return q, k, v, caches[0], caches[1], tiles


def check_varlen(implementation, spans, T, H_q, H_kv, D, S_max, B, dtype=torch.float32, seed=0):
    """Against the fp64 oracle of the (K, V, seq_lens) contract run one span at a time, on the cache
    before the call; the cache gets exactly the spans' slots; uncovered tokens get zeros."""
    q, k, v, k_cache, v_cache, tiles = varlen_inputs(spans, T, H_q, H_kv, D, S_max, B, dtype, seed)
    want = torch.zeros(T, H_q, D, dtype=torch.float64)
    want_k, want_v = k_cache.clone(), v_cache.clone()
    for start, n, row, pos in spans:
        part = slice(start, start + n)
        want[part] = naive_attention_fp64(q[None, part], k[None, part], v[None, part], k_cache[row: row + 1],
                                          v_cache[row: row + 1], [pos], 1.0 / math.sqrt(D), True)[0]
        want_k[row, pos: pos + n], want_v[row, pos: pos + n] = k[part], v[part]

    out = flashcore.varlen_attention_with_kv_cache(q, k, v, k_cache, v_cache, tiles, implementation=implementation)

    assert out.shape == (T, H_q, D) and out.dtype == dtype
    err = (out.double() - want).abs().max().item()
    assert err <= TOLERANCE[dtype], f"max abs error {err:.3g} > {TOLERANCE[dtype]}"
    assert torch.equal(bits(k_cache), bits(want_k)) and torch.equal(bits(v_cache), bits(want_v))


# (spans [(start, n, row, position)], T, H_q, H_kv, D, S_max, B): decoding rows in any order, chunks
# of several tiles, a row at position 0, padding tokens at the end
VARLEN_CASES = [
    ([(0, 1, 2, 40), (1, 1, 0, 5), (2, 35, 1, 0), (37, 3, 3, 17)], 42, 8, 2, 16, 48, 4),
    ([(0, 20, 0, 33), (20, 1, 1, 0)], 21, 4, 4, 8, 64, 2),
    ([(0, 17, 1, 30)], 17, 4, 1, 32, 50, 2),
]


@pytest.mark.parametrize("case", VARLEN_CASES)
@pytest.mark.parametrize("implementation", ["reference", pytest.param("triton", marks=[pytest.mark.triton, interpreted])])
def test_varlen_matches_fp64_oracle(implementation, case):
    check_varlen(implementation, *case, seed=len(case[0]))


@pytest.mark.triton
@interpreted
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_varlen_kernel_half_precision(dtype):
    check_varlen("triton", *VARLEN_CASES[0], dtype=dtype, seed=3)


def test_varlen_tiles_cut_spans():
    tiles = flashcore.varlen_tiles([(0, 1, 5, 9), (1, 33, 2, 0), (34, 16, 0, 4)])
    assert tiles == [(0, 1, 5, 9), (1, 16, 2, 0), (17, 16, 2, 16), (33, 1, 2, 32), (34, 16, 0, 4)]


def test_varlen_shape_errors_name_the_shapes():
    q, k, v = torch.zeros(4, 4, 8), torch.zeros(4, 2, 8), torch.zeros(4, 2, 8)
    cache = torch.zeros(2, 8, 2, 8)
    with pytest.raises(ValueError, match=r"tiles must be int64 of shape \(n, 4\)"):
        flashcore.varlen_attention_with_kv_cache(q, k, v, cache, cache.clone(), torch.zeros(3, 4, dtype=torch.int32))
    with pytest.raises(ValueError, match=r"k and v must be \(T, H_kv, D\)"):
        flashcore.varlen_attention_with_kv_cache(q, k[:3], v, cache, cache.clone(), torch.zeros(1, 4, dtype=torch.int64))


def test_launch_keeps_the_compiled_kernel(monkeypatch):
    """flashcore.launch.Launch: the first call goes through Triton (kernel[grid](*args, **constexprs,
    num_warps, num_stages)) and keeps what it returns; later calls launch that compiled kernel with
    every parameter in declaration order (its launcher directly, with the caller's pointers in place
    of the leading tensors where it passes them, or its runner with the tensors where a profiler's
    launch hooks are set). Under the interpreter every call goes through Triton."""
    from types import SimpleNamespace

    from flashcore import launch

    calls = []

    class Compiled:
        function, packed_metadata = "function", "metadata"

        def run(self, *args):
            calls.append(("run", args))

        def __getitem__(self, grid):
            return lambda *args: calls.append(("runner", grid, args))

    class Kernel:
        params = [SimpleNamespace(name=name) for name in ("X", "n", "BLOCK", "EVEN")]

        def __getitem__(self, grid):
            return lambda *args, **kwargs: calls.append(("triton", grid, args, kwargs)) or Compiled()

    hooks = SimpleNamespace(launch_enter_hook=SimpleNamespace(calls=[]), launch_exit_hook=None)
    monkeypatch.setattr(launch, "knobs", SimpleNamespace(runtime=hooks))
    monkeypatch.setattr(launch, "driver", SimpleNamespace(active=SimpleNamespace(
        get_current_device=lambda: 0, get_current_stream=lambda device: f"stream{device}")))
    monkeypatch.setattr(launch, "INTERPRET", False)
    site = launch.Launch(Kernel(), num_warps=4, num_stages=2, EVEN=True, BLOCK=64)
    site((3, 1, 1), "x", 7, pointers=(1000,))
    site((3, 2, 1), "y", 7)
    site((3, 2, 1), "y", 7, pointers=(2000,), stream="side")
    hooks.launch_exit_hook = print  # a profiler's hook
    site((3, 2, 1), "z", 7, pointers=(3000,))
    assert calls == [("triton", (3, 1, 1), ("x", 7), dict(EVEN=True, BLOCK=64, num_warps=4, num_stages=2)),
                     ("run", (3, 2, 1, "stream0", "function", "metadata", None, None, None, "y", 7, 64, True)),
                     ("run", (3, 2, 1, "side", "function", "metadata", None, None, None, 2000, 7, 64, True)),
                     ("runner", (3, 2, 1), ("z", 7, 64, True))]

    # a kernel that takes its warp count as a constexpr parameter (Gluon's layouts need it)
    calls.clear()
    Kernel.params = [SimpleNamespace(name=name) for name in ("X", "n", "BLOCK", "num_warps")]
    site = launch.Launch(Kernel(), num_warps=8, BLOCK=64)
    site((1, 1, 1), "x", 7)
    site((1, 1, 1), "y", 7)
    assert calls == [("triton", (1, 1, 1), ("x", 7), dict(BLOCK=64, num_warps=8)),
                     ("runner", (1, 1, 1), ("y", 7, 64, 8))]
    # a parameter the launch has no value for: every call goes through Triton
    calls.clear()
    site = launch.Launch(Kernel(), num_warps=8, num_stages=2)
    site((1, 1, 1), "x", 7)
    site((1, 1, 1), "y", 7)
    assert [c[0] for c in calls] == ["triton", "triton"]
    Kernel.params = [SimpleNamespace(name=name) for name in ("X", "n", "BLOCK", "EVEN")]

    calls.clear()
    monkeypatch.setattr(launch, "INTERPRET", True)
    site = launch.Launch(Kernel(), num_warps=1, BLOCK=16, EVEN=False)
    site((1, 1, 1), "x", 1)
    site((1, 1, 1), "x", 1)
    assert [c[0] for c in calls] == ["triton", "triton"] and calls[0][3] == dict(BLOCK=16, EVEN=False, num_warps=1)


def test_hopper_prefill_kernel_serves_one_row_or_fresh_rows_with_tma_ready_views():
    """What decides whether the Gluon prefill kernel (flashcore.hopper_attention) may run: the host
    copy of the fills is known and is one row's (cached keys or not) or says nothing is cached, and
    q/k/v and the caches' rows are 2-D views TMA can read."""
    from flashcore import hopper_attention as ha

    assert ha.serves([0, 0], 1024) and ha.serves([0], 2048) and ha.serves([5000], 300) and ha.serves((3000,), 512)
    assert not ha.serves([0, 3], 4096) and not ha.serves(None, 4096)
    # below MIN_PAIRS (query, key) pairs per head the host time of a launch is the call's: Triton's kernel
    assert ha.serves([0], 1448) and not ha.serves([0], 1447) and ha.serves([0, 0], 1024) and not ha.serves([0], 1024)
    assert ha.serves([1000], 800) and not ha.serves([1000], 700)
    qkv = torch.empty(2, 300, 48, 128, dtype=torch.bfloat16)
    q, k, _ = qkv.split([32, 8, 8], dim=2)  # views of one projection, as the model passes them
    assert ha._rows_view_ok(q) and ha._rows_view_ok(k)
    assert not ha._rows_view_ok(q.transpose(1, 2).contiguous().transpose(1, 2))  # heads not contiguous
    assert not ha._rows_view_ok(torch.empty(2, 400, 48, 128, dtype=torch.bfloat16)[:, :300])  # uneven rows
    caches = torch.empty(2, 2, 512, 8, 128, dtype=torch.bfloat16)
    assert ha._cache_view_ok(caches[0]) and ha._cache_view_ok(caches[1, :, :300])
    assert not ha._cache_view_ok(caches[0].transpose(1, 2))  # slot-major rows are what TMA reads
    assert not ha._cache_view_ok(torch.empty(2, 512, 1, 3, dtype=torch.bfloat16))  # 6-byte slots
    assert not ha.supports(q, k, k, k, k, causal=True)  # CPU tensors: the Triton kernel (or the reference)


@pytest.mark.skipif(not __import__("flashcore.hopper_attention").hopper_attention.AVAILABLE,
                    reason="this Triton has no usable Gluon for Hopper")
def test_hopper_prefill_plan_descriptors_match_checked_ones():
    """A Hopper prefill plan makes each call's TMA descriptors from fields checked once per layout:
    they must equal what TensorDescriptor (with its checks) builds for that call's tensors."""
    from flashcore import hopper_attention as ha
    from triton.experimental.gluon import language as gl

    def views():
        qkv = torch.empty(1, 300, 48, 128, dtype=torch.bfloat16)
        return qkv.split([32, 8, 8], dim=2)

    q, k, v = views()
    caches = torch.empty(2, 1, 512, 8, 128, dtype=torch.bfloat16)
    plan = ha.HopperPrefillPlan(q, k, v, caches[0], caches[1], 0.1, 1.44)
    assert plan.grid == (3, 32, 1) and plan.ints[1:] == (300 * 32 * 128, 32 * 128, 512 * 8 * 128, 8 * 128,
                                                         512 * 8 * 128, 8 * 128, 300, 32)
    assert all("base" not in fields for fields in plan.fields)  # the plan keeps no tensor alive
    other_caches = torch.empty(2, 1, 512, 8, 128, dtype=torch.bfloat16)
    tensors = (*views(), other_caches[0], other_caches[1])
    # q, k, v: every row of the call; a cache: row 0's first 77 slots (its fill)
    for t, fields, rows, block in zip(tensors, plan.fields, (300, 300, 300, 77, 77),
                                      (ha.BLOCK_M, ha.BLOCK_N, ha.BLOCK_N, ha.BLOCK_N, ha.BLOCK_N)):
        layout = gl.NVMMASharedLayout.get_default_for([block, 128], gl.bfloat16)
        checked = ha.TensorDescriptor(base=t, shape=[rows, t.shape[2] * 128], strides=[t.stride(1), 1],
                                      block_shape=[block, 128], layout=layout)
        made = ha.HopperPrefillPlan._desc(t, fields, None if t.shape[1] == 300 else 77)
        assert type(made) is ha.TensorDescriptor and made.base is t
        assert made.__dict__.keys() == checked.__dict__.keys()
        assert all(made.__dict__[name] == value for name, value in checked.__dict__.items() if name != "base")
