"""Continuous batching: many requests share one fixed pool of KV-cache rows.

A request takes a free row of the pool. Prompts are prefilled in chunks: an iteration takes at most
``prefill_chunk`` prompt tokens in all, from the oldest requests first (the last of them may get
part of its rest), so a long prompt delays the running decodes by a bounded time. An iteration
with prompt tokens runs one *mixed step*: one packed forward (``Runner.forward_packed``) of every
decoding row's next token together with the prompt chunks, so the weights are read once for all of
them and the prompts of several requests are prefilled at once (a CUDA graph per token bucket on a
GPU). An iteration without runs one decode step over the rows up to the last decoding one (the
runner's decode graph on a GPU): a row among them that is not decoding feeds a token whose result
nobody reads, written at its fill, which lies past what the row holds. A row that finishes (stop
id, stop string, ``max_tokens``, cancel) is free for the queue at the next iteration while the
others keep decoding. The cache's per-row fill (``seq_lens``) is what makes this work: a row is
reset and refilled without touching the others.

Exactness: a row reads only its own cache, so a request's tokens equal its solo
``Llama.generate`` run (greedy, or sampled with its ``seed``): each request samples with its own
generator, seeded as the solo run seeds its one, drawing once per token as it does. A request
with ``min_tokens``, a logit bias or penalties has its row of a
:class:`~minillama.sampling.LogitsProcessor` over the pool (allocated when the first such request
comes), set up when its prompt is prefilled and counting its tokens on the device; its logits are
changed as its solo run's are (``min_tokens`` holds back the same ids, and its stop strings are
searched for from the same token). As in any batch, only the shapes of the matmuls change; on a
GPU another shape may round a bf16 near-tie the other way.

Prefix reuse: a free row keeps the ids whose keys and values it holds (a request cancelled while
its prompt was prefilled leaves the chunks it got). A new request takes the
free row holding the longest prefix of its prompt (chat clients resend the whole conversation)
when that saves at least ``MIN_REUSE`` tokens over the lowest free row, cuts the row back to that
prefix and prefills only the rest; :meth:`Scheduler.stats` reports the hit rate. Otherwise it
takes the lowest free row: the decode step runs over the rows up to the last active one (the
runner's CUDA graphs are bucketed by that count), so active rows are best kept at the front. A
request with ``prompt_logprobs`` takes no cached prefix: it prefills its whole prompt, whose every
position's logits it needs.

Prompt logprobs: the mixed step that prefills a chunk of such a request returns the logits of each
of the chunk's tokens too (row j's give the log-probability of prompt token j + 1); their
log-softmax, each token's entry and the top-k are computed on the device as a sampled token's and
go to the host with the step's tokens, as one :class:`PromptLogprobs` event per chunk, before the
request's first :class:`Token`. So the log-probabilities held at once are one step's rows, never a
whole prompt's: at most ``prefill_chunk`` plus the decoding rows x the vocabulary in float32 (about
260 MB for 512 x 128256; as much again for the float32 copy of bf16 logits). On a GPU such a step
replays a packed graph with a logits row per token (``Runner.max_scored_tokens`` tokens at most;
larger ones run eagerly).

Overlap: each iteration first launches its device work (the step, the sampling of the decoding
rows and of the first tokens of completed prompts; ids and fills move between host and device
without waiting), and only then processes the previous iteration's tokens on the host
(detokenizing, stop strings, events) while the device computes. The price: a row finished by the
previous step runs one wasted token in the current one (never shown, past its output in the cache;
rows have a spare slot).

Tensor parallelism: every process builds a Scheduler; rank 0's runs the thread and takes the
requests, the others call :meth:`Scheduler.follow`. Each device operation (fills, mixed and decode
steps) goes through one place, ``_op``, where rank 0 broadcasts it before running it, so the other
ranks replay the same operations in the same order; the ids rank 0 samples are broadcast with
them. (A rank that fails leaves the others waiting: the group is as alive as its weakest rank.)

The scheduler runs in one background thread; each step (forward and sampling) holds the runner's
step lock (:func:`minillama.concurrency.step_lock`), as ``Llama.generate`` does, so both may share a
model. :meth:`Scheduler.submit` is thread-safe and returns at once; the request's events
(:class:`PromptLogprobs` if asked, :class:`Token`, then :class:`Finished` or :class:`Failed`) go to
its callback, once per iteration through ``deliver`` when set (e.g. onto an event loop), else from
the scheduler thread.
"""
import math
import operator
import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Deque, Dict, List, Optional, Sequence, Tuple, Union

import torch

from minillama.concurrency import step_lock
from minillama.errors import NonFiniteLogitsError
from minillama.runner import bucket, packed_bucket
from minillama.sampling import NON_FINITE, LogitsProcessor, SamplingParams, record_event, sample, to_device, to_host
from minillama.streaming import IncrementalDecoder, StopStrings

