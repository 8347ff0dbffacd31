"""Choosing the next token on the device: min_tokens, logit bias and repetition, presence and
frequency penalties, then greedy, temperature, top-k, top-p (nucleus), min-p.

As vLLM, the logits are first changed by :class:`LogitsProcessor` (when a request asks for it):
the ids that may end a row are -inf until it has ``min_tokens`` new tokens, ``logit_bias`` is
added, then the repetition penalty divides the positive logits and multiplies the negative ones of
every id in the prompt or the output so far (transformers' ``RepetitionPenaltyLogitsProcessor``),
then ``frequency_penalty * count + presence_penalty * (count > 0)`` is subtracted, ``count`` being
how often the id was generated so far (OpenAI's definition, on the output only). Greedy decoding
takes the argmax of these logits.

The filters apply in this order: temperature, top-k, min-p, top-p (each on what the previous one
kept; min-p compares with the most likely token, top-p with the mass that is left). That is vLLM's
order; transformers' generate applies min-p last, after top-p on the whole mass, so with both set it
may keep more tokens. Tokens of equal probability across the top-p boundary: which of them stay is
the sort's choice (transformers and vLLM may keep others of them); how many, and their mass, is not.
Sampling draws with the exponential-race trick (argmax of p / E, E ~ Exp(1)), which picks index i
with probability p_i, needs no host sync and samples every row independently. A seed fixes the
draws of a whole batch, so the same batch on the same device gives the same tokens.

A row whose logits hold a NaN or +inf (or nothing but -inf) gets the id :data:`NON_FINITE` (-1)
instead of a token, computed on the device: the caller, which reads the ids back anyway, sees it
with no extra sync. Temperature scaling subtracts each row's largest logit first, so a temperature
however small never overflows: it tends to greedy (equal top logits share the draw), never to NaN.

:class:`DecodableIds` filters logits so that ids a tokenizer cannot decode (a padded vocabulary)
are never sampled.
"""
import math
import numbers
from dataclasses import dataclass
from typing import Iterable, Mapping, Optional, Sequence, Set, Tuple

import torch

NON_FINITE = -1  # the id sample() returns for a row with NaN / +inf logits
SEED_RANGE = (-(2 ** 63), 2 ** 64 - 1)  # what torch.Generator.manual_seed accepts
PENALTY_RANGE = (-2.0, 2.0)  # presence and frequency penalties (OpenAI's range)
# repetition_penalty: a normal float32 (what the processor computes in), so that it is never 0, inf or NaN there
REPETITION_RANGE = (torch.finfo(torch.float32).tiny, torch.finfo(torch.float32).max)
BIAS_RANGE = (-100.0, 100.0)  # logit_bias values (OpenAI's range)


