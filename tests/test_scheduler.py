"""Continuous batching on the demo model: every request's output equals its solo ``Llama.generate``
run, however requests share rows, queue, reuse prefixes, stop, get cancelled or fail."""
import dataclasses
import threading
import time

import pytest
import torch

from minillama import Llama
from minillama.concurrency import step_lock
from minillama.hub import DEMO_MODEL_DIR
from minillama.sampling import SamplingParams
from minillama.scheduler import Failed, Finished, PromptLogprobs, QueueFull, Request, Scheduler, Token

PROMPTS = ["Once upon a time", "One day, Lily found a", "Tom had a big red ball.", "The cat sat on the",
           "Max the dog was", "It was a sunny day.", "Mia wanted to", "In the park,"]


@pytest.fixture(scope="module")
def llm():
    return Llama.from_pretrained(DEMO_MODEL_DIR, device="cpu")  # exact float32 equality, on any machine


class Collector:
    """Events of one request, and a way to wait for its end."""

    def __init__(self):
        self.tokens, self.end, self.done = [], None, threading.Event()
        self.prompt_events = []  # PromptLogprobs, each asserted to come before any Token

    def __call__(self, event):
        if isinstance(event, PromptLogprobs):
            assert not self.tokens and self.end is None
            self.prompt_events.append(event)
        elif isinstance(event, Token):
            self.tokens.append(event)
        else:
            self.end = event
            self.done.set()

    @property
    def ids(self):
        return [t.id for t in self.tokens]

    @property
    def prompt_tokens(self):
        return [t for e in self.prompt_events for t in e.tokens]

    @property
    def text(self):
        return "".join(t.text for t in self.tokens) + (self.end.text if isinstance(self.end, Finished) else "")

    def wait(self):
        assert self.done.wait(60), "the request never finished"
        return self


class SubmitWhenFinished(Collector):
    """A Collector that, once its request has finished (from the scheduler thread), submits
    ``request`` with ``out`` as its callback: admitted at the next step."""

    def __init__(self, scheduler, request, out):
        super().__init__()
        self.scheduler, self.request, self.out = scheduler, request, out

    def __call__(self, event):
        super().__call__(event)
        if isinstance(event, Finished):
            self.scheduler.submit(self.request, self.out)


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
        done = run_all(scheduler, requests)
        for ref, got in zip(refs, done):
            assert got.ids == ref.token_ids and got.text == ref.text
            assert got.end.finish_reason == ref.finish_reason and got.end.stop == ref.stop
            stop_id = 1 if isinstance(ref.stop, int) else 0  # counted, as vLLM's usage counts it
            assert got.end.completion_tokens == len(ref.token_ids) + stop_id
            assert got.end.prompt_tokens == len(ref.prompt_ids)
        assert any(isinstance(ref.stop, int) for ref in refs)
        stats = scheduler.stats()
        assert stats["finished"] == 10 and stats["running"] == stats["waiting"] == 0 and stats["failed"] == 0
        assert stats["generated_tokens"] == sum(got.end.completion_tokens for got in done)
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


def solo_kwargs(sampling: SamplingParams) -> dict:
    """``Llama.generate``'s keyword arguments for ``sampling``."""
    kwargs = {f.name: getattr(sampling, f.name) for f in dataclasses.fields(sampling)}
    return {**kwargs, "logit_bias": dict(sampling.logit_bias)}


def test_logit_bias_and_penalties_equal_solo(llm):
    """Greedy and seeded requests with a logit bias or penalties share 2 rows with plain ones (each
    row serves several requests in turn), prompts prefilled 6 tokens at a time: each equals its solo
    run, and the penalties change what comes out."""
    first = llm.generate([llm.tokenizer.encode(PROMPTS[3])], max_new_tokens=1)[0].token_ids[0]  # request 3 bans it
    samplings = [
        SamplingParams(frequency_penalty=1.5),
        SamplingParams(temperature=0.8, top_p=0.95, seed=3, presence_penalty=1.0, repetition_penalty=1.2),
        SamplingParams(),
        SamplingParams(repetition_penalty=1.5, logit_bias={first: -100.0}),
        SamplingParams(temperature=1.0, seed=5),
        SamplingParams(temperature=0.9, top_k=20, seed=7, frequency_penalty=-2.0, logit_bias={first: 15.0}),
        SamplingParams(presence_penalty=2.0, frequency_penalty=0.5),
    ]
    scheduler = Scheduler(llm, max_batch=2, prefill_chunk=6)
    try:
        requests, refs, plain = [], [], []
        for i, sampling in enumerate(samplings):
            prompt = llm.tokenizer.encode(PROMPTS[i % 8])
            requests.append(Request(prompt, 40, sampling))
            refs.append(llm.generate([prompt], max_new_tokens=40, **solo_kwargs(sampling))[0])
            neutral = dataclasses.replace(sampling, presence_penalty=0.0, frequency_penalty=0.0,
                                          repetition_penalty=1.0, logit_bias=())
            plain.append(llm.generate([prompt], max_new_tokens=40, **solo_kwargs(neutral))[0].token_ids)
        for i, (ref, got) in enumerate(zip(refs, run_all(scheduler, requests))):
            assert got.ids == ref.token_ids and got.text == ref.text and got.end.finish_reason == ref.finish_reason
            assert (got.ids != plain[i]) == samplings[i].changes_logits, i
    finally:
        scheduler.close()


