"""Continuous batching on the demo model: every request's output equals its solo ``Llama.generate``
run, however requests share rows, queue, reuse prefixes, stop, get cancelled or fail."""
import threading

import pytest
import torch

from minillama import Llama
from minillama.hub import DEMO_MODEL_DIR
from minillama.sampling import SamplingParams
from minillama.scheduler import Failed, Finished, QueueFull, Request, Scheduler, Token

PROMPTS = ["Once upon a time", "One day, Lily found a", "Tom had a big red ball.", "The cat sat on the",
           "Max the dog was", "It was a sunny day.", "Mia wanted to", "In the park,"]


@pytest.fixture(scope="module")
def llm():
    return Llama.from_pretrained(DEMO_MODEL_DIR, device="cpu")  # exact float32 equality, on any machine


class Collector:
    """Events of one request, and a way to wait for its end."""

    def __init__(self):
        self.tokens, self.end, self.done = [], None, threading.Event()

    def __call__(self, event):
        if isinstance(event, Token):
            self.tokens.append(event)
        else:
            self.end = event
            self.done.set()

    @property
    def ids(self):
        return [t.id for t in self.tokens]

    @property
    def text(self):
        return "".join(t.text for t in self.tokens) + (self.end.text if isinstance(self.end, Finished) else "")

    def wait(self):
        assert self.done.wait(60), "the request never finished"
        return self


def run_all(scheduler, requests):
    collectors = [Collector() for _ in requests]
    for r, c in zip(requests, collectors):
        scheduler.submit(r, c)
    return [c.wait() for c in collectors]


def test_batched_equals_solo(llm):
    """More requests than rows, prompts prefilled 5 tokens at a time, greedy and seeded sampling mixed."""
    scheduler = Scheduler(llm, max_batch=3, prefill_chunk=5)
    try:
        requests, refs = [], []
        for i in range(10):
            sampling = SamplingParams() if i % 2 else SamplingParams(temperature=0.8, top_k=40, top_p=0.95, seed=i)
            stop = ["dog"] if i == 4 else []
            max_tokens = 10 + 9 * i
            prompt = llm.tokenizer.encode(PROMPTS[i % 8])
            requests.append(Request(prompt, max_tokens, sampling, stop=stop))
            refs.append(llm.generate([prompt], max_new_tokens=max_tokens, temperature=sampling.temperature,
                                     top_k=sampling.top_k, top_p=sampling.top_p, seed=sampling.seed, stop=stop)[0])
        for ref, got in zip(refs, run_all(scheduler, requests)):
            assert got.ids == ref.token_ids and got.text == ref.text
            assert got.end.finish_reason == ref.finish_reason and got.end.stop == ref.stop
            assert got.end.completion_tokens == len(ref.token_ids) and got.end.prompt_tokens == len(ref.prompt_ids)
        stats = scheduler.stats()
        assert stats["finished"] == 10 and stats["running"] == stats["waiting"] == 0 and stats["failed"] == 0
    finally:
        scheduler.close()


def test_logprobs_are_the_models(llm):
    scheduler = Scheduler(llm, max_batch=2)
    try:
        prompt = llm.tokenizer.encode("Once upon a time")
        (got,) = run_all(scheduler, [Request(prompt, 12, logprobs=3)])
        logits = llm.logits(prompt + got.ids).double()
        for i, t in enumerate(got.tokens):
            lp = logits[len(prompt) - 1 + i].log_softmax(-1)
            assert t.logprob == pytest.approx(float(lp[t.id]), abs=1e-4)
            top = lp.topk(3)
            assert [k for k, _ in t.top_logprobs] == top.indices.tolist()
    finally:
        scheduler.close()


def test_prefix_reuse(llm):
    """A request that extends what a free row holds prefills only the rest, and its output is unchanged."""
    scheduler = Scheduler(llm, max_batch=2)
    try:
        prompt = llm.tokenizer.encode("Tom had a big red ball.")
        (first,) = run_all(scheduler, [Request(prompt, 20)])
        longer = prompt + first.ids + llm.tokenizer.encode(" Then", bos=False)
        (second,) = run_all(scheduler, [Request(longer, 15)])
        ref = llm.generate([longer], max_new_tokens=15)[0]
        assert second.ids == ref.token_ids
        # the row held the prompt and the reply's tokens (the last one too when the step after it ran)
        assert len(prompt) + len(first.ids) - 1 <= second.end.cached_tokens <= len(prompt) + len(first.ids)
        stats = scheduler.stats()
        assert stats["prefix_hits"] == 1 and stats["cached_tokens"] == second.end.cached_tokens
        assert stats["prefix_hit_rate"] == pytest.approx(stats["cached_tokens"] / (len(prompt) + len(longer)))
    finally:
        scheduler.close()