MAX_LOGPROBS = 20  # top alternatives per token at most (OpenAI's limit)
GREEDY = SamplingParams()
MIN_REUSE = 32  # cached tokens that make a request take a free row other than the lowest one


class QueueFull(Exception):
    """The waiting queue holds ``max_queue`` requests; try again later."""


@dataclass
class Request:
    """What to generate. The prompt must leave room for ``max_tokens`` in a cache row; ``max_tokens``
    0 prefills the prompt and generates nothing (with ``prompt_logprobs``: scores the prompt)."""

    prompt_ids: List[int]
    max_tokens: int
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stop: Sequence[str] = ()  # stop strings: the text is cut before the first one
    stop_ids: Sequence[int] = ()  # ids that end the request, besides the checkpoint's (unless sampling.ignore_eos)
    logprobs: Optional[int] = None  # None: off; k: the chosen token's log-probability and the k best
    prompt_logprobs: bool = False  # with logprobs: those of the prompt's tokens too (no prefix reuse)
    skip_special_tokens: bool = False  # the text leaves out special tokens' (tokenizer.special_ids)


@dataclass
class Token:
    """One new token: ``text`` is what it releases ("" while text is held back)."""

    id: int
    text: str
    # log-softmax of the model's raw logits (temperature 1, unfiltered, before any logit bias or penalty)
    # over the ids the tokenizer can decode: a padded vocabulary's extra ids and undecodable holes are
    # left out, as in sampling
    logprob: Optional[float] = None
    top_logprobs: List[Tuple[int, float]] = field(default_factory=list)


@dataclass
class PromptLogprobs:
    """With ``prompt_logprobs``: the log-probabilities of one prefilled chunk's prompt tokens, each
    given the tokens before it, as a :class:`Token`'s (text ""). The events of a request cover its
    prompt tokens 1, 2, ... in order (token 0 follows nothing); all come before its first Token."""

    tokens: List[Token]


@dataclass
class Finished:
    finish_reason: str  # "stop", "length" or "cancelled"
    stop: Union[int, str, None]  # the stop id or string that ended the request
    text: str  # held-back text released at the end (part of the reply)
    prompt_tokens: int
    completion_tokens: int  # new tokens, including one that completed a stop string and a stop id that ended it
    cached_tokens: int  # prompt tokens whose cache entries came from an earlier request
    stop_token: Optional[Token] = None  # with logprobs: the stop id that ended the request, its logprob


@dataclass
class Failed:
    message: str


Event = Union[Token, PromptLogprobs, Finished, Failed]


class _Sequence:
    """A request in flight: its row, prefill position, sampled tokens and text state."""

    def __init__(self, rid: int, request: Request, on_event: Callable[[Event], None], eos_ids, tokenizer, device):
        self.rid = rid
        self.request = request
        self.prompt = list(request.prompt_ids)
        self.on_event = on_event
        self.stop_ids = request.sampling.ending_ids(eos_ids, request.stop_ids)
        self.min_tokens_ids = request.sampling.min_tokens_ids(eos_ids, request.stop_ids)
        self.generator = request.sampling.generator(device)
        self.decoder = IncrementalDecoder(tokenizer, self.prompt, request.skip_special_tokens)
        self.stops = StopStrings(request.stop)
        self.row: Optional[int] = None
        self.pos = 0  # prompt tokens in the cache
        self.cached = 0  # of those, reused from an earlier request
        self.tokens: List[int] = []  # the output: sampled tokens, a stop id left out
        self.sampled: List[int] = []  # every token sampled, a stop id included (what the cache may hold)
        self.decoding = False  # its prompt is prefilled and its first token sampled (on the device)
        self.cancelled = False
        self.done = False


@dataclass
class _Row:
    seq: Optional[_Sequence] = None
    ids: List[int] = field(default_factory=list)  # what the cache row holds while free