def test_ignore_eos_and_min_tokens_equal_solo(llm):
    """Requests with ignore_eos, min_tokens (greedy and seeded, with penalties, the request's stop ids
    and stop strings) and plain ones share 3 rows (each row serves several requests in turn), prompts
    prefilled 6 tokens at a time: each equals its solo run. With ignore_eos the demo model's </s> is a
    token of the output, its text "</s>", counted in completion_tokens."""
    cat, sunny, once = (llm.tokenizer.encode(p) for p in ("The cat sat on the", "It was a sunny day.", PROMPTS[0]))
    a = llm.tokenizer.encode("a")[-1]  # "▁a"
    requests = [
        Request(cat, 40, SamplingParams()),  # greedy: </s> after 27 tokens
        Request(cat, 40, SamplingParams(ignore_eos=True)),
        Request(cat, 60, SamplingParams(min_tokens=30)),
        Request(sunny, 16, SamplingParams(temperature=0.8, seed=3, min_tokens=4, ignore_eos=True)),
        Request(sunny, 16, SamplingParams(min_tokens=6), stop_ids=[a]),
        Request(once, 30, SamplingParams(frequency_penalty=1.0, min_tokens=5), stop=[" a"]),
        Request(sunny, 16, SamplingParams(ignore_eos=True, repetition_penalty=1.2)),
    ]
    refs = [llm.generate([r.prompt_ids], max_new_tokens=r.max_tokens, stop_ids=r.stop_ids, stop=r.stop,
                         **solo_kwargs(r.sampling))[0] for r in requests]
    assert [len(ref.token_ids) for ref in refs[:3]] == [27, 40, 33] and refs[1].token_ids[27] == 2
    assert (refs[4].stop, refs[5].stop) == (a, " a") and len(refs[4].token_ids) >= 6
    assert llm.generate([once], max_new_tokens=30, frequency_penalty=1.0, stop=" a")[0].text == ", there was"
    scheduler = Scheduler(llm, max_batch=3, prefill_chunk=6)
    try:
        done = run_all(scheduler, requests)
        for ref, got in zip(refs, done):
            assert got.ids == ref.token_ids and got.text == ref.text
            assert got.end.finish_reason == ref.finish_reason and got.end.stop == ref.stop
            assert got.end.completion_tokens == len(ref.token_ids) + isinstance(ref.stop, int)
        ignored = done[1]
        assert [t.text for t in ignored.tokens if t.id == 2] == ["</s>"] and ignored.end.completion_tokens == 40
        assert scheduler.stats()["failed"] == 0
    finally:
        scheduler.close()


def test_min_tokens_leaves_the_logprobs_the_models(llm):
    """The demo model's greedy reply to "It was a sunny day." is </s>: min_tokens holds it back from
    sampling, while the logprobs stay those of the model's logits, </s> the most likely."""
    prompt = llm.tokenizer.encode("It was a sunny day.")
    scheduler = Scheduler(llm, max_batch=2)
    try:
        (got,) = run_all(scheduler, [Request(prompt, 3, SamplingParams(min_tokens=3), logprobs=2)])
        assert got.ids == llm.generate([prompt], max_new_tokens=3, min_tokens=3)[0].token_ids and 2 not in got.ids
        lp = llm.logits(prompt).double().log_softmax(-1)[-1]
        first = got.tokens[0]
        assert first.top_logprobs[0][0] == 2 and first.top_logprobs[0][1] == pytest.approx(float(lp[2]), abs=1e-5)
        assert first.logprob == pytest.approx(float(lp[first.id]), abs=1e-5)
    finally:
        scheduler.close()


