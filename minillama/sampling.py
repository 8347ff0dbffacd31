"""Choosing the next token on the device: greedy, temperature, top-k, top-p (nucleus), min-p.

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
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

NON_FINITE = -1  # the id sample() returns for a row with NaN / +inf logits
SEED_RANGE = (-(2 ** 63), 2 ** 64 - 1)  # what torch.Generator.manual_seed accepts


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0: greedy
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1: off
    min_p: float = 0.0  # 0: off
    seed: Optional[int] = None

    def __post_init__(self):
        for name in ("temperature", "top_p", "min_p"):
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

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1

    def generator(self, device) -> Optional[torch.Generator]:
        if self.seed is None:
            return None
        return torch.Generator(device=device).manual_seed(self.seed)


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
    finite = torch.isfinite(logits.amax(dim=-1))  # (B,); amax propagates NaN
    if params.greedy:
        ids = logits.argmax(dim=-1)
    else:
        probs = filtered_probs(logits, params)
        race = torch.empty_like(probs).exponential_(1.0, generator=generator)
        race.clamp_min_(torch.finfo(race.dtype).tiny)  # a draw of exactly 0 would make 0 / 0 = nan win
        ids = (probs / race).argmax(dim=-1)
    return torch.where(finite, ids, NON_FINITE)


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
