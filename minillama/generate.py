"""The one generate loop: it owns the KV cache, prefills, decodes, samples and stops.

Rows of a batch may have prompts of different lengths. Prefill runs them as one right-padded batch;
afterwards each row's fill (``seq_lens``) is set to its own prompt length, so pad positions lie past
the fill: never attended to, and overwritten by the row's next tokens. Positions come from
``seq_lens``, so no padding ever shifts a row's positions.

A row reads only its own cache, so its tokens depend only on its own prompt: greedy in fp32 on
the CPU, a row of a batch gets the same tokens as that prompt run alone (tested). The batch changes
only the shapes of the matmuls; on a GPU another shape may pick another kernel, whose rounding can
flip a near-tie in bf16. Rows that are done keep running until the whole batch is done (their
tokens are ignored), so a finished row changes nothing for the others.

:class:`TokenLoop` works in token ids; :class:`TextGeneration` adds text on top of it (incremental
detokenizing and stop strings, from :mod:`minillama.streaming`) and builds the results.
"""
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, List, Optional, Sequence, Tuple, Union

import torch

from minillama.concurrency import step_lock
from minillama.errors import NonFiniteLogitsError
from minillama.kv_cache import KVCache
from minillama.runner import Runner
from minillama.sampling import NON_FINITE, LogitsProcessor, SamplingParams, record_event, sample, to_host
from minillama.streaming import IncrementalDecoder, StopStrings


# Tokens per prefill forward at most: the activations of one forward grow with its tokens (Llama-3.1-70B:
# ~0.25 MB per token in bf16), so a 128K-token prompt in one forward would need tens of GB beside the weights.
PREFILL_TOKENS = 8192


@dataclass
class StepTimes:
    prefill_s: float = 0.0  # wall time from the start to the first tokens on the host
    decode_s: float = 0.0  # wall time of the decode steps after that
    decode_steps: int = 0
    step_s: List[float] = field(default_factory=list)  # when each step's tokens were on the host