def test_a_large_logit_bias_forces_its_token_and_logprobs_stay_the_models(llm):
    """An unseeded sampled request and a greedy one, both with +100 on one id: every token is that id;
    the log-probabilities are the model's raw ones, not those of the biased logits."""
    scheduler = Scheduler(llm, max_batch=2)
    try:
        prompt = llm.tokenizer.encode("Once upon a time")
        forced = llm.tokenizer.encode(" cat", bos=False)[-1]
        requests = [Request(prompt, 8, SamplingParams(temperature=1.0, logit_bias={forced: 100.0})),
                    Request(prompt, 8, SamplingParams(logit_bias={forced: 100.0}), logprobs=2)]
        sampled, greedy = run_all(scheduler, requests)
        assert sampled.ids == greedy.ids == [forced] * 8
        logits = llm.logits(prompt + greedy.ids).double()
        for i, t in enumerate(greedy.tokens):
            lp = logits[len(prompt) - 1 + i].log_softmax(-1)
            assert t.logprob == pytest.approx(float(lp[forced]), abs=1e-4) and t.logprob < -1
            assert [k for k, _ in t.top_logprobs] == lp.topk(2).indices.tolist()
    finally:
        scheduler.close()


def prompt_reference(llm, prompt, k):
    """(logprob, top-k ids, top-k logprobs) of prompt tokens 1, 2, ... from one full forward:
    ``llm.logits`` over the ids the tokenizer can decode, log-softmax in float64."""
    lp = llm.logits(prompt)[:, : llm.tokenizer.vocab_size].double().log_softmax(-1)
    top = lp.topk(k) if k else None
    return [(float(lp[j - 1, t]), top.indices[j - 1].tolist() if k else [], top.values[j - 1].tolist() if k else [])
            for j, t in enumerate(prompt) if j]


def assert_prompt_logprobs(llm, got, prompt, k):
    assert [t.id for t in got.prompt_tokens] == prompt[1:]
    for t, (logprob, top_ids, top_values) in zip(got.prompt_tokens, prompt_reference(llm, prompt, k)):
        assert t.logprob == pytest.approx(logprob, abs=2e-5)
        assert [i for i, _ in t.top_logprobs] == top_ids
        assert [v for _, v in t.top_logprobs] == pytest.approx(top_values, abs=2e-5)


def test_prompt_logprobs_are_the_models_across_chunks(llm, monkeypatch):
    """A prompt scored 5 tokens per step, in mixed steps beside a decoding row: each prompt token's
    logprob and top-k are one full forward's, in one event per chunk before the first token; each
    step asks for the logits of its own tokens only; the tokens are the solo run's."""
    scheduler = Scheduler(llm, max_batch=2, prefill_chunk=5)
    try:
        ops = spy_ops(scheduler, monkeypatch)
        prompt = llm.tokenizer.encode(LONG)
        decoding, got = Collector(), Collector()
        scheduler.submit(Request(llm.tokenizer.encode(PROMPTS[3]), 40), decoding)
        while not decoding.tokens:
            decoding.done.wait(0.001)
        scheduler.submit(Request(prompt, 6, logprobs=3, prompt_logprobs=True), got)
        got.wait()
        assert_prompt_logprobs(llm, got, prompt, 3)
        assert len(got.prompt_events) >= len(prompt) // 5 and all(len(e.tokens) <= 5 for e in got.prompt_events)
        assert got.ids == llm.generate([prompt], max_new_tokens=6)[0].token_ids and got.end.cached_tokens == 0
        mixed = [op for op in ops if op[0] == "mixed"]
        assert any(op[1] and op[2] for op in mixed)  # chunks beside the decoding row
        assert all(len(op[3]) <= len(op[1]) + sum(len(chunk) for _, chunk in op[2]) for op in mixed)
        decoding.wait()
    finally:
        scheduler.close()


def test_prompt_logprobs_over_the_decodable_ids(tmp_path):
    """A Llama 3 tokenizer (128256 ids) and a vocabulary padded past it: prompt logprobs are the
    log-softmax over the decodable ids, as a sampled token's."""
    from tests.checkpoints import write_checkpoint

    write_checkpoint(tmp_path, tokenizer="llama3", vocab_size=128256 + 64)
    tiny = Llama.from_pretrained(tmp_path, device="cpu")
    scheduler = Scheduler(tiny, max_batch=2, max_seq_len=64, prefill_chunk=4)
    try:
        prompt = tiny.tokenizer.encode("It was a dark and stormy night; the rain fell in torrents.")
        (got,) = run_all(scheduler, [Request(prompt, 2, logprobs=2, prompt_logprobs=True)])
        assert_prompt_logprobs(tiny, got, prompt, 2)
    finally:
        scheduler.close()


