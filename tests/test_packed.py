"""A packed step (``Runner.forward_packed``), as the scheduler's mixed steps run it: decoding rows
of one token each and prompt chunks of different lengths on other rows, in one forward, give the
logits and cache contents of one forward per row, within 1e-5 relative in float32, under the torch
backend and the Triton kernels (interpreted on the CPU; on the GPU, replayed as CUDA graphs)."""
import pytest
import torch

import flashcore
from minillama.kv_cache import KVCache
from minillama.runner import Runner, packed_bucket, packed_capacity
from tests.test_backends import rel_err, tiny_model

HISTORY = [6, 3, 4, 0]  # tokens each pool row holds before the step
SLOTS = 32
VOCAB = 320


def pool_with_history(runner: Runner, gen: torch.Generator) -> KVCache:
    """4 rows holding HISTORY tokens each; the slots past the fill hold noise (an over-read shows)."""
    pool = runner.new_cache(4, SLOTS)
    pool.k.copy_(torch.randn(pool.k.shape, generator=gen))
    pool.v.copy_(torch.randn(pool.v.shape, generator=gen))
    for r, n in enumerate(HISTORY):
        if n:
            runner(torch.randint(0, VOCAB, (1, n), generator=gen).to(runner.device), pool.rows(r, r + 1))
    pool.set_lengths(HISTORY)
    return pool


def copy_of(cache: KVCache) -> KVCache:
    return KVCache(cache.k.clone(), cache.v.clone(), cache.seq_lens.clone(), list(cache.seq_lens_cpu))


def the_step(gen: torch.Generator, device):
    """(row, tokens) of each span: rows 2 and 0 decode one token each, then a 19-token chunk on
    row 1 (two of flashcore's varlen tiles) and a 2-token chunk on row 3 (empty before)."""
    return [(2, torch.randint(0, VOCAB, (1,), generator=gen).to(device)),
            (0, torch.randint(0, VOCAB, (1,), generator=gen).to(device)),
            (1, torch.randint(0, VOCAB, (19,), generator=gen).to(device)),
            (3, torch.randint(0, VOCAB, (2,), generator=gen).to(device))]


def run_packed(runner, pool, step, logits_rows=None):
    tokens = torch.cat([t for _, t in step])
    return runner.forward_packed(tokens, [(r, t.numel()) for r, t in step], pool, logits_rows)


def device_for(backend):
    device = "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"
    if device == "cpu" and backend == "triton" and not flashcore.INTERPRET:
        pytest.skip("needs TRITON_INTERPRET=1 (set by conftest on the CPU)")
    return device


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=pytest.mark.triton)])
def test_a_packed_step_equals_one_forward_per_row(backend):
    device = device_for(backend)
    runner = Runner(tiny_model(3, backend=backend, device=device))
    gen = torch.Generator().manual_seed(0)
    pool = pool_with_history(runner, gen)
    separate = copy_of(pool)
    step = the_step(gen, device)

    logits = run_packed(runner, pool, step).clone()  # (T, V)
    expected = torch.cat([runner(t[None], separate.rows(r, r + 1))[0] for r, t in step])
    assert logits.shape == expected.shape == (1 + 1 + 19 + 2, VOCAB)
    assert rel_err(logits, expected) < 1e-5
    assert pool.seq_lens_cpu == HISTORY  # read, not advanced
    for r, n in enumerate(HISTORY):
        n += dict((row, t.numel()) for row, t in step)[r]
        assert rel_err(pool.k[:, r, :n], separate.k[:, r, :n]) < 1e-5
        assert rel_err(pool.v[:, r, :n], separate.v[:, r, :n]) < 1e-5

    # logits of chosen tokens only: the decoding rows and the chunks' last tokens
    rows = [0, 1, 2 + 18, 2 + 19 + 1]
    chosen = run_packed(runner, pool, step, rows)
    assert rel_err(chosen, expected[torch.tensor(rows, device=device)]) < 1e-5


@pytest.mark.gpu
def test_packed_graphs_equal_the_eager_forward():
    """On the GPU, every token bucket's graph (random steps) against the eager packed forward."""
    model = tiny_model(7, backend="triton", device="cuda", layers=3)
    graphs, eager = Runner(model), Runner(model, cuda_graphs=False)
    gen = torch.Generator().manual_seed(7)
    pool = graphs.new_cache(8, 320)
    graphs.capture_packed(pool, 200)
    assert sorted(k[1] for k in graphs._graphs) == [16, 32, 64, 128, 192, 256]
    errors = {}
    for T in (1, 3, 16, 17, 40, 100, 129, 200):
        pool.set_lengths(torch.randint(0, 100, (8,), generator=gen).tolist())
        rows = torch.randperm(8, generator=gen).tolist()[: min(T, 8)]
        spans = [(rows[0], T - len(rows) + 1)] + [(r, 1) for r in rows[1:]]  # a chunk, then decoding rows
        tokens = torch.randint(0, VOCAB, (T,), generator=gen).cuda()
        logits_rows = sorted(torch.randperm(T, generator=gen)[: min(T, 8)].tolist())
        before = copy_of(pool)
        got = graphs.forward_packed(tokens, spans, pool, logits_rows).float()
        want = eager.forward_packed(tokens, spans, before, logits_rows).float()
        assert got.shape == (len(logits_rows), VOCAB)
        errors[T] = rel_err(got, want)
    assert max(errors.values()) < 1e-5, errors