class Scheduler:
    """Continuous batching over a pool of ``max_batch`` cache rows of ``max_seq_len`` tokens.

    Args:
        llm: a loaded ``minillama.Llama``.
        max_batch: cache rows, i.e. requests decoding at once.
        max_seq_len: tokens per row (prompt + max_tokens of one request at most); None: the
            model's context.
        max_queue: requests waiting for a busy row at most; :meth:`submit` raises :class:`QueueFull`
            beyond (0: a request is taken only when a row is free).
        prefill_chunk: prompt tokens prefilled per iteration at most, over all requests (bounds
            the decode stall).
        deliver: takes each iteration's events as ``[(callback, event)]`` and runs the callbacks,
            e.g. all at once on an event loop; None: the scheduler thread calls them one by one.
    """

    def __init__(self, llm, max_batch: int = 8, max_seq_len: Optional[int] = None, max_queue: int = 64,
                 prefill_chunk: int = 256,
                 deliver: Optional[Callable[[List[Tuple[Callable[[Event], None], Event]]], None]] = None):
        context = llm.config.max_position_embeddings
        max_seq_len = context if max_seq_len is None else max_seq_len
        for name, value, low in (("max_batch", max_batch, 1), ("max_seq_len", max_seq_len, 2),
                                 ("max_queue", max_queue, 0), ("prefill_chunk", prefill_chunk, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        if max_seq_len > context:
            raise ValueError(f"max_seq_len {max_seq_len} is more than the model's context of {context}")
        self.llm = llm
        self.max_batch = max_batch
        self.max_seq_len = max_seq_len
        self.max_queue = max_queue
        self.prefill_chunk = prefill_chunk
        # One slot more than a request may hold: a finished row may take one wasted token (Overlap).
        # Rows up to the runner's next graph bucket, so a step over the first B rows can always be
        # padded to its bucket's graph (the rows past max_batch stay empty).
        rows, slots = bucket(max_batch), max_seq_len + 1
        try:
            self.cache = llm.runner.new_cache(rows, slots)
        except RuntimeError as e:  # out of memory (CUDA's OutOfMemoryError is a RuntimeError too)
            c = llm.config
            gb = 2 * c.num_hidden_layers * rows * slots * c.num_key_value_heads * c.head_dim * llm.dtype.itemsize / 1e9
            raise ValueError(
                f"the cache pool of {rows} rows x {slots} tokens needs {gb:.1f} GB and could not be allocated "
                f"on {llm.device} ({str(e).splitlines()[0]}); lower max_batch or max_seq_len"
            ) from None
        self.rows = [_Row() for _ in range(max_batch)]
        self._waiting: Deque[_Sequence] = deque()
        self._by_id: Dict[int, _Sequence] = {}
        self._next_id = 0
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._closed = False
        self._outbox: List[Tuple[_Sequence, Event]] = []
        self.deliver = deliver  # may be set later, e.g. once an event loop runs
        self._next_ids = torch.zeros(self.cache.batch, dtype=torch.long, device=llm.device)  # fed by the next step
        self._processor: Optional[LogitsProcessor] = None  # made for the first request with a bias or penalty
        self._counters = dict(requests=0, finished=0, cancelled=0, failed=0, prompt_tokens=0, cached_tokens=0,
                              prefix_hits=0, generated_tokens=0, decode_steps=0, mixed_steps=0,
                              prefill_chunks=0)
        self._step_lock = step_lock(llm.runner)  # one step (forward + sample) at a time per model
        self._tp = llm.model.tp  # tensor parallelism: rank 0 schedules, the others follow()
        self._capture_graphs()
        self._thread = threading.Thread(target=self._run, name="minillama-scheduler", daemon=True)
        if self._tp is None or self._tp.rank == 0:
            self._thread.start()

    def _capture_graphs(self) -> None:
        """On CUDA, let the runner capture (and tune its GEMV) now, so that no request waits for a
        capture or for Triton's compiler: the decode graph of every batch bucket up to the pool's
        rows, and the packed graph of every token bucket a mixed step can fill (every decoding row
        plus ``prefill_chunk`` prompt tokens). The decode steps run on empty rows: they write
        garbage at the first position of each, past its fill; the packed captures write nothing."""
        runner = self.llm.runner
        if not getattr(runner, "cuda_graphs", False):
            return
        decode = {min(bucket(b), self.cache.batch) for b in range(1, self.cache.batch + 1)}
        packed = {packed_bucket(t) for t in range(1, self.max_batch + self.prefill_chunk + 1)
                  if t <= runner.max_packed_tokens}
        # keep them all, beside a scored step's graph (a logits row per token) for each packed bucket
        runner.max_graphs = max(runner.max_graphs, len(decode) + 2 * len(packed) + 8)
        rows = 1
        while True:
            with self._step_lock, torch.inference_mode():
                self._apply(("capture", rows))  # every rank captures the same graphs, in the same order
            if rows >= self.cache.batch:
                break
            rows = min(bucket(rows + 1), self.cache.batch)
        with self._step_lock, torch.inference_mode():
            self._apply(("capture_packed", self.max_batch + self.prefill_chunk))

    # -- the caller's side (any thread) ---------------------------------------------------------

    def submit(self, request: Request, on_event: Callable[[Event], None]) -> int:
        """Queue ``request``; returns its id. Raises ValueError (bad request) or QueueFull."""
        self.check(request)
        with self._lock:
            if self._closed:
                raise RuntimeError("the scheduler is closed")
            free = sum(r.seq is None for r in self.rows)  # rows the waiting requests will take first
            if len(self._waiting) - free >= self.max_queue:
                raise QueueFull(f"all {self.max_batch} rows are busy and {max(len(self._waiting) - free, 0)} "
                                f"requests are waiting (max_queue {self.max_queue})")
            rid = self._next_id
            self._next_id += 1
            seq = _Sequence(rid, request, on_event, self.llm.stop_ids, self.llm.tokenizer, self.llm.device)
            self._waiting.append(seq)
            self._by_id[rid] = seq
            self._counters["requests"] += 1
            self._wake.notify()
        return rid

    def check(self, request: Request) -> None:
        """Raise ValueError, naming the numbers, when ``request`` cannot run here."""
        n, m = len(request.prompt_ids), request.max_tokens
        vocab = self.llm.tokenizer.vocab_size  # ids the tokenizer can decode (<= the model's vocabulary)
        if n == 0:
            raise ValueError("the prompt is empty: give it at least one token")
        if isinstance(m, bool) or not isinstance(m, int) or m < 0:
            raise ValueError(f"max_tokens must be an integer >= 0, got {m!r}")
        if request.sampling.min_tokens > m:
            raise ValueError(f"min_tokens {request.sampling.min_tokens} is more than max_tokens {m}: lower min_tokens "
                             f"or raise max_tokens")
        if n + m > self.max_seq_len:
            raise ValueError(
                f"the prompt has {n} tokens and max_tokens is {m}: {n + m} tokens, more than the {self.max_seq_len} "
                f"a request may hold here; shorten the prompt or ask for at most {max(self.max_seq_len - n, 0)} tokens"
            )
        ids = list(request.prompt_ids) + list(request.stop_ids)
        bad = [t for t in ids if not _is_int(t)]  # a float id would be truncated on the device, silently
        if bad:
            raise ValueError(f"token ids must be integers, got {bad[:5]}")
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"token id(s) {bad[:5]} are outside the vocabulary [0, {vocab})")
        k = request.logprobs  # not an int: topk would fail the whole step, every request in it
        if k is not None and not (_is_int(k) and 0 <= k <= MAX_LOGPROBS):
            raise ValueError(f"logprobs must be an integer in [0, {MAX_LOGPROBS}], got {k!r}")
        if request.prompt_logprobs and k is None:
            raise ValueError("prompt_logprobs needs logprobs (the k best of each prompt token): give logprobs=0 "
                             "for none of them")
        StopStrings(request.stop)  # checks them
        request.sampling.check_vocabulary(vocab)

    def cancel(self, rid: int) -> None:
        """End request ``rid`` (finish_reason "cancelled"); its row is free at the next iteration."""
        with self._lock:
            seq = self._by_id.get(rid)
            if seq is not None:
                seq.cancelled = True
                self._wake.notify()

    def stats(self) -> dict:
        """Counters since the start, the queue, and the prefix-cache hit rate (cached / prompt tokens).
        ``generated_tokens`` counts new tokens as :class:`Finished`'s ``completion_tokens`` does (a stop
        id that ended a request too). Steps: ``decode_steps`` (decoding rows only), ``mixed_steps``
        (with prompt chunks, of which ``prefill_chunks`` counts one per request per step)."""
        with self._lock:
            out = dict(self._counters)
            out["waiting"] = len(self._waiting)
            out["running"] = sum(r.seq is not None for r in self.rows)
        out["prefix_hit_rate"] = out["cached_tokens"] / out["prompt_tokens"] if out["prompt_tokens"] else 0.0
        return out

    def close(self) -> None:
        """Stop the thread; requests still waiting or running are cancelled (and, under tensor
        parallelism, the other ranks' :meth:`follow` returns)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._wake.notify()
        if self._thread.is_alive():
            self._thread.join()
        if self._tp is not None and self._tp.rank == 0:  # also after the thread died: follow() returns
            self._tp.broadcast_object(None)

    # -- the scheduler thread -------------------------------------------------------------------

    def _run(self) -> None:
        pending: Optional[_Step] = None  # launched by the last iteration, tokens not processed yet (see Overlap)
        while True:
            with self._lock:
                while (pending is None and not self._closed and not self._waiting
                       and all(r.seq is None for r in self.rows)):
                    self._wake.wait()
                # read once, under the lock: a close() after this point is seen by the next iteration,
                # never between the cancelling and the return (which would leave requests without an end)
                closing = self._closed
                if closing:
                    for seq in list(self._waiting) + [r.seq for r in self.rows if r.seq is not None]:
                        seq.cancelled = True
                for seq in [s for s in self._waiting if s.cancelled]:
                    self._waiting.remove(seq)
                    self._finish(seq, "cancelled", None)
                for row in self.rows:
                    if row.seq is not None and row.seq.cancelled:
                        self._finish(row.seq, "cancelled", None)
                if not closing:
                    self._admit()
            self._deliver()
            if closing:
                return
            try:
                launched = self._launch()
                if pending is not None:
                    self._resolve(pending)
                pending = launched
            except Exception as e:  # the server never dies on a request: fail the rows in flight
                pending = None
                message = f"{type(e).__name__}: {e}"
                with self._lock:
                    for row in self.rows:
                        if row.seq is not None:
                            self._emit(row.seq, Failed(message))
                            self._release(row.seq, failed=True)
            self._deliver()

    def _admit(self) -> None:
        """Give free rows to waiting requests: the lowest free row, or one holding a longer prefix."""
        free = [i for i, r in enumerate(self.rows) if r.seq is None]
        while self._waiting and free:
            seq = self._waiting.popleft()
            # at least one prompt token is prefilled, for the logits of the first new token; all of them
            # for prompt logprobs
            limit = 0 if seq.request.prompt_logprobs else len(seq.prompt) - 1
            cached = [_common_prefix(self.rows[i].ids, seq.prompt, limit=limit) for i in free]
            k = max(range(len(free)), key=lambda j: cached[j])  # the first of the longest
            if cached[k] - cached[0] < MIN_REUSE:
                k = 0
            best, keep = free.pop(k), cached[k]
            row = self.rows[best]
            row.seq, row.ids = seq, []
            seq.row, seq.pos, seq.cached = best, keep, keep
            self._set_length(best, keep)
            c = self._counters
            c["prompt_tokens"] += len(seq.prompt)
            c["cached_tokens"] += keep
            c["prefix_hits"] += keep > 0

    def _set_length(self, row: int, n: int) -> None:
        lengths = list(self.cache.seq_lens_cpu)
        lengths[row] = n
        self._op(("lengths", lengths))

    # -- device operations: the leader's, mirrored by the followers under tensor parallelism ------

    def _op(self, op: Optional[tuple]):
        """Run one device operation; under tensor parallelism rank 0 first sends it to the other
        ranks, whose :meth:`follow` runs the same operations in the same order."""
        if self._tp is not None:
            self._tp.broadcast_object(op)
        return self._apply(op)

    def _apply(self, op: tuple):
        kind = op[0]
        if kind == "lengths":  # ("lengths", fills of every row)
            self.cache.set_lengths(op[1])
        elif kind == "mixed":  # ("mixed", decoding rows, [(row, prompt chunk)], logits rows, fill counts)
            _, decoding, chunks, rows, counts = op
            # each decoding row's next token, then each prompt chunk on its row; logits of the
            # tokens that sample, then of those that score their prompt's next token
            n = len(decoding)
            ids = self._to_device(decoding + [t for _, chunk in chunks for t in chunk])  # one copy
            with torch.inference_mode():
                tokens = torch.cat([self._next_ids[ids[:n]].clamp_min(0), ids[n:]])  # NON_FINITE feeds 0
                spans = [(r, 1) for r in decoding] + [(r, len(chunk)) for r, chunk in chunks]
                logits = self.llm.decodable(self.llm.runner.forward_packed(tokens, spans, self.cache, rows))
            self.cache.advance(counts)
            return logits
        elif kind == "decode":  # ("decode", rows in the step, fill counts): logits of the first rows
            _, span, counts = op
            with torch.inference_mode():
                logits = self.llm.decodable(self.llm.runner(self._fed_ids(span), self.cache)[:, -1])
            self.cache.advance(counts)
            return logits
        elif kind == "agree":  # ("agree",): every rank continues with rank 0's sampled ids
            self._tp.broadcast_(self._next_ids)
        elif kind == "capture":  # ("capture", rows): the decode graph of a batch bucket
            self.llm.runner(torch.zeros(op[1], 1, dtype=torch.long, device=self.llm.device), self.cache)
        elif kind == "capture_packed":  # ("capture_packed", tokens): the packed graphs up to that many tokens
            self.llm.runner.capture_packed(self.cache, op[1])

    def follow(self) -> None:
        """On ranks other than 0 under tensor parallelism: run rank 0's device operations until its
        scheduler closes. Their logits are rank 0's (the LM head is gathered), never sampled here.
        A step that fails here fails on rank 0 too (the same operation on the same shapes): rank 0
        fails its requests and goes on, so this rank goes on with it, to the operations that follow."""
        if self._tp is None or self._tp.rank == 0:
            raise RuntimeError("follow() is for the ranks other than 0 of a tensor-parallel group")
        while True:
            op = self._tp.broadcast_object()
            if op is None:
                return
            with self._step_lock, torch.inference_mode():
                try:
                    self._apply(op)
                except Exception:  # as rank 0's _run: the group never dies on a request
                    pass

    def _fed_ids(self, span: int) -> torch.Tensor:
        """(span, 1): what the first ``span`` rows feed, each its last sampled token; a row whose last
        token was NON_FINITE (its request failed) feeds 0, its result ignored."""
        return self._next_ids[:span, None].clamp_min(0)

    def _to_device(self, values: List[int]) -> torch.Tensor:
        """A small int64 tensor on the device, copied without making the host wait for the device."""
        return to_device(values, torch.long, self.llm.device)

    def _launch(self) -> Optional["_Step"]:
        """Launch this iteration's step: a mixed step when prompt tokens are pending, else a decode
        step when rows are decoding. Returns its sampled tokens on their way to the host, if any."""
        decoding = [r.seq for r in self.rows if r.seq is not None and r.seq.decoding and not r.seq.done]
        chunks = self._chunks()
        if chunks:
            return self._launch_mixed(decoding, chunks)
        if decoding:
            return self._launch_decode(decoding)
        return None

    def _chunks(self) -> List[Tuple[_Sequence, List[int]]]:
        """This iteration's prompt chunks: ``prefill_chunk`` tokens at most in all, oldest request first."""
        chunks, budget = [], self.prefill_chunk
        pending = sorted((r.seq for r in self.rows if r.seq is not None and r.seq.pos < len(r.seq.prompt)),
                         key=lambda s: s.rid)
        for seq in pending:
            if budget == 0:
                break
            chunk = seq.prompt[seq.pos: seq.pos + budget]
            budget -= len(chunk)
            chunks.append((seq, chunk))
        return chunks

    def _launch_mixed(self, decoding: List[_Sequence], chunks: List[Tuple[_Sequence, List[int]]]) -> Optional["_Step"]:
        """One forward of the decoding rows' next tokens and the prompt chunks; sample the decoding
        rows and the first tokens of the prompts it completes; score the prompt tokens of the
        chunks that ask for prompt logprobs."""
        counts = [0] * self.cache.batch
        for s in decoding:
            counts[s.row] = 1
        rows = list(range(len(decoding)))  # logits rows among the forward's tokens: the decoding rows' first
        completed, prefilled, end = [], [], len(decoding)
        scored, scored_rows = [], []  # [(sequence, the prompt tokens its rows score)], their logits rows
        for seq, chunk in chunks:
            counts[seq.row] = len(chunk)
            n = min(len(chunk), len(seq.prompt) - 1 - seq.pos) if seq.request.prompt_logprobs else 0
            if n:  # the logits of prompt token j score token j + 1 (the last one's sample the first new token)
                scored_rows += range(end, end + n)
                scored.append((seq, seq.prompt[seq.pos + 1: seq.pos + 1 + n]))
            end += len(chunk)
            if seq.pos + len(chunk) == len(seq.prompt):
                if seq.request.max_tokens:
                    rows.append(end - 1)  # the chunk's last token
                    completed.append(seq)
                else:
                    prefilled.append(seq)  # generates nothing: finished when this step resolves
        with self._step_lock:
            logits = self._op(("mixed", [s.row for s in decoding], [(seq.row, chunk) for seq, chunk in chunks],
                               rows + scored_rows, counts))
            self._counters["mixed_steps"] += 1
            self._counters["prefill_chunks"] += len(chunks)
            for seq, chunk in chunks:
                seq.pos += len(chunk)
            if not (rows or scored or prefilled):
                return None
            started = [s for s in completed if s.request.sampling.changes_logits]
            if started:
                if self._processor is None:
                    self._processor = LogitsProcessor(self.cache.batch, logits.shape[-1], self.llm.device)
                self._processor.start([s.row for s in started], [s.request.sampling for s in started],
                                      [s.prompt for s in started], [s.min_tokens_ids for s in started])
            # scored first: the step's event, which _sample records, then follows their copies to the host
            prompt = self._score(scored, logits[len(rows):]) if scored else None
            step = self._sample(decoding + completed, logits[: len(rows)])
            step.prompt, step.prefilled = prompt, prefilled
            for seq in completed:
                seq.decoding = True  # the next step feeds its first token
            return step

    def _launch_decode(self, decoding: List[_Sequence]) -> "_Step":
        """One decode step over the rows up to the last decoding one (the others' results unused)."""
        span = max(s.row for s in decoding) + 1
        counts = [0] * self.cache.batch
        for s in decoding:
            counts[s.row] = 1
        with self._step_lock:
            logits = self._op(("decode", span, counts))
            self._counters["decode_steps"] += 1
            rows = [s.row for s in decoding]
            if rows != list(range(span)):
                logits = logits[self._to_device(rows)]
            return self._sample(decoding, logits)

    def _sample(self, seqs: List[_Sequence], logits: torch.Tensor) -> "_Step":
        """Sample each sequence's next token from its logits row, on the device; start the copy to the host.
        The log-probabilities are those of the model's logits, before any logit bias or penalty."""
        raw = logits
        changed = [i for i, s in enumerate(seqs) if s.request.sampling.changes_logits]
        if changed:  # their logits, changed by the logit bias and penalties (a float32 copy of the step's)
            changed_index = self._to_device(changed)
            changed_rows = self._to_device([seqs[i].row for i in changed])
            logits = logits.float().index_copy(0, changed_index, self._processor(logits[changed_index], changed_rows))
        ids = sample(logits, GREEDY)  # greedy rows (NON_FINITE where a row's logits are)
        unseeded: Dict[SamplingParams, List[int]] = {}
        for i, s in enumerate(seqs):
            params = s.request.sampling
            if params.greedy:
                continue
            if params.seed is None:  # no draws to reproduce: rows with the same parameters sample together
                unseeded.setdefault(params, []).append(i)
            else:  # a seeded row draws from its own generator, as its solo run does
                ids[i] = sample(logits[i: i + 1], params, s.generator)[0]
        for params, rows in unseeded.items():
            index = self._to_device(rows)
            ids[index] = sample(logits[index], params)
        if changed:
            self._processor.add(ids[changed_index], changed_rows)
        rows = self._to_device([s.row for s in seqs])
        self._next_ids.index_copy_(0, rows, ids)  # what the next decode step feeds
        if self._tp is not None:
            self._op(("agree",))
        with_lp = [i for i, s in enumerate(seqs) if s.request.logprobs is not None]
        lp = None
        if with_lp:
            index = self._to_device(with_lp)
            k = max(seqs[i].request.logprobs for i in with_lp)
            lp = (with_lp, *_logprobs(raw[index], ids[index], k))  # NON_FINITE: its row fails, unread
        return _Step(seqs, to_host(ids), lp and tuple(to_host(x) if torch.is_tensor(x) else x for x in lp),
                     record_event(self.llm.device))

    def _score(self, scored: List[Tuple[_Sequence, List[int]]], logits: torch.Tensor) -> tuple:
        """The log-probabilities of the prompt tokens of ``scored``, one per row of ``logits``, as
        :meth:`_sample`'s of a sampled token, on the device; start their copy to the host."""
        targets = self._to_device([t for _, tokens in scored for t in tokens])
        k = max(seq.request.logprobs for seq, _ in scored)
        return (scored, *(x if x is None else to_host(x) for x in _logprobs(logits, targets, k)))

    def _resolve(self, step: "_Step") -> None:
        """Wait for a step's tokens on the host; emit events; finish what is done."""
        if step.ready is not None:
            step.ready.synchronize()
        ids = step.ids.tolist()
        lp_info: Dict[int, tuple] = {}
        if step.logprobs is not None:
            with_lp, *lp = step.logprobs
            lp_info = dict(zip(with_lp, _listed(*lp, [step.seqs[i].request.logprobs for i in with_lp])))
        scored = []  # [(sequence, its PromptLogprobs tokens)]
        if step.prompt is not None:
            chunks, *lp = step.prompt
            listed = iter(_listed(*lp, [seq.request.logprobs for seq, tokens in chunks for _ in tokens]))
            scored = [(seq, [Token(t, "", *next(listed)) for t in tokens]) for seq, tokens in chunks]
        with self._lock:
            for seq, tokens in scored:
                if seq.done:
                    continue
                if any(math.isnan(t.logprob) for t in tokens):  # NaN / Inf logits in its rows
                    error = NonFiniteLogitsError.from_model(self.llm.model, seq.row, 0)
                    self._emit(seq, Failed(str(error)))
                    self._release(seq, failed=True)
                else:
                    self._emit(seq, PromptLogprobs(tokens))
            for i, (seq, t) in enumerate(zip(step.seqs, ids)):
                if seq.done:  # finished (or cancelled) while this step ran
                    continue
                seq.sampled.append(t)
                if seq.cancelled:
                    self._finish(seq, "cancelled", None)
                elif t == NON_FINITE:  # the sampler's mark for NaN / Inf logits in this row
                    error = NonFiniteLogitsError.from_model(self.llm.model, seq.row, len(seq.tokens))
                    self._emit(seq, Failed(str(error)))
                    self._release(seq, failed=True)
                elif t in seq.stop_ids:
                    self._counters["generated_tokens"] += 1
                    self._finish(seq, "stop", t, Token(t, "", *lp_info[i]) if i in lp_info else None)
                else:
                    seq.tokens.append(t)
                    self._counters["generated_tokens"] += 1
                    text, matched = seq.stops.push(seq.decoder.push(t), seq.request.sampling.may_stop(len(seq.tokens)))
                    logprob, top = lp_info.get(i, (None, []))
                    self._emit(seq, Token(t, text, logprob, top))
                    if matched is not None:
                        self._finish(seq, "stop", matched)
                    elif len(seq.tokens) >= seq.request.max_tokens:
                        self._finish(seq, "length", None)
            for seq in step.prefilled:
                if not seq.done:
                    self._finish(seq, "cancelled" if seq.cancelled else "length", None)

    def _emit(self, seq: _Sequence, event: Event) -> None:
        """(lock held) Queue an event; :meth:`_deliver` hands them over."""
        self._outbox.append((seq, event))

    def _deliver(self) -> None:
        """Hand the queued events to their callbacks (or to ``deliver``, all at once)."""
        with self._lock:
            batch, self._outbox = self._outbox, []
        if not batch:
            return
        deliver = self.deliver
        if deliver is not None:
            try:
                deliver([(seq.on_event, event) for seq, event in batch])
                return
            except Exception:  # the receiver is gone (e.g. its event loop closed): cancel what is running
                for seq, _ in batch:
                    seq.cancelled = True
                return
        for seq, event in batch:
            try:
                seq.on_event(event)
            except Exception:  # a receiver that is gone cancels its request
                seq.cancelled = True

    def _finish(self, seq: _Sequence, reason: str, stop, stop_token: Optional[Token] = None) -> None:
        """(lock held) Release the held-back text, report the end, free the row."""
        completion_tokens = len(seq.tokens) + (1 if isinstance(stop, int) else 0)  # a stop id counts, as in vLLM
        text, matched = seq.stops.push(seq.decoder.flush(), seq.request.sampling.may_stop(len(seq.tokens)))
        text += seq.stops.flush()
        if matched is not None and reason != "cancelled":  # completed by the held-back bytes, as in a solo run
            reason, stop = "stop", matched
        self._emit(seq, Finished(reason, stop, text, len(seq.prompt), completion_tokens, seq.cached, stop_token))
        self._counters["cancelled" if reason == "cancelled" else "finished"] += 1
        self._release(seq)

    def _release(self, seq: _Sequence, failed: bool = False) -> None:
        self._by_id.pop(seq.rid, None)
        seq.done = True
        if seq.row is None:
            return
        row = self.rows[seq.row]
        row.seq = None
        if failed:  # what the row holds is unknown: forget it
            self._counters["failed"] += 1
            row.ids = []
            self._set_length(seq.row, 0)
        else:  # every token fed so far, a step still running included
            row.ids = (seq.prompt + seq.sampled)[: self.cache.seq_lens_cpu[seq.row]]
        seq.row = None


@dataclass
class _Step:
    """Tokens sampled for ``seqs`` on the device, on their way to the host."""

    seqs: List[_Sequence]
    ids: torch.Tensor  # (n,) on the host once ``ready`` has completed
    logprobs: Optional[tuple]  # (indices into seqs, chosen (m,), top values (m, k), top ids (m, k))
    ready: Optional["torch.cuda.Event"]
    prompt: Optional[tuple] = None  # ([(sequence, the prompt tokens scored)], chosen, top values, top ids)
    prefilled: List[_Sequence] = field(default_factory=list)  # prompts completed that generate nothing


def _logprobs(logits: torch.Tensor, ids: torch.Tensor, k: int) -> tuple:
    """From logits (n, V): the float32 log-softmax of each row at its id of ``ids`` (n,), and its k
    largest values and their ids, (n, k) each (None for k 0)."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)  # (n, V)
    chosen = logprobs.gather(1, ids.clamp_min(0)[:, None])[:, 0]
    if not k:
        return chosen, None, None
    top = logprobs.topk(k, dim=-1)
    return chosen, top.values, top.indices


def _listed(chosen: torch.Tensor, top_values: Optional[torch.Tensor], top_ids: Optional[torch.Tensor],
            ks: List[int]) -> List[Tuple[float, List[Tuple[int, float]]]]:
    """:func:`_logprobs`'s results on the host as (logprob, [(id, logprob) of the k best]) per row,
    k from ``ks``."""
    chosen = chosen.tolist()
    top_values = top_values.tolist() if top_values is not None else [[] for _ in chosen]
    top_ids = top_ids.tolist() if top_ids is not None else [[] for _ in chosen]
    return [(c, list(zip(i[:k], v[:k]))) for c, v, i, k in zip(chosen, top_values, top_ids, ks)]


def _is_int(x) -> bool:
    """An integer (a numpy one too), not a bool or a float."""
    if isinstance(x, bool):
        return False
    try:
        operator.index(x)
    except TypeError:
        return False
    return True


def _common_prefix(a: List[int], b: List[int], limit: int) -> int:
    n = 0
    for x, y in zip(a[:limit], b[:limit]):
        if x != y:
            break
        n += 1
    return n