class TokenLoop:
    """Iterate to run the loop: each step yields the new token of every row (None once a row is done).

    A row is done when it samples an id that ends it (one of ``stop_ids``, or of ``eos_ids`` unless
    ``sampling.ignore_eos``; that token is not yielded; it is kept in ``stop_token[row]``), when it
    has ``max_new_tokens`` tokens, or when the caller calls :meth:`finish` (e.g. a stop string
    matched). The loop ends as soon as every row is done.

    Args:
        runner: runs the model (``minillama.runner.Runner``); its config, device and dtype size the cache.
        prompts: token ids per row, of any lengths (at least 1 each).
        max_new_tokens: new tokens per row at most (a stop id counts as the row's last step).
        sampling: how the next token is chosen; its seed makes the loop reproducible. Its
            penalties see each row's prompt (without what ``cache`` held before) and new tokens.
            Its ``min_tokens``: no id of ``stop_ids`` or ``eos_ids`` is sampled before a row has
            that many new tokens (``eos_ids`` too with ``ignore_eos``, as vLLM).
        stop_ids: ids that end a row.
        eos_ids: the checkpoint's end-of-sequence ids (``Llama.stop_ids``): they end a row too,
            unless ``sampling.ignore_eos`` (then they are tokens as any other).
        cache: an existing cache to continue (e.g. a conversation): each row's prompt is appended
            at that row's fill. None: a cache just large enough for the request is allocated.
        decodable: logits (B, V) -> the logits of the ids that may be sampled, e.g.
            ``minillama.sampling.DecodableIds`` (ids the tokenizer cannot decode are never sampled).
        prefill_tokens: tokens per prefill forward at most (at least one column of the batch): a
            longer prompt is prefilled in chunks of columns, each appended to the cache after the
            one before, so a step's activations stay bounded whatever the prompt's length.
    After the loop: ``new_tokens[row]``, ``finish_reason[row]`` ("stop" or "length"),
    ``stop_token[row]``, ``finish_step[row]`` (the step that ended the row; 0 is the prefill's) and
    ``times``. The cache then holds each row's prompt and every new token but the last one sampled.
    A caller that stops iterating early may find the last yielded token cached too (on CUDA the
    step that feeds it runs while the caller handles it); ``cache.seq_lens_cpu`` always says
    what is cached.
    """

    def __init__(
        self,
        runner: Runner,
        prompts: Sequence[Sequence[int]],
        max_new_tokens: int,
        sampling: SamplingParams = SamplingParams(),
        stop_ids: Sequence[int] = (),
        eos_ids: Sequence[int] = (),
        cache: Optional[KVCache] = None,
        decodable: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
        prefill_tokens: int = PREFILL_TOKENS,
    ):
        if prefill_tokens < 1:
            raise ValueError(f"prefill_tokens must be at least 1, got {prefill_tokens}")
        self.runner = runner
        self.prefill_tokens = prefill_tokens
        self.decodable = decodable or (lambda logits: logits)  # logits of the ids that may be sampled
        self.prompts = [list(p) for p in prompts]
        self.max_new_tokens = max_new_tokens
        self.sampling = sampling
        self.stop_ids = sampling.ending_ids(eos_ids, stop_ids)
        self.min_tokens_ids = sampling.min_tokens_ids(eos_ids, stop_ids)
        device = runner.device
        self.device = device
        batch = len(self.prompts)
        if batch == 0 or min(len(p) for p in self.prompts) == 0:
            raise ValueError("TokenLoop needs at least one prompt, each of at least one token")
        width = max(len(p) for p in self.prompts)
        if cache is None:
            cache = runner.new_cache(batch, width + max_new_tokens)
        elif cache.batch != batch:
            raise ValueError(f"the cache holds {cache.batch} rows but {batch} prompts were given")
        else:
            # prefill writes `width` slots in every row, then one slot per decode step
            for b, (fill, p) in enumerate(zip(cache.seq_lens_cpu, self.prompts)):
                need = fill + max(width, len(p) + max_new_tokens - 1)
                if need > cache.max_len:
                    raise ValueError(
                        f"row {b}: {fill} cached + {len(p)} prompt tokens + {max_new_tokens} new tokens "
                        f"need {need} cache slots, the cache has {cache.max_len}"
                    )
        self.cache = cache
        self.generator = sampling.generator(device)
        self.processor: Optional[LogitsProcessor] = None  # set at the prefill when the sampling changes logits
        self.done = [max_new_tokens == 0] * batch
        self.finish_reason: List[Optional[str]] = ["length" if d else None for d in self.done]
        self.stop_token: List[Optional[int]] = [None] * batch
        self.new_tokens: List[List[int]] = [[] for _ in range(batch)]
        self.finish_step: List[int] = [0] * batch
        self.times = StepTimes()
        self._step = 0  # the step whose tokens were yielded last
        self._step_lock = step_lock(runner)  # one step (forward + sample) at a time per model

    def finish(self, row: int, reason: str = "stop") -> None:
        """End ``row`` now (at the current step); a row already done keeps its first reason."""
        if not self.done[row]:
            self.done[row] = True
            self.finish_reason[row] = reason
            self.finish_step[row] = self._step

    def _prefill(self) -> torch.Tensor:
        """The prompts, right-padded, in chunks of columns; each row advances by its own tokens of a
        chunk (its padding lies past its fill). The logits of each row's last prompt token."""
        lengths = [len(p) for p in self.prompts]
        batch, width = len(lengths), max(lengths)
        tokens = torch.zeros(batch, width, dtype=torch.long)
        for b, p in enumerate(self.prompts):
            tokens[b, : len(p)] = torch.tensor(p, dtype=torch.long)
        tokens = tokens.to(self.device)
        cache = self.cache
        columns = max(1, self.prefill_tokens // batch)
        last_logits = None
        for start in range(0, width, columns):
            end = min(width, start + columns)
            ends_here = [start <= n - 1 < end for n in lengths]  # rows whose last prompt token is in this chunk
            at = torch.tensor([min(max(n - 1 - start, 0), end - start - 1) for n in lengths])  # on the host: no sync
            with torch.inference_mode():
                logits = self.runner(tokens[:, start:end], cache, logits_at=at)[:, -1]  # (B, V)
            if last_logits is None:  # a replayed graph's logits are its buffer, which the next chunk overwrites
                last_logits = logits if end == width else logits.clone()
            elif any(ends_here):
                rows = torch.tensor([b for b in range(batch) if ends_here[b]], device=logits.device)
                last_logits = last_logits.index_copy(0, rows, logits[rows])
            cache.advance([min(max(n - start, 0), end - start) for n in lengths])
        return self.decodable(last_logits)

    def _decode(self, tokens: torch.Tensor) -> torch.Tensor:
        cache = self.cache
        with torch.inference_mode():
            tokens = tokens.clamp_min(0)  # a done row may hold NON_FINITE; its tokens are ignored
            logits = self.runner(tokens[:, None], cache)
        cache.advance(1)
        return self.decodable(logits[:, -1])

    def _sample(self, logits: torch.Tensor) -> torch.Tensor:
        """Every row's next id (B,), after the logit bias and the penalties when the sampling has them."""
        if self.processor is not None:
            logits = self.processor(logits)
        ids = self.runner.agree(sample(logits, self.sampling, self.generator))
        if self.processor is not None:
            self.processor.add(ids)
        return ids

    def _read_ids(self, ids: torch.Tensor, step: int) -> Tuple[List[int], Optional[torch.Tensor]]:
        """Step ``step``'s ids on the host, and the next step's ids when that step was launched
        (else None). On CUDA, from the second step on, while a row may still need it, the next step
        is launched after the ids' copy to the host is queued and before the host waits for the
        copy: the GPU runs it while the host handles these ids (the host's time per step no longer
        leaves the GPU idle). Where every row turns out to be done, :meth:`_undo_step` takes it
        back. The first step's ids are read first: the next step may capture a CUDA graph."""
        produced = step + 1  # tokens per row once these ids are read
        if not (self._overlaps(ids) and step > 0 and produced < self.max_new_tokens and not all(self.done)):
            return ids.tolist(), None
        host, copied = to_host(ids), record_event(ids.device)
        launched = self._launch_step(ids)
        try:  # the host waits here: a Ctrl-C lands here, with the next step launched
            if copied is not None:
                copied.synchronize()
            return host.tolist(), launched
        except BaseException:
            self._undo_step()
            raise

    def _launch_step(self, ids: torch.Tensor) -> torch.Tensor:
        """Launch the decode step that feeds ``ids``: its sampled ids (B,), on the device."""
        with self._step_lock, torch.inference_mode():
            return self._sample(self._decode(ids))

    @staticmethod
    def _overlaps(ids: torch.Tensor) -> bool:
        """Whether the next step runs while the host reads ``ids``: on CUDA (elsewhere the step would
        run before the host reads them, with nothing to gain)."""
        return ids.is_cuda

    def _undo_step(self) -> None:
        """Take back a launched step that no row needs: its token's slot in each row is dropped (the
        keys written there lie past the fill, overwritten by the next tokens)."""
        self.cache.advance(-1)

    def __iter__(self) -> Iterator[List[Optional[int]]]:
        if all(self.done):
            return
        start = time.perf_counter()
        with self._step_lock, torch.inference_mode():
            logits = self._prefill()
            if self.sampling.changes_logits:
                self.processor = LogitsProcessor(len(self.prompts), logits.shape[-1], self.device)
                self.processor.start(range(len(self.prompts)), [self.sampling] * len(self.prompts), self.prompts,
                                     [self.min_tokens_ids] * len(self.prompts))
            next_ids = self._sample(logits)
        step = 0
        launched = None  # the next step's ids, when it was launched before this step's ids were read
        # The launched step is taken back where the loop ends itself (every row done, or an error
        # here) and kept where the caller stops iterating: the generator is closed whenever its
        # last reference goes, perhaps after the caller used the cache again, so closing it must
        # not change the cache. What the kept step cached (the last yielded token) is counted in
        # the fills: a consistent cache either way.
        try:
            while True:
                ids, launched = self._read_ids(next_ids, step)  # the one host sync per step
                self.times.step_s.append(time.perf_counter() - start)
                if step == 0:
                    self.times.prefill_s = self.times.step_s[0]
                self._step = step
                step += 1
                out: List[Optional[int]] = []
                for b, t in enumerate(ids):
                    if self.done[b]:
                        out.append(None)
                    elif t == NON_FINITE:  # the sampler's mark for NaN/Inf logits
                        raise NonFiniteLogitsError.from_model(self.runner.model, b, self._step)
                    elif t in self.stop_ids:
                        self.stop_token[b] = t
                        self.finish(b, "stop")
                        out.append(None)
                    else:
                        self.new_tokens[b].append(t)
                        out.append(t)
                        if len(self.new_tokens[b]) >= self.max_new_tokens:
                            self.finish(b, "length")
                yield out
                if all(self.done):
                    break
                next_ids = launched if launched is not None else self._launch_step(next_ids)
                launched = None
        except GeneratorExit:  # the caller stopped iterating: the launched step stays
            launched = None
            raise
        finally:
            if launched is not None:  # every row ended with a step in flight, or an error stopped the loop
                self._undo_step()
        self.times.decode_s = self.times.step_s[-1] - self.times.step_s[0]
        self.times.decode_steps = step - 1


@dataclass
class GenerationResult:
    """One row's outcome.

    ``text`` is exactly what the new tokens add to the decoded prompt (a continuation keeps its
    leading space), cut before the stop string when one ended the row. ``token_ids`` are all new
    tokens, up to and including the one that completed a stop string; a stop id is not included.
    """

    token_ids: List[int]  # new tokens only
    text: str  # the text of the new tokens
    finish_reason: str  # "stop", "length", or "interrupted" (TextStream.interrupt)
    stop: Union[int, str, None] = None  # the stop id or stop string that ended the row
    prompt_ids: List[int] = field(default_factory=list)
    prefill_s: float = 0.0  # time to the first token (the whole batch's prefill)
    decode_s: float = 0.0  # time from the first token to this row's last step
    decode_steps: int = 0  # decode forwards until this row was done (a sampled stop id counts)


class TextGeneration:
    """A :class:`TokenLoop` with text: iterate for ``(row, text)`` deltas, then call :meth:`results`.

    Each row has an :class:`~minillama.streaming.IncrementalDecoder` (whole characters only) and a
    :class:`~minillama.streaming.StopStrings` (text that may begin a stop string waits until it is
    decided). A matched stop string finishes the row in the loop; as in vLLM, none ends in the text
    of a row's first ``sampling.min_tokens`` tokens. A row's held-back text is released as soon as
    the row is done, so the deltas of a row concatenate to its result's text.
    """

    def __init__(self, loop: TokenLoop, tokenizer, stop: Sequence[str] = (), skip_special_tokens: bool = False):
        self.loop = loop
        batch = len(loop.prompts)
        self._decoders = [IncrementalDecoder(tokenizer, p, skip_special_tokens) for p in loop.prompts]
        self._stops = [StopStrings(stop) for _ in range(batch)]
        self._texts: List[List[str]] = [[] for _ in range(batch)]
        self._released = [False] * batch

    def __iter__(self) -> Iterator[Tuple[int, str]]:
        loop = self.loop
        for ids in loop:
            for b, t in enumerate(ids):
                if t is None:
                    continue
                text, matched = self._stops[b].push(self._decoders[b].push(t),
                                                    loop.sampling.may_stop(len(loop.new_tokens[b])))
                if matched is not None:
                    loop.finish(b, "stop")
                if text:
                    self._texts[b].append(text)
                    yield b, text
            for b in range(len(ids)):
                if loop.done[b] and not self._released[b]:
                    text = self._release(b)
                    if text:
                        yield b, text
        for b in range(len(loop.prompts)):  # rows done before the first step (max_new_tokens 0)
            if not self._released[b]:
                self._release(b)

    def _release(self, b: int) -> str:
        """The text row b held back, now that no more tokens come."""
        self._released[b] = True
        stops = self._stops[b]
        loop = self.loop
        text, matched = stops.push(self._decoders[b].flush(), loop.sampling.may_stop(len(loop.new_tokens[b])))
        text += stops.flush()
        if text:
            self._texts[b].append(text)
        return text

    def results(self) -> List[GenerationResult]:
        loop = self.loop
        step_s = loop.times.step_s
        out = []
        for b in range(len(loop.prompts)):
            matched = self._stops[b].matched
            last = step_s[loop.finish_step[b]] if step_s else 0.0
            out.append(GenerationResult(
                token_ids=list(loop.new_tokens[b]),
                text="".join(self._texts[b]),
                finish_reason="stop" if matched is not None else loop.finish_reason[b],
                stop=matched if matched is not None else loop.stop_token[b],
                prompt_ids=list(loop.prompts[b]),
                prefill_s=loop.times.prefill_s,
                decode_s=last - loop.times.prefill_s if step_s else 0.0,
                decode_steps=loop.finish_step[b],
            ))
        return out


class TextStream:
    """What ``Llama.stream`` returns: iterate for the text deltas of one prompt.

    The deltas concatenate to ``result.text``. ``result`` (a :class:`GenerationResult`) is set once
    the iteration has ended, and is None before that.
    """

    def __init__(self, generation: TextGeneration):
        self._generation = generation
        self._events = iter(generation)
        self.result: Optional[GenerationResult] = None

    @property
    def token_ids(self) -> List[int]:
        """The new tokens so far (a stop id is not included)."""
        return self._generation.loop.new_tokens[0]

    @property
    def times(self) -> StepTimes:
        return self._generation.loop.times

    @property
    def done(self) -> bool:
        return self._generation.loop.done[0]

    def interrupt(self) -> None:
        """End the generation at the current token (finish_reason "interrupted"); the text decided
        so far still comes out of the iteration."""
        self._generation.loop.finish(0, "interrupted")

    def __iter__(self) -> "TextStream":
        return self

    def __next__(self) -> str:
        try:
            return next(self._events)[1]
        except StopIteration:
            if self.result is None:
                self.result = self._generation.results()[0]
            raise