def test_prompt_logprobs_are_the_models_under_a_logit_bias(llm):
    """A logit bias changes what is sampled, not the prompt's logprobs (the model's raw ones, as a
    sampled token's)."""
    scheduler = Scheduler(llm, max_batch=2, prefill_chunk=7)
    try:
        prompt = llm.tokenizer.encode(LONG)
        forced = llm.tokenizer.encode(" cat", bos=False)[-1]
        (got,) = run_all(scheduler, [Request(prompt, 3, SamplingParams(logit_bias={forced: 100.0}), logprobs=2,
                                             prompt_logprobs=True)])
        assert got.ids == [forced] * 3
        assert_prompt_logprobs(llm, got, prompt, 2)
    finally:
        scheduler.close()


def test_prompt_logprobs_take_no_cached_prefix(llm):
    """A request with prompt logprobs prefills its whole prompt even when a free row holds it (the
    cached positions would have no logits); one without still reuses the prefix."""
    scheduler = Scheduler(llm, max_batch=1)
    try:
        prompt = llm.tokenizer.encode(LONG)
        first, again, plain = (run_all(scheduler, [r])[0] for r in (
            Request(prompt, 2, logprobs=1, prompt_logprobs=True), Request(prompt, 2, logprobs=1, prompt_logprobs=True),
            Request(prompt, 2)))
        assert first.end.cached_tokens == again.end.cached_tokens == 0
        assert again.prompt_tokens == first.prompt_tokens and len(first.prompt_tokens) == len(prompt) - 1
        assert plain.end.cached_tokens == len(prompt) - 1 and plain.ids == first.ids
    finally:
        scheduler.close()


def test_max_tokens_0_prefills_or_scores_the_prompt_only(llm):
    """max_tokens 0 generates nothing: finish_reason "length" once the prompt is prefilled (with
    prompt logprobs: scored); the row then holds the prompt for the next request."""
    scheduler = Scheduler(llm, max_batch=2, prefill_chunk=4)
    try:
        prompt = llm.tokenizer.encode(PROMPTS[2])
        scored, plain = run_all(scheduler, [Request(prompt, 0, logprobs=0, prompt_logprobs=True), Request(prompt, 0)])
        for got in (scored, plain):
            assert got.tokens == [] and got.end.text == ""
            assert (got.end.finish_reason, got.end.prompt_tokens, got.end.completion_tokens) == ("length", len(prompt), 0)
        assert_prompt_logprobs(llm, scored, prompt, 0)
        assert plain.prompt_events == []
        (after,) = run_all(scheduler, [Request(prompt, 5)])
        assert after.ids == llm.generate([prompt], max_new_tokens=5)[0].token_ids
        assert after.end.cached_tokens == len(prompt) - 1
    finally:
        scheduler.close()


def test_a_stop_id_comes_with_its_logprob(llm):
    """The stop id that ends a request with logprobs is in its Finished event, with its logprob and
    top-k (vLLM's completions list it last); without logprobs it is not."""
    scheduler = Scheduler(llm, max_batch=2)
    try:
        prompt = llm.tokenizer.encode(PROMPTS[3])
        ref = llm.generate([prompt], max_new_tokens=2)[0].token_ids
        assert ref[1] != ref[0]
        got, plain = run_all(scheduler, [Request(prompt, 5, stop_ids=[ref[1]], logprobs=2),
                                         Request(prompt, 5, stop_ids=[ref[1]])])
        assert got.ids == plain.ids == ref[:1] and got.end.stop == plain.end.stop == ref[1]
        lp = llm.logits(prompt + ref).double().log_softmax(-1)[len(prompt)]  # what predicts ref[1]
        stop = got.end.stop_token
        assert stop.id == ref[1] and stop.logprob == pytest.approx(float(lp[ref[1]]), abs=2e-5)
        assert [i for i, _ in stop.top_logprobs] == lp.topk(2).indices.tolist()
        assert plain.end.stop_token is None
    finally:
        scheduler.close()


class PoisonedPromptRunner:
    """The runner, the last logits row of its packed steps that return more than two NaN (a row
    that scores a prompt token)."""

    def __init__(self, runner):
        self.runner = runner

    def __getattr__(self, name):
        return getattr(self.runner, name)

    def __call__(self, *args, **kwargs):
        return self.runner(*args, **kwargs)

    def forward_packed(self, *args, **kwargs):
        logits = self.runner.forward_packed(*args, **kwargs)
        if logits.shape[0] > 2:
            logits = logits.clone()
            logits[-1] = float("nan")
        return logits


