"""min_tokens, the logit bias and the penalties in float64, one id at a time, from their definitions
(vLLM's order; the repetition rule of transformers' ``RepetitionPenaltyLogitsProcessor``): the oracle
for ``minillama.sampling.LogitsProcessor``. Shares no code with minillama."""
from typing import Iterable, Sequence, Tuple

import torch


def reference_logits(logits: Sequence[float], logit_bias: Iterable[Tuple[int, float]] = (),
                     repetition_penalty: float = 1.0, presence_penalty: float = 0.0, frequency_penalty: float = 0.0,
                     prompt: Sequence[int] = (), output: Sequence[int] = (), min_tokens: int = 0,
                     min_tokens_ids: Iterable[int] = ()) -> torch.Tensor:
    """(V,) float64: ``logits``, -inf at each of ``min_tokens_ids`` while the output has fewer than
    ``min_tokens`` ids, plus the bias; then each id of the prompt or output divided by
    ``repetition_penalty`` when positive, else multiplied by it; then each id of the output less
    ``frequency_penalty * count + presence_penalty``."""
    out = [float(x) for x in logits]
    if len(output) < min_tokens:
        for t in min_tokens_ids:
            out[t] = float("-inf")
    for t, bias in logit_bias:
        out[t] += bias
    for t in set(prompt) | set(output):
        out[t] = out[t] / repetition_penalty if out[t] > 0 else out[t] * repetition_penalty
    for t in set(output):
        out[t] -= frequency_penalty * list(output).count(t) + presence_penalty
    return torch.tensor(out, dtype=torch.float64)