def test_cancel_frees_the_row(llm):
    scheduler = Scheduler(llm, max_batch=1, max_queue=4)
    try:
        prompt = llm.tokenizer.encode("Once upon a time")
        long, queued = Collector(), Collector()
        rid = scheduler.submit(Request(prompt, 400), long)
        scheduler.submit(Request(prompt, 5), queued)  # waits for the one row
        while len(long.tokens) < 3:
            assert not long.done.is_set()
            long.done.wait(0.01)
        scheduler.cancel(rid)
        assert long.wait().end.finish_reason == "cancelled" and len(long.tokens) < 400
        ref = llm.generate([prompt], max_new_tokens=5)[0]
        assert queued.wait().ids == ref.token_ids
        assert scheduler.stats()["cancelled"] == 1
    finally:
        scheduler.close()


def test_bad_requests_and_full_queue(llm):
    scheduler = Scheduler(llm, max_batch=1, max_seq_len=64, max_queue=0)
    try:
        with pytest.raises(ValueError, match="60 tokens and max_tokens is 10: 70 tokens, more than the 64"):
            scheduler.submit(Request([1] * 60, 10), Collector())
        with pytest.raises(ValueError, match="outside the vocabulary"):
            scheduler.submit(Request([1, 5000], 10), Collector())
        with pytest.raises(ValueError, match="empty"):
            scheduler.submit(Request([], 10), Collector())
        with pytest.raises(ValueError, match="stop strings"):
            scheduler.submit(Request([1], 10, stop=[""]), Collector())
        with pytest.raises(ValueError, match="more than the model's context"):
            Scheduler(llm, max_seq_len=100000)
        busy = Collector()
        scheduler.submit(Request(llm.tokenizer.encode("Once upon a time"), 50), busy)
        while scheduler.stats()["running"] == 0 and not busy.done.is_set():
            busy.done.wait(0.001)
        if not busy.done.is_set():
            with pytest.raises(QueueFull, match="max_queue 0"):
                scheduler.submit(Request([1], 2), Collector())
        busy.wait()
    finally:
        scheduler.close()


def test_a_pool_that_does_not_fit_is_a_clear_error(llm, monkeypatch):
    def out_of_memory(batch, max_len):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 68.00 GiB")

    monkeypatch.setattr(llm.runner, "new_cache", out_of_memory)
    # K and V: 4 layers x 64 rows x 513 slots x 2 kv heads x 32 dims x 4 bytes (float32) = 0.067 GB
    with pytest.raises(ValueError, match=r"pool of 64 rows x 513 tokens needs 0\.1 GB .* lower max_batch"):
        Scheduler(llm, max_batch=64)


def test_a_failing_step_fails_its_requests_not_the_scheduler(llm, monkeypatch):
    scheduler = Scheduler(llm, max_batch=2)
    prompt = llm.tokenizer.encode("Once upon a time")
    ref = llm.generate([prompt], max_new_tokens=10)[0]
    try:
        real = llm.runner
        calls = {"n": 0}

        def flaky(*args, **kwargs):
            calls["n"] += 1
            if calls["n"] == 3:
                raise RuntimeError("out of memory (simulated)")
            return real(*args, **kwargs)

        monkeypatch.setattr(llm, "runner", flaky)
        (failed,) = run_all(scheduler, [Request(prompt, 10)])
        assert isinstance(failed.end, Failed) and "simulated" in failed.end.message
        (ok,) = run_all(scheduler, [Request(prompt, 10)])
        assert ok.ids == ref.token_ids
        assert scheduler.stats()["failed"] == 1
    finally:
        scheduler.close()