def test_nan_prompt_logits_fail_their_request_alone(llm, monkeypatch):
    """NaN logits where a prompt is scored fail that request (max_tokens 0: no sampled token would
    have caught them), not the request prefilled beside it."""
    scheduler = Scheduler(llm, max_batch=2)
    prompt = llm.tokenizer.encode("Once upon a time")
    ref = llm.generate([prompt], max_new_tokens=6)[0]
    try:
        monkeypatch.setattr(llm, "runner", PoisonedPromptRunner(llm.runner))
        with step_lock(llm.runner):  # both prefilled in one step
            ok, failed = Collector(), Collector()
            scheduler.submit(Request(prompt, 6), ok)
            scheduler.submit(Request(llm.tokenizer.encode(LONG), 0, logprobs=0, prompt_logprobs=True), failed)
        assert ok.wait().ids == ref.token_ids
        assert isinstance(failed.wait().end, Failed) and "NaN/Inf logits (row 1, reading the prompt)" in failed.end.message
        assert scheduler.stats()["failed"] == 1
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
        with pytest.raises(ValueError, match=r"logit_bias has token id\(s\) \[1024\] outside the vocabulary"):
            scheduler.submit(Request([1], 10, SamplingParams(logit_bias={1024: 1.0})), Collector())
        with pytest.raises(ValueError, match="max_tokens must be an integer >= 0, got -1"):
            scheduler.submit(Request([1], -1), Collector())
        with pytest.raises(ValueError, match="prompt_logprobs needs logprobs"):
            scheduler.submit(Request([1, 5], 2, prompt_logprobs=True), Collector())
        with pytest.raises(ValueError, match="min_tokens 11 is more than max_tokens 10: lower min_tokens"):
            scheduler.submit(Request([1], 10, SamplingParams(min_tokens=11)), Collector())
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


def test_mistyped_requests_are_refused_at_submit_not_mid_batch(llm):
    """logprobs or token ids that are not integers are a ValueError at submit: accepted, a float
    logprobs failed every request of its step (topk(2.5)), and a float prompt id was truncated."""
    scheduler = Scheduler(llm, max_batch=2, max_seq_len=64)
    try:
        prompt = llm.tokenizer.encode("Once upon a time there was a little girl named Lily. She")
        for bad in (dict(logprobs=2.5), dict(logprobs=True), dict(prompt_ids=prompt[:1] + [3.7] + prompt[1:]),
                    dict(stop_ids=[2.5])):
            with pytest.raises(ValueError, match="must be (an )?integers?"):
                scheduler.submit(Request(**{**dict(prompt_ids=prompt, max_tokens=5), **bad}), Collector())
        import numpy as np

        (ok,) = run_all(scheduler, [Request(np.array(prompt), 8, stop_ids=np.array([2]), logprobs=np.int64(1))])
        assert ok.ids == llm.generate([prompt], max_new_tokens=8)[0].token_ids
        assert scheduler.stats()["failed"] == 0
    finally:
        scheduler.close()


def test_a_stop_string_completed_by_held_back_bytes_stops_as_alone(tmp_path):
    """The last token of a reply ends inside a character (held back, flushed as U+FFFD at the end)
    and the flushed text completes a stop string spanning tokens: finish_reason "stop" and that
    string, as the solo run reports (the scheduler said "length", stop None)."""
    from tests.checkpoints import write_checkpoint

    write_checkpoint(tmp_path, tokenizer="sentencepiece")  # random weights: byte-fallback tokens come out
    tiny = Llama.from_pretrained(tmp_path, device="cpu")
    prompt = tiny.tokenizer.encode("it was", bos=True)
    ref = tiny.generate([prompt], max_new_tokens=2, stop=["l\ufffd"])[0]
    assert (ref.finish_reason, ref.stop, len(ref.token_ids)) == ("stop", "l\ufffd", 2)  # "l", then a lead byte
    scheduler = Scheduler(tiny, max_batch=2, max_seq_len=64)
    try:
        (got,) = run_all(scheduler, [Request(prompt, 2, stop=["l\ufffd"])])
        assert got.ids == ref.token_ids and got.text == ref.text
        assert (got.end.finish_reason, got.end.stop) == (ref.finish_reason, ref.stop)
    finally:
        scheduler.close()


def test_a_pool_that_does_not_fit_is_a_clear_error(llm, monkeypatch):
    def out_of_memory(batch, max_len):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 68.00 GiB")

    monkeypatch.setattr(llm.runner, "new_cache", out_of_memory)
    # K and V: 4 layers x 64 rows x 513 slots x 2 kv heads x 32 dims x 4 bytes (float32) = 0.067 GB
    with pytest.raises(ValueError, match=r"pool of 64 rows x 513 tokens needs 0\.1 GB .* lower max_batch"):
        Scheduler(llm, max_batch=64)