@dataclass(frozen=True)
class SamplingParams:
    """How the next token is chosen, and which ids end a row (vLLM's ``min_tokens`` and ``ignore_eos``
    are sampling parameters there too). ``logit_bias`` may be given as a dict ``{id: bias}``; it is
    kept as a tuple of ``(id, bias)`` sorted by id, so that the parameters are hashable."""

    temperature: float = 0.0  # 0: greedy
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1: off
    min_p: float = 0.0  # 0: off
    seed: Optional[int] = None
    presence_penalty: float = 0.0  # in [-2, 2]; 0: off
    frequency_penalty: float = 0.0  # in [-2, 2]; 0: off
    repetition_penalty: float = 1.0  # > 0; 1: off
    logit_bias: Tuple[Tuple[int, float], ...] = ()  # (token id, bias in [-100, 100]); (): off
    min_tokens: int = 0  # new tokens before any id that may end the row can be sampled; 0: off
    ignore_eos: bool = False  # the checkpoint's EOS ids end no row: they are text (:meth:`ending_ids`)

    def __post_init__(self):
        object.__setattr__(self, "logit_bias", _logit_bias(self.logit_bias))
        for name in ("temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty", "repetition_penalty"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)
                                      or not SEED_RANGE[0] <= self.seed <= SEED_RANGE[1]):
            raise ValueError(f"seed must be an integer in [-2**63, 2**64) or None, got {self.seed!r}")
        if not (self.temperature >= 0.0):
            raise ValueError(f"temperature must be >= 0 (0 means greedy), got {self.temperature}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0 (0 turns it off), got {self.top_k}")
        if not (0.0 < self.top_p <= 1.0):
            raise ValueError(f"top_p must be in (0, 1] (1 turns it off), got {self.top_p}")
        if not (0.0 <= self.min_p < 1.0):
            raise ValueError(f"min_p must be in [0, 1) (0 turns it off), got {self.min_p}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not PENALTY_RANGE[0] <= getattr(self, name) <= PENALTY_RANGE[1]:
                raise ValueError(f"{name} must be in [-2, 2] (0 turns it off), got {getattr(self, name)}")
        if not REPETITION_RANGE[0] <= self.repetition_penalty <= REPETITION_RANGE[1]:
            raise ValueError(f"repetition_penalty must be > 0 (1 turns it off) and a normal float32, in "
                             f"[{REPETITION_RANGE[0]:.3g}, {REPETITION_RANGE[1]:.3g}], got {self.repetition_penalty}")
        if isinstance(self.min_tokens, bool) or not isinstance(self.min_tokens, int) or self.min_tokens < 0:
            raise ValueError(f"min_tokens must be an integer >= 0 (0 turns it off), got {self.min_tokens!r}")
        if not isinstance(self.ignore_eos, bool):
            raise ValueError(f"ignore_eos must be True or False, got {self.ignore_eos!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1

    @property
    def changes_logits(self) -> bool:
        """Whether a :class:`LogitsProcessor` must run: min_tokens, a logit bias or a penalty is set."""
        return bool(self.logit_bias) or self.min_tokens > 0 or (
            self.presence_penalty, self.frequency_penalty, self.repetition_penalty) != (0.0, 0.0, 1.0)

    def ending_ids(self, eos_ids: Iterable[int], stop_ids: Iterable[int]) -> Set[int]:
        """The ids that end a row: its own ``stop_ids`` and, unless ``ignore_eos``, the checkpoint's
        ``eos_ids`` (``Llama.stop_ids``)."""
        return set(stop_ids) | (set() if self.ignore_eos else set(eos_ids))

    def may_stop(self, new_tokens: int) -> bool:
        """Whether a stop string may end in the text of a row's ``new_tokens``-th token: only past
        ``min_tokens`` (vLLM's detokenizer searches for stop strings from there)."""
        return new_tokens > self.min_tokens

    def min_tokens_ids(self, eos_ids: Iterable[int], stop_ids: Iterable[int]) -> Set[int]:
        """The ids that ``min_tokens`` holds back (none when it is 0): ``stop_ids`` and ``eos_ids``,
        these also with ``ignore_eos`` (vLLM's rule: "before EOS or stop_token_ids can be generated")."""
        return set(stop_ids) | set(eos_ids) if self.min_tokens else set()

    def check_vocabulary(self, vocab_size: int) -> None:
        """Raise ValueError when a ``logit_bias`` id is not below ``vocab_size`` (the tokenizer's)."""
        bad = [t for t, _ in self.logit_bias if t >= vocab_size]
        if bad:
            raise ValueError(f"logit_bias has token id(s) {bad[:5]} outside the vocabulary [0, {vocab_size})")

    def generator(self, device) -> Optional[torch.Generator]:
        if self.seed is None:
            return None
        return torch.Generator(device=device).manual_seed(self.seed)


def _logit_bias(value) -> Tuple[Tuple[int, float], ...]:
    """``logit_bias`` (a dict or (id, bias) pairs) checked, as a tuple of (id, float bias) sorted by id."""
    if value is None:
        return ()
    pairs = list(value.items()) if isinstance(value, Mapping) else value
    try:
        pairs = [(t, b) for t, b in pairs]
    except (TypeError, ValueError):
        raise ValueError(f"logit_bias must be a dict {{token id: bias}}, got {value!r}") from None
    checked = []
    for t, b in pairs:  # numpy and torch integers and numbers too, as prompts of token ids take them
        if isinstance(t, bool) or not isinstance(t, numbers.Integral) or t < 0:
            raise ValueError(f"logit_bias keys must be token ids (integers >= 0), got {t!r}")
        if isinstance(b, bool) or not isinstance(b, numbers.Real) or not BIAS_RANGE[0] <= b <= BIAS_RANGE[1]:
            raise ValueError(f"logit_bias[{t}] must be a number in [-100, 100], got {b!r}")
        checked.append((int(t), float(b)))
    pairs = checked
    ids = [t for t, _ in pairs]
    if len(set(ids)) != len(ids):
        raise ValueError(f"logit_bias names a token id twice: {sorted(t for t in set(ids) if ids.count(t) > 1)}")
    return tuple(sorted(pairs))


def filtered_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Probabilities (B, V) float32 after temperature, top-k, min-p and top-p, renormalized.

    Logits are shifted so that each row's largest is 0 before they are divided by the temperature
    (at least float32's smallest normal number): no temperature overflows them.
    """
    logits = logits.float()
    temperature = max(params.temperature, torch.finfo(torch.float32).tiny)
    logits = (logits - logits.max(dim=-1, keepdim=True).values) / temperature
    if params.top_k > 0 and params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if params.min_p > 0.0:
        floor = params.min_p * probs.max(dim=-1, keepdim=True).values
        probs = probs.masked_fill(probs < floor, 0.0)
    if params.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, dim=-1, descending=True)
        mass_before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs  # mass of strictly higher tokens
        sorted_probs = sorted_probs.masked_fill(mass_before >= params.top_p * sorted_probs.sum(-1, keepdim=True), 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    return probs / probs.sum(dim=-1, keepdim=True)


def sample(logits: torch.Tensor, params: SamplingParams, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Next token ids (B,) int64 from logits (B, V), on the logits' device.

    A row with a NaN, a +inf or no finite logit at all gets :data:`NON_FINITE` (-1), decided on
    the device (-inf alone is a token that is never chosen, e.g. an undecodable id).
    """
    if params.greedy:
        return max_argmax(logits, NON_FINITE)[1]  # NON_FINITE where a row's max is not finite
    top, _ = max_argmax(logits)
    finite = torch.isfinite(top)  # (B,); the max propagates NaN
    probs = filtered_probs(logits, params)
    race = torch.empty_like(probs).exponential_(1.0, generator=generator)
    race.clamp_min_(torch.finfo(race.dtype).tiny)  # a draw of exactly 0 would make 0 / 0 = nan win
    ids = max_argmax(probs / race)[1]
    return torch.where(finite, ids, NON_FINITE)


def max_argmax(x: torch.Tensor, non_finite: Optional[int] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(x.amax(-1), x.argmax(-1))`` of x (B, V), the max as float32; with ``non_finite``, that id
    where a row's max is NaN or infinite. On CUDA one Triton launch (``minillama.kernels.max_argmax``,
    the same numbers; torch reduces a row of Llama 3's 128256 logits in one block, and its finite
    check and ``where`` took six more small kernels), elsewhere (and for other dtypes than the
    model's) torch's."""
    if x.is_cuda and x.shape[0] > 0 and x.dtype in (torch.float32, torch.bfloat16, torch.float16):
        from minillama import kernels  # Triton: imported where it runs

        return kernels.max_argmax(x, non_finite=non_finite)
    top, ids = x.amax(dim=-1).float(), x.argmax(dim=-1)
    if non_finite is not None:
        ids = torch.where(torch.isfinite(top), ids, non_finite)
    return top, ids


class DecodableIds:
    """The ids a tokenizer can decode, as a filter on logits: ``ids(logits)`` keeps the logits
    (..., V) of ids below ``decodable`` (a padded vocabulary's extra ids are cut off) and sets those
    of ``holes`` (ids below it that the tokenizer does not know) to -inf, so none of them is ever
    sampled. With nothing to filter it returns the logits themselves.

    Args:
        vocab_size: the model's vocabulary (the width of its logits).
        decodable: the tokenizer's ``vocab_size`` (<= ``vocab_size``).
        holes: ids below ``decodable`` that the tokenizer does not know.
    """

    def __init__(self, vocab_size: int, decodable: int, holes: Sequence[int] = ()):
        self.decodable = decodable if decodable < vocab_size else None
        self.holes = torch.tensor(sorted(holes), dtype=torch.long)

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        if self.decodable is not None:
            logits = logits[..., : self.decodable]
        if len(self.holes):
            if self.holes.device != logits.device:
                self.holes = self.holes.to(logits.device)
            logits = logits.index_fill(-1, self.holes, float("-inf"))
        return logits


def to_device(values: Sequence, dtype: torch.dtype, device) -> torch.Tensor:
    """A small tensor of ``values`` on ``device``, copied without making the host wait for the device."""
    host = torch.tensor(values, dtype=dtype)
    if torch.device(device).type != "cuda":
        return host
    return host.pin_memory().to(device, non_blocking=True)


def to_host(x: torch.Tensor) -> torch.Tensor:
    """x's copy on the host, queued into pinned memory from a CUDA tensor (valid once the stream
    reaches it: :func:`record_event` after it, then wait on the event); a CPU tensor itself."""
    if x.device.type != "cuda":
        return x
    out = torch.empty(x.shape, dtype=x.dtype, pin_memory=True)
    return out.copy_(x, non_blocking=True)


def record_event(device) -> Optional["torch.cuda.Event"]:
    """An event recorded on the current CUDA stream now (None off CUDA): wait on it for what was
    queued before it, such as :func:`to_host`'s copies, and nothing after."""
    if torch.device(device).type != "cuda":
        return None
    event = torch.cuda.Event()
    event.record()
    return event


def apply_penalties(logits: torch.Tensor, prompt: torch.Tensor, counts: torch.Tensor, repetition: torch.Tensor,
                    presence: torch.Tensor, frequency: torch.Tensor) -> torch.Tensor:
    """The logits (n, V) float32 after the repetition penalty, then the frequency and presence penalties.

    Args:
        prompt: (n, V) bool, the ids of each row's prompt.
        counts: (n, V) int32, how often each id was generated so far.
        repetition, presence, frequency: (n, 1) float32, each row's penalties.
    """
    generated = counts > 0
    seen = prompt | generated
    penalized = torch.where(logits > 0, logits / repetition, logits * repetition)
    # a finite logit stays finite however extreme the penalty (an overflow would read as the model's own
    # +inf, which sample() reports as non-finite logits); a non-finite one stays as it is, for that report
    largest = torch.finfo(torch.float32).max
    penalized = torch.where(torch.isfinite(logits), penalized.clamp(-largest, largest), logits)
    return torch.where(seen, penalized, logits) - frequency * counts - presence * generated


class LogitsProcessor:
    """``min_tokens``, ``logit_bias`` and the penalties of ``rows`` rows, each with its own
    :class:`SamplingParams`, and what they need on the device: per row, the ids ``min_tokens`` holds
    back, its ``min_tokens``, how many tokens it has, the bias over the vocabulary, the penalties,
    the ids of its prompt and how often each id was generated.

    :meth:`start` sets a row up for a request; calling the processor on logits (n, V) of some of its
    rows returns the changed logits (a new float32 tensor); :meth:`add` counts the ids sampled from
    them, on the device: the host never waits for the ids. Rows that were not started may hold
    anything: leave them out.

    Args:
        rows: how many rows (e.g. the batch, or a scheduler's pool of cache rows).
        vocab_size: the width of the logits (the ids that may be sampled).
    """

    def __init__(self, rows: int, vocab_size: int, device):
        self.device = torch.device(device)
        self.vocab_size = vocab_size
        self.bias = torch.zeros(rows, vocab_size, device=device)
        self.penalties = torch.zeros(rows, 3, device=device)  # repetition, presence, frequency
        self.prompt = torch.zeros(rows, vocab_size, dtype=torch.bool, device=device)
        self.counts = torch.zeros(rows, vocab_size, dtype=torch.int32, device=device)
        self.min_tokens_ids = torch.zeros(rows, vocab_size, dtype=torch.bool, device=device)
        self.min_tokens = torch.zeros(rows, dtype=torch.int32, device=device)
        self.generated = torch.zeros(rows, dtype=torch.int32, device=device)  # tokens sampled so far

    def start(self, rows: Sequence[int], params: Sequence[SamplingParams], prompts: Sequence[Sequence[int]],
              min_tokens_ids: Sequence[Iterable[int]]) -> None:
        """Set ``rows`` up for requests: each its parameters, its prompt and the ids that its
        ``min_tokens`` holds back (:meth:`SamplingParams.min_tokens_ids`), nothing generated yet.
        Ids at or past ``vocab_size`` are left out (they are never sampled, so never penalized)."""
        for p in params:
            p.check_vocabulary(self.vocab_size)
        index = to_device(list(rows), torch.long, self.device)
        for state in (self.bias, self.prompt, self.counts, self.min_tokens_ids, self.generated):
            state.index_fill_(0, index, 0)
        self.penalties[index] = to_device([[p.repetition_penalty, p.presence_penalty, p.frequency_penalty]
                                           for p in params], torch.float32, self.device)
        self.min_tokens[index] = to_device([p.min_tokens for p in params], torch.int32, self.device)
        bias = [(r, t, b) for r, p in zip(rows, params) for t, b in p.logit_bias]
        if bias:
            where, ids, values = zip(*bias)
            self.bias.index_put_((to_device(where, torch.long, self.device), to_device(ids, torch.long, self.device)),
                                 to_device(values, torch.float32, self.device))
        seen = [(r, t) for r, p in zip(rows, prompts) for t in set(p) if t < self.vocab_size]
        if seen:
            where, ids = zip(*seen)
            self.prompt.index_put_((to_device(where, torch.long, self.device), to_device(ids, torch.long, self.device)),
                                   torch.ones(len(ids), dtype=torch.bool, device=self.device))
        held = [(r, t) for r, ids in zip(rows, min_tokens_ids) for t in set(ids) if t < self.vocab_size]
        if held:
            where, ids = zip(*held)
            self.min_tokens_ids.index_put_(
                (to_device(where, torch.long, self.device), to_device(ids, torch.long, self.device)),
                torch.ones(len(ids), dtype=torch.bool, device=self.device))

    def __call__(self, logits: torch.Tensor, rows: Optional[torch.Tensor] = None) -> torch.Tensor:
        """(n, V) float32: ``logits`` (n, V) of ``rows`` (n,) on the device, after min_tokens (-inf for
        the ids it holds back), the logit bias and the penalties. rows None: all rows, in order."""
        def of_rows(state):
            return state if rows is None else state[rows]

        short = of_rows(self.generated) < of_rows(self.min_tokens)  # (n,): rows short of their min_tokens
        # added, not filled in: a NaN or +inf of the model at a held-back id still reads as non-finite
        bias = of_rows(self.bias).masked_fill(of_rows(self.min_tokens_ids) & short[:, None], float("-inf"))
        logits = logits.float() + bias  # a new tensor: the model's logits stay as they are
        repetition, presence, frequency = of_rows(self.penalties).split(1, dim=1)
        return apply_penalties(logits, of_rows(self.prompt), of_rows(self.counts), repetition, presence, frequency)

    def add(self, ids: torch.Tensor, rows: Optional[torch.Tensor] = None) -> None:
        """Count ``ids`` (n,), sampled for ``rows`` (n,) on the device (None: all rows, in order);
        :data:`NON_FINITE` counts nothing."""
        if rows is None:
            rows = torch.arange(len(ids), device=ids.device)
        sampled = (ids >= 0).to(torch.int32)
        self.counts.index_put_((rows, ids.clamp_min(0)), sampled, accumulate=True)
        self.generated.index_add_(0, rows, sampled)
