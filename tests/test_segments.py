"""A forward of several segments (``Transformer.forward_segments``), as the scheduler's mixed steps
run it: a decode segment over a pool's first rows and prompt chunks of different lengths on other
rows give the logits and cache contents of one forward per segment, within 1e-5 relative in
float32, under the torch backend and the Triton kernels (interpreted on the CPU, on the GPU where
there is one)."""
import pytest
import torch

import flashcore
from minillama.kv_cache import KVCache
from minillama.model import Segment
from minillama.runner import Runner
from tests.test_backends import rel_err, tiny_model

HISTORY = [6, 3, 4, 0]  # tokens each pool row holds before the step
VOCAB = 320


def noisy_pool(runner: Runner, gen: torch.Generator, rows: int) -> KVCache:
    """An empty cache of 16 slots per row whose slots hold noise (an over-read shows)."""
    pool = runner.new_cache(rows, 16)
    pool.k.copy_(torch.randn(pool.k.shape, generator=gen))
    pool.v.copy_(torch.randn(pool.v.shape, generator=gen))
    return pool


def pool_with_history(runner: Runner, gen: torch.Generator) -> KVCache:
    """4 rows holding HISTORY tokens each; the slots past the fill hold noise."""
    pool = noisy_pool(runner, gen, 4)
    for r, n in enumerate(HISTORY):
        if n:
            runner(torch.randint(0, VOCAB, (1, n), generator=gen).to(runner.device), pool.rows(r, r + 1))
    pool.set_lengths(HISTORY)
    return pool


def copy_of(cache: KVCache) -> KVCache:
    return KVCache(cache.k.clone(), cache.v.clone(), cache.seq_lens.clone(), list(cache.seq_lens_cpu))


def the_step(gen: torch.Generator, device="cpu"):
    """(row range, tokens) of each segment: rows 0-2 decode one token each (row 1 is not decoding:
    a padding row, its result unused), then a 5-token chunk on row 1 and a 2-token chunk on row 3."""
    return [((0, 3), torch.randint(0, VOCAB, (3, 1), generator=gen).to(device)),
            ((1, 2), torch.randint(0, VOCAB, (1, 5), generator=gen).to(device)),
            ((3, 4), torch.randint(0, VOCAB, (1, 2), generator=gen).to(device))]


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=pytest.mark.triton)])
def test_segments_equal_one_forward_each(backend):
    device = "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"
    if device == "cpu" and backend == "triton" and not flashcore.INTERPRET:
        pytest.skip("needs TRITON_INTERPRET=1 (set by conftest on the CPU)")
    runner = Runner(tiny_model(3, backend=backend, device=device))
    gen = torch.Generator().manual_seed(0)
    pool = pool_with_history(runner, gen)
    separate = copy_of(pool)
    step = the_step(gen, device)

    logits = runner.forward_segments([Segment(t, pool.rows(*rows)) for rows, t in step])  # (T, V)
    expected = torch.cat([runner(t, separate.rows(*rows)).reshape(-1, VOCAB) for rows, t in step])
    assert logits.shape == expected.shape == (3 + 5 + 2, VOCAB)
    assert rel_err(logits, expected) < 1e-5
    fill = [h + n for h, n in zip(HISTORY, (1, 5, 1, 2))]  # row 1: its chunk, the padding token rewritten
    for r, n in enumerate(fill):
        assert rel_err(pool.k[:, r, :n], separate.k[:, r, :n]) < 1e-5
        assert rel_err(pool.v[:, r, :n], separate.v[:, r, :n]) < 1e-5

    # logits of chosen tokens only: the decoding rows 0 and 2 and the chunks' last tokens
    pool.set_lengths(HISTORY)
    rows = torch.tensor([0, 2, 3 + 4, 3 + 5 + 1], device=device)
    chosen = runner.forward_segments([Segment(t, pool.rows(*r)) for r, t in step], rows)
    assert rel_err(chosen, expected[rows]) < 1e-5


def test_a_padding_row_prefilled_in_the_same_forward_is_not_corrupted():
    """Row 1 is a padding row of the decode segment (its token written at its fill) and the prefill
    of a later segment of the same forward: its chunk's logits and cache are those of a prefill on a
    cache of its own."""
    runner = Runner(tiny_model(4))
    gen = torch.Generator().manual_seed(1)
    history = torch.randint(0, VOCAB, (1, HISTORY[1]), generator=gen)
    pool = noisy_pool(runner, gen, 4)
    runner(history, pool.rows(1, 2))
    pool.set_lengths(HISTORY)  # rows 0, 2, 3 hold noise counted as filled: only row 1 is compared
    alone = runner.new_cache(1, 16)
    runner(history, alone)
    alone.advance(HISTORY[1])
    step = the_step(gen)
    chunk = step[1][1]

    logits = runner.forward_segments([Segment(t, pool.rows(*rows)) for rows, t in step])
    expected = runner(chunk, alone)[0]  # (5, V)
    assert rel_err(logits[3: 3 + 5], expected) < 1e-5
    n = HISTORY[1] + chunk.shape[1]
    assert rel_err(pool.k[:, 1, :n], alone.k[:, 0, :n]) < 1e-5 and rel_err(pool.v[:, 1, :n], alone.v[:, 0, :n]) < 1e-5


def test_no_logits_rows_only_fills_the_caches():
    runner = Runner(tiny_model(5))
    gen = torch.Generator().manual_seed(2)
    pool, separate = runner.new_cache(2, 8), runner.new_cache(2, 8)
    tokens = torch.randint(0, VOCAB, (1, 4), generator=gen)
    logits = runner.forward_segments([Segment(tokens, pool.rows(1, 2))], torch.zeros(0, dtype=torch.long))
    assert logits.shape == (0, VOCAB)
    runner(tokens, separate.rows(1, 2))
    assert torch.equal(pool.k[:, 1, :4], separate.k[:, 1, :4]) and torch.equal(pool.v[:, 1, :4], separate.v[:, 1, :4])