class FailingRunner:
    """The runner, its ``fail_at``-th forward (a decode step, ``runner(...)``, or a mixed step,
    ``runner.forward_packed``) raising."""

    def __init__(self, runner, fail_at):
        self.runner, self.left = runner, fail_at

    def __getattr__(self, name):
        return getattr(self.runner, name)

    def _count(self):
        self.left -= 1
        if self.left == 0:
            raise RuntimeError("out of memory (simulated)")

    def __call__(self, *args, **kwargs):
        self._count()
        return self.runner(*args, **kwargs)

    def forward_packed(self, *args, **kwargs):
        self._count()
        return self.runner.forward_packed(*args, **kwargs)


class PoisonedRunner:
    """The runner, row 1 of its decode steps over two rows or more NaN."""

    def __init__(self, runner):
        self.runner = runner

    def __getattr__(self, name):
        return getattr(self.runner, name)

    def __call__(self, tokens, cache, logits_at=None):
        logits = self.runner(tokens, cache, logits_at=logits_at)
        if tokens.shape[1] == 1 and tokens.shape[0] > 1:
            logits = logits.clone()
            logits[1] = float("nan")
        return logits


def test_a_failing_step_fails_its_requests_not_the_scheduler(llm, monkeypatch):
    scheduler = Scheduler(llm, max_batch=2)
    prompt = llm.tokenizer.encode("Once upon a time")
    ref = llm.generate([prompt], max_new_tokens=10)[0]
    try:
        monkeypatch.setattr(llm, "runner", FailingRunner(llm.runner, fail_at=3))  # the second decode step
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
        monkeypatch.setattr(llm, "runner", PoisonedRunner(llm.runner))
        got = run_all(scheduler, [Request(prompt, 6), Request(prompt + [5], 6)])
        assert got[0].ids == ref.token_ids and got[0].end.finish_reason == ref.finish_reason
        assert isinstance(got[1].end, Failed) and "NaN/Inf" in got[1].end.message
        assert scheduler.stats()["failed"] == 1
    finally:
        scheduler.close()


def test_nan_logits_fail_their_request_alone_with_logprobs(llm, monkeypatch):
    """The NaN row's id is NON_FINITE (-1): gathering its logprob must not fail the whole step
    (on the CPU an index error failed every request of the step; on a GPU a device-side assert)."""
    scheduler = Scheduler(llm, max_batch=2)
    prompt = llm.tokenizer.encode("Once upon a time")
    ref = llm.generate([prompt], max_new_tokens=6)[0]
    try:
        monkeypatch.setattr(llm, "runner", PoisonedRunner(llm.runner))
        got = run_all(scheduler, [Request(prompt, 6, logprobs=2), Request(prompt + [5], 6, logprobs=2)])
        assert got[0].ids == ref.token_ids and got[0].end.finish_reason == ref.finish_reason
        assert all(t.logprob is not None and len(t.top_logprobs) == 2 for t in got[0].tokens)
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
    assert all(c.done.is_set() and isinstance(c.end, Finished) for c in pending), [c.end for c in pending]
    assert pending[-1].end.finish_reason == "cancelled"
    with pytest.raises(RuntimeError, match="closed"):
        scheduler.submit(Request([1], 2), Collector())
    assert torch.is_tensor(scheduler.cache.seq_lens)


def test_a_close_between_the_threads_check_and_its_return_still_ends_every_request(llm, monkeypatch):
    """close() landing after the scheduler thread has read ``_closed`` under its lock and before it
    decides whether to stop (here: while it delivers events) must not stop the thread with requests
    left waiting or running: each one still gets its end. A race seen once in CI (a waiting request
    never ended); forced here by closing from another thread during the first delivery."""
    scheduler = Scheduler(llm, max_batch=1)
    submitted, closers = threading.Event(), []
    deliver = scheduler._deliver

    def deliver_then_close():
        deliver()
        if not closers and submitted.wait(30):
            closers.append(threading.Thread(target=scheduler.close))
            closers[0].start()
            while not scheduler._closed:
                time.sleep(0.001)

    monkeypatch.setattr(scheduler, "_deliver", deliver_then_close)
    pending = [Collector() for _ in range(3)]
    for c in pending:
        scheduler.submit(Request(llm.tokenizer.encode("Once upon a time"), 300), c)
    submitted.set()
    for c in pending:
        c.wait()
    assert all(isinstance(c.end, Finished) for c in pending), [c.end for c in pending]
    assert pending[-1].end.finish_reason == "cancelled"
    closers[0].join()


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