def test_nan_logits_fail_their_request_alone(llm, monkeypatch):
    scheduler = Scheduler(llm, max_batch=2)
    prompt = llm.tokenizer.encode("Once upon a time")
    ref = llm.generate([prompt], max_new_tokens=6)[0]
    try:
        real = llm.runner

        def poisoned(tokens, cache, logits_at=None):
            logits = real(tokens, cache, logits_at=logits_at)
            if tokens.shape[1] == 1 and tokens.shape[0] > 1:  # decode steps of both rows: row 1 is NaN
                logits = logits.clone()
                logits[1] = float("nan")
            return logits

        monkeypatch.setattr(llm, "runner", poisoned)
        got = run_all(scheduler, [Request(prompt, 6), Request(prompt + [5], 6)])
        assert got[0].ids == ref.token_ids and got[0].end.finish_reason == ref.finish_reason
        assert isinstance(got[1].end, Failed) and "NaN/Inf" in got[1].end.message
        assert scheduler.stats()["failed"] == 1
    finally:
        scheduler.close()


def test_close_cancels_what_is_left(llm):
    scheduler = Scheduler(llm, max_batch=1)
    pending = [Collector() for _ in range(3)]
    for c in pending:
        scheduler.submit(Request(llm.tokenizer.encode("Once upon a time"), 300), c)
    scheduler.close()
    assert all(c.done.is_set() and isinstance(c.end, Finished) for c in pending)
    assert pending[-1].end.finish_reason == "cancelled"
    with pytest.raises(RuntimeError, match="closed"):
        scheduler.submit(Request([1], 2), Collector())
    assert torch.is_tensor(scheduler.cache.seq_lens)


@pytest.mark.triton
def test_row_views_under_the_triton_backend():
    """What the scheduler runs, under the Triton kernels (interpreted on the CPU): a prompt prefilled
    through a one-row view of a pool whose other rows hold other sequences, then decode steps over
    the pool's first rows, give the logits of the same tokens on a cache of their own."""
    import flashcore
    from minillama.runner import Runner
    from tests.test_backends import tiny_model, with_backend

    device = "cuda" if torch.cuda.is_available() else "cpu"  # on the GPU: CUDA graphs for the decode steps
    if device == "cpu" and not flashcore.INTERPRET:
        pytest.skip("needs TRITON_INTERPRET=1 (set by conftest on the CPU)")
    runner = Runner(with_backend(tiny_model(5, device=device), "triton"))
    gen = torch.Generator().manual_seed(0)
    prompt, others = (torch.randint(0, 320, shape, generator=gen).to(device) for shape in ((1, 9), (3, 5)))
    pool = runner.new_cache(4, 32)
    runner(others, pool.rows(0, 3))  # rows 0-2 hold other sequences of 5 tokens
    pool.set_lengths([5, 5, 5, 0])
    alone = runner.new_cache(1, 32)
    last = torch.tensor([8], device=device)
    expected = runner(prompt, alone, logits_at=last)
    got = runner(prompt, pool.rows(3, 4), logits_at=last)
    pool.advance([0, 0, 0, 9])
    alone.advance(9)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    token = expected[:, -1].argmax(-1)
    for _ in range(2):
        step = runner(torch.cat([others[:, -1], token])[:, None], pool).clone()  # all rows, as a decode step
        pool.advance([0, 0, 0, 1])
        ref = runner(token[:, None], alone).clone()
        alone.advance(1)
        torch.testing.assert_close(step[3:], ref, rtol=1e-5, atol=1e-5)
        token = ref[:, -1].argmax(-1)


def test_unseeded_sampling_rows_sample_together(llm):
    """Rows without a seed that share their parameters are sampled in one call: each still gets
    tokens from its own logits (a tiny top_p makes the draw pick the most likely token)."""
    scheduler = Scheduler(llm, max_batch=4)
    try:
        prompts = [llm.tokenizer.encode(p) for p in PROMPTS[:4]]
        params = SamplingParams(temperature=0.7, top_p=1e-6)  # sampled, but the nucleus is the best token alone
        got = run_all(scheduler, [Request(p, 12, params) for p in prompts])
        for p, g in zip(prompts, got):
            assert g.ids == llm.generate([p], max_new_tokens=12)[0].token_ids
    finally:
        scheduler.close()