@pytest.mark.gpu
def test_scored_steps_replay_graphs_with_a_logits_row_per_token():
    """A step that wants the logits of more tokens than the cache has rows (it scores a prompt chunk)
    runs eagerly the first time, then replays a graph of its bucket with a logits row per token, equal
    to the eager forward; the scored graphs of two buckets share one logits buffer; a step larger than
    max_scored_tokens stays eager."""
    model = tiny_model(9, backend="triton", device="cuda", layers=3)
    graphs, eager = Runner(model), Runner(model, cuda_graphs=False)
    gen = torch.Generator().manual_seed(9)
    pool = graphs.new_cache(2, 400)
    pool.k.normal_(generator=torch.Generator(device="cuda").manual_seed(9))  # row 0's 5 cached tokens
    pool.v.normal_(generator=torch.Generator(device="cuda").manual_seed(10))

    def scored_step(T):
        pool.set_lengths([5, 0])
        tokens = torch.randint(0, VOCAB, (T,), generator=gen).cuda()
        spans, logits_rows = [(0, 1), (1, T - 1)], list(range(T))
        before = copy_of(pool)
        got = graphs.forward_packed(tokens, spans, pool, logits_rows).float()
        want = eager.forward_packed(tokens, spans, before, logits_rows).float()
        assert got.shape == (T, VOCAB) and rel_err(got, want) < 1e-5, T

    for T in (40, 37, 40):  # one bucket (64), scored three times: eager, captured, replayed
        scored_step(T)
    assert [k[:2] for k in graphs._graphs] == [("scored", 64)]
    for T in (20, 20, 20, 40):  # bucket 32's graph writes the buffer of bucket 64's, which replays after it
        scored_step(T)
    assert sorted(k[:2] for k in graphs._graphs) == [("scored", 32), ("scored", 64)]
    assert {g.logits.data_ptr() for g in graphs._graphs.values()} == {graphs._scored_logits.data_ptr()}
    graphs.max_scored_tokens = 8
    for _ in range(2):
        scored_step(12)  # bucket 16: eager, never captured
    assert sorted(k[:2] for k in graphs._graphs) == [("scored", 32), ("scored", 64)]


@pytest.mark.gpu
def test_a_prefill_bucket_is_captured_when_it_recurs():
    """A prefill of a new token bucket runs eagerly; the same bucket again replays a new graph."""
    runner = Runner(tiny_model(8, backend="triton", device="cuda"))
    cache = runner.new_cache(1, 64)
    tokens = torch.randint(0, VOCAB, (1, 40), device="cuda")
    first = runner(tokens, cache, logits_at=torch.tensor([39]))[0, -1].clone()
    assert not runner._graphs
    second = runner(tokens, cache, logits_at=torch.tensor([39]))[0, -1]
    assert [k[1] for k in runner._graphs] == [packed_bucket(40)]
    assert rel_err(second, first) < 1e-5


def test_no_logits_rows_only_fills_the_caches():
    runner = Runner(tiny_model(5))
    gen = torch.Generator().manual_seed(2)
    pool, separate = runner.new_cache(2, 8), runner.new_cache(2, 8)
    tokens = torch.randint(0, VOCAB, (4,), generator=gen)
    logits = runner.forward_packed(tokens, [(1, 4)], pool, [])
    assert logits.shape == (0, VOCAB)
    runner(tokens[None], separate.rows(1, 2))
    assert torch.equal(pool.k[:, 1, :4], separate.k[:, 1, :4]) and torch.equal(pool.v[:, 1, :4], separate.v[:, 1, :4])


def test_bad_spans_are_refused_before_any_work():
    runner = Runner(tiny_model(6))
    pool = runner.new_cache(2, 8)
    pool.set_lengths([6, 0])
    tokens = torch.zeros(4, dtype=torch.long)
    with pytest.raises(ValueError, match=r"row 0: 6 cached \+ 3 new tokens = 9 exceeds the cache capacity S_max=8"):
        runner.forward_packed(tokens, [(0, 3), (1, 1)], pool)
    with pytest.raises(ValueError, match="the span of row 1 has 0 tokens"):
        runner.forward_packed(tokens, [(0, 2), (1, 0)], pool)
    with pytest.raises(ValueError, match="distinct row"):
        runner.forward_packed(tokens, [(1, 2), (1, 2)], pool)
    with pytest.raises(ValueError, match="distinct row"):
        runner.forward_packed(tokens, [(2, 4)], pool)
    with pytest.raises(ValueError, match="the spans hold 3 tokens but tokens has 4"):
        runner.forward_packed(tokens, [(1, 3)], pool)


def test_packed_buckets_hold_every_step_of_their_size():
    """Any spans of T tokens over distinct rows of a cache of R rows fit the graph of T's bucket."""
    for T in range(1, 700):
        size = packed_bucket(T)
        assert size >= T and (size <= 128 or size % 64 == 0)
        for R in (1, 8, 64):
            n_tiles, n_logits = packed_capacity(size, R)
            spans = min(T, R)
            worst_tiles = (T - spans) // flashcore.VARLEN_TILE + spans  # partial tiles: one per span
            assert worst_tiles <= n_tiles and min(T, R) <= n_logits
            assert packed_capacity(size, R, scored=True) == (n_tiles, size)  # a logits row per token