LONG = "Once upon a time there was a little girl named Lily. She loved to play in the park with her dog Max."


def spy_ops(scheduler, monkeypatch, then=None):
    """The device operations the scheduler runs, recorded as it runs them (``then(op)`` after each)."""
    ops, apply = [], scheduler._apply

    def recording(op):
        out = apply(op)
        ops.append(op)
        if then is not None:
            then(op)
        return out

    monkeypatch.setattr(scheduler, "_apply", recording)
    return ops


def test_mixed_steps_prefill_several_prompts(llm, monkeypatch):
    """Prompts of different lengths share the ``prefill_chunk`` budget of each step, oldest first,
    one of them over several steps, and every request gets its solo tokens."""
    scheduler = Scheduler(llm, max_batch=4, prefill_chunk=7)
    try:
        ops = spy_ops(scheduler, monkeypatch)
        prompts = [llm.tokenizer.encode(p) for p in (LONG, PROMPTS[1], PROMPTS[4], PROMPTS[7])]
        collectors = [Collector() for _ in prompts]
        with step_lock(llm.runner):  # all four are queued before the first step ends
            for i, (p, c) in enumerate(zip(prompts, collectors)):
                scheduler.submit(Request(p, 8 + 3 * i), c)
        for i, (p, c) in enumerate(zip(prompts, collectors)):
            assert c.wait().ids == llm.generate([p], max_new_tokens=8 + 3 * i)[0].token_ids
        mixed = [op for op in ops if op[0] == "mixed"]
        assert all(sum(len(chunk) for _, chunk in op[2]) <= 7 for op in mixed)
        assert [len(chunk) for _, chunk in mixed[0][2]] == [7]  # the 25-token prompt first, alone
        assert any(len(op[2]) > 1 for op in mixed)  # its last chunk shares a step with the next prompt
        stats = scheduler.stats()
        assert stats["mixed_steps"] == len(mixed) and stats["prefill_chunks"] == sum(len(op[2]) for op in mixed)
        assert stats["decode_steps"] == sum(op[0] == "decode" for op in ops) > 0
    finally:
        scheduler.close()


