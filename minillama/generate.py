"""The one generate loop: it owns the KV cache, prefills, decodes, samples and stops.

Rows of a batch may have prompts of different lengths. Prefill runs them as one right-padded batch;
afterwards each row's fill (``seq_lens``) is set to its own prompt length, so pad positions lie past
the fill: never attended to, and overwritten by the row's next tokens. Positions come from
``seq_lens``, so no padding ever shifts a row's positions.
"""
import time
from dataclasses import dataclass
from typing import Iterator, List, Optional, Sequence

import torch

from minillama.kv_cache import KVCache
from minillama.model import Transformer
from minillama.sampling import SamplingParams, sample


@dataclass
class StepTimes:
    prefill_s: float = 0.0  # wall time from the call to the first tokens on the host
    decode_s: float = 0.0  # wall time of the decode steps after that
    decode_steps: int = 0


class TokenLoop:
    """Iterate to run the loop: each step yields the new token of every row (None once a row is done).

    A row is done when it samples one of ``stop_ids`` (that token is not yielded; it is kept in
    ``stop_token[row]``), when it has ``max_new_tokens`` tokens, or when the caller calls
    :meth:`finish` (e.g. a stop string matched). The loop ends as soon as every row is done.
    """

    def __init__(
        self,
        model: Transformer,
        prompts: Sequence[Sequence[int]],
        max_new_tokens: int,
        sampling: SamplingParams = SamplingParams(),
        stop_ids: Sequence[int] = (),
        cache: Optional[KVCache] = None,
        forward=None,
    ):
        self.model = model
        self.forward = forward or model  # a faster wrapper of the same model may be passed in
        self.prompts = [list(p) for p in prompts]
        self.max_new_tokens = max_new_tokens
        self.sampling = sampling
        self.stop_ids = set(stop_ids)
        device = model.tok_embeddings.weight.device
        self.device = device
        batch = len(self.prompts)
        if cache is None:
            need = max(len(p) for p in self.prompts) + max_new_tokens
            cache = KVCache.allocate(model.config, batch, need, device, model.tok_embeddings.weight.dtype)
        self.cache = cache
        self.generator = sampling.generator(device)
        self.done = [max_new_tokens == 0] * batch
        self.finish_reason: List[Optional[str]] = ["length" if d else None for d in self.done]
        self.stop_token: List[Optional[int]] = [None] * batch
        self.new_tokens: List[List[int]] = [[] for _ in range(batch)]
        self.times = StepTimes()

    def finish(self, row: int, reason: str = "stop") -> None:
        if not self.done[row]:
            self.done[row] = True
            self.finish_reason[row] = reason

    def _prefill(self) -> torch.Tensor:
        lengths = [len(p) for p in self.prompts]
        width = max(lengths)
        tokens = torch.zeros(len(self.prompts), width, dtype=torch.long)
        for b, p in enumerate(self.prompts):
            tokens[b, : len(p)] = torch.tensor(p, dtype=torch.long)
        last = torch.tensor(lengths, dtype=torch.long) - 1
        cache = self.cache
        with torch.inference_mode():
            logits = self.forward(
                tokens.to(self.device), cache.k, cache.v, cache.seq_lens,
                seq_lens_cpu=cache.lengths, logits_at=last.to(self.device),
            )
        cache.advance(lengths)
        return logits[:, -1]

    def _decode(self, tokens: torch.Tensor) -> torch.Tensor:
        cache = self.cache
        with torch.inference_mode():
            logits = self.forward(tokens[:, None], cache.k, cache.v, cache.seq_lens, seq_lens_cpu=cache.lengths)
        cache.advance(1)
        return logits[:, -1]

    def __iter__(self) -> Iterator[List[Optional[int]]]:
        if all(self.done):
            return
        start = time.perf_counter()
        with torch.inference_mode():
            next_ids = sample(self._prefill(), self.sampling, self.generator)
        step = 0
        while True:
            ids = next_ids.tolist()  # the one host sync per step: the chosen ids
            if step == 0:
                self.times.prefill_s = time.perf_counter() - start
                start = time.perf_counter()
            step += 1
            out: List[Optional[int]] = []
            for b, t in enumerate(ids):
                if self.done[b]:
                    out.append(None)
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
            with torch.inference_mode():
                next_ids = sample(self._decode(next_ids), self.sampling, self.generator)
        self.times.decode_s = time.perf_counter() - start
        self.times.decode_steps = step - 1