def test_a_row_prefilled_below_a_decoding_row(llm, monkeypatch):
    """A new request takes row 0 (reusing the prefix its last request left) while row 1 decodes: its
    prompt is prefilled in chunks by mixed steps that also decode row 1 (and decode steps between
    them run over rows 0-1, row 0 fed a padding token at its fill). Both get their solo tokens."""
    scheduler = Scheduler(llm, max_batch=2, prefill_chunk=4)
    try:
        ops = spy_ops(scheduler, monkeypatch)
        first, decoding, late = (llm.tokenizer.encode(p) for p in (PROMPTS[0], PROMPTS[1], LONG))
        late_out = Collector()
        first_out, decoding_out = SubmitWhenFinished(scheduler, Request(late, 10), late_out), Collector()
        with step_lock(llm.runner):
            scheduler.submit(Request(first, 2), first_out)
            scheduler.submit(Request(decoding, 60), decoding_out)
        assert decoding_out.wait().ids == llm.generate([decoding], max_new_tokens=60)[0].token_ids
        assert late_out.wait().ids == llm.generate([late], max_new_tokens=10)[0].token_ids
        assert late_out.end.cached_tokens == len(first)  # "Once upon a time" and BOS
        inside = [op for op in ops if op[0] == "mixed" and op[1] == [1] and [row for row, _ in op[2]] == [0]]
        assert len(inside) == -(-(len(late) - len(first)) // 4)  # every chunk of the late prompt
    finally:
        scheduler.close()


def test_cancel_during_prefill_keeps_what_was_prefilled(llm, monkeypatch):
    """A request cancelled between its prompt's chunks, while another request decodes in the same
    steps, finishes with no tokens; its row keeps the chunks it got, which the next request with
    that prompt reuses. Every request that runs to its end gets its solo tokens."""
    scheduler = Scheduler(llm, max_batch=2, prefill_chunk=3)
    try:
        other, long = llm.tokenizer.encode(PROMPTS[2]), llm.tokenizer.encode(LONG)
        held = []  # row 1's fill when the cancel came

        def cancel_after_two_chunks(op):
            if op[0] == "mixed" and not held and scheduler.cache.seq_lens_cpu[1] >= 4:
                assert op[1] == [0]  # row 0 decodes in this step
                held.append(scheduler.cache.seq_lens_cpu[1])
                scheduler.cancel(1)  # the long prompt's request

        spy_ops(scheduler, monkeypatch, then=cancel_after_two_chunks)
        again = Collector()  # the resubmitted request: row 1 is then the only free row
        decoding, cancelled = Collector(), SubmitWhenFinished(scheduler, Request(long, 10), again)
        with step_lock(llm.runner):
            scheduler.submit(Request(other, 30), decoding)  # 8 prompt tokens: chunks of 3, 3, 2
            scheduler.submit(Request(long, 10), cancelled)  # chunks of 1, 3, ... after them
        assert cancelled.wait().end.finish_reason == "cancelled" and cancelled.ids == []
        assert again.wait().ids == llm.generate([long], max_new_tokens=10)[0].token_ids
        assert again.end.cached_tokens == held[0] == 4
        assert decoding.wait().ids == llm.generate([other], max_new_tokens=30)[0].token_ids
    finally:
        scheduler.close()


@pytest.mark.gpu
def test_serving_on_the_gpu_replays_only_graphs_captured_at_start(monkeypatch):
    """On CUDA, once the scheduler has started, serving runs no eager forward: every decode and
    mixed step replays a graph captured at start, so no request waits for a capture or for Triton's
    compiler (measured before: 2 s stalls). Outputs equal solo runs (float32: no bf16 near-ties)."""
    gpu = Llama.from_pretrained(DEMO_MODEL_DIR, device="cuda", dtype=torch.float32)
    prompts = [gpu.tokenizer.encode(p) for p in PROMPTS] + [gpu.tokenizer.encode(LONG)] * 2
    solo = [gpu.generate([p], max_new_tokens=12)[0].token_ids for p in prompts]
    scheduler = Scheduler(gpu, max_batch=5, max_seq_len=128, prefill_chunk=24)
    try:
        eager = []
        for name in ("forward", "forward_packed"):
            real = getattr(gpu.model, name)
            monkeypatch.setattr(gpu.model, name,
                                lambda *a, _real=real, _name=name, **k: eager.append(_name) or _real(*a, **k))
        got = run_all(scheduler, [Request(p, 12) for p in prompts])
        assert [g.ids for g in got] == solo
        assert eager == []
        assert scheduler.stats()["mixed_steps"] > 0 and scheduler.stats()["decode_steps"] > 0
    finally:
        scheduler.close()


@pytest.mark.gpu
def test_penalties_and_prompt_logprobs_on_the_gpu():
    """On CUDA (pinned copies, replayed graphs, steps that score prompt chunks in graphs of their own):
    requests with a logit bias and penalties, greedy and seeded, or min_tokens and ignore_eos, equal
    their solo runs beside a request whose prompt is scored, and the scores equal one full forward's."""
    gpu = Llama.from_pretrained(DEMO_MODEL_DIR, device="cuda", dtype=torch.float32)
    prompts = [gpu.tokenizer.encode(p) for p in PROMPTS[:3]] + [gpu.tokenizer.encode(LONG)]
    settings = [dict(presence_penalty=0.5, frequency_penalty=1.0, repetition_penalty=1.2, logit_bias={5: 3.0}),
                dict(repetition_penalty=1.5, temperature=0.8, top_k=40, seed=3),
                dict(min_tokens=10, ignore_eos=True)]
    solo = [gpu.generate([p], max_new_tokens=12, **settings[i % 3])[0].token_ids for i, p in enumerate(prompts)]
    scheduler = Scheduler(gpu, max_batch=3, max_seq_len=128, prefill_chunk=24)
    try:
        requests = [Request(p, 12, SamplingParams(**settings[i % 3])) for i, p in enumerate(prompts)]
        scored_prompt = prompts[-1]
        got = run_all(scheduler, requests + [Request(scored_prompt, 1, logprobs=2, prompt_logprobs=True)])
        assert [g.ids for g in got[:-1]] == solo
        scored = got[-1]
        assert [t.id for t in scored.prompt_tokens] == scored_prompt[1:]
        for t, (logprob, top_ids, top_values) in zip(scored.prompt_tokens, prompt_reference(gpu, scored_prompt, 2)):
            assert t.logprob == pytest.approx(logprob, abs=1e-3)  # float32 on the GPU, other shapes than logits'
            assert [v for _, v in t.top_logprobs] == pytest.approx(top_values, abs=1e-3)
        assert any(key[0] == "scored" for key in gpu.runner._graphs)  # the scored chunks' bucket recurred
    finally:
        scheduler.close()
