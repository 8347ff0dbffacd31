"""Errors that say what went wrong inside the model, and where to look.

:class:`NonFiniteLogitsError` is raised by the generate loop when the sampler marks a row whose
logits hold a NaN or an infinity (:data:`minillama.sampling.NON_FINITE`). Finding out why costs a
pass over the weights, which only the error pays: it names the tensors that hold non-finite
values, or, when every weight is finite, says that the activations overflowed the dtype.
"""
from typing import List, Tuple

import torch


class NonFiniteLogitsError(ValueError):
    """The model produced NaN or infinite logits; the message names the likely cause."""

    @classmethod
    def from_model(cls, model, row: int, step: int) -> "NonFiniteLogitsError":
        """The error for ``row`` at ``step`` of a generation (step 0 is the prompt's prefill)."""
        where = "reading the prompt" if step == 0 else f"at new token {step}"
        return cls(f"the model produced NaN/Inf logits (row {row}, {where}): {non_finite_cause(model)}")


def non_finite_weights(model) -> List[Tuple[str, int, int]]:
    """(checkpoint tensor name, non-finite values, values) of every weight that holds NaN or Inf."""
    found = []
    with torch.no_grad():
        for name, tensor in _checkpoint_tensors(model):
            if tensor.dtype == torch.float8_e4m3fn:  # an 8-bit weight: isfinite has no float8 kernel
                tensor = tensor.float()
            bad = int((~torch.isfinite(tensor)).sum().item())
            if bad:
                found.append((name, bad, tensor.numel()))
    return found


def non_finite_cause(model) -> str:
    """Why a model's logits may be non-finite: its non-finite weights, or an overflow."""
    dtype = next(model.parameters()).dtype
    bad = non_finite_weights(model)
    if bad:
        listed = ", ".join(f"{name} ({n} of {total} values)" for name, n, total in bad[:3])
        more = f" and {len(bad) - 3} more tensor(s)" if len(bad) > 3 else ""
        hint = "fix or download the checkpoint again"
        if dtype == torch.float16:
            hint += " (float16 holds no value beyond 65504: loading in bfloat16 or float32 may avoid the overflow)"
        return f"these weights hold NaN/Inf values: {listed}{more}; {hint}"
    if dtype == torch.float16:
        return ("every weight is finite, so the activations overflowed float16 (largest value 65504): load the "
                "model with dtype='bfloat16' or 'float32'")
    return (f"every weight is finite, so the activations overflowed {str(dtype).removeprefix('torch.')}: the "
            f"weights are far out of scale, or config.json's rms_norm_eps / rope_theta / rope_scaling do not "
            f"fit this checkpoint")


def _checkpoint_tensors(model) -> List[Tuple[str, torch.Tensor]]:
    """(checkpoint tensor name, the part of the model it filled): names as the user's files spell
    them, also inside fused parameters; the model's own names if the name table does not fit."""
    from minillama.weights import checkpoint_names, parameter_block

    params = dict(model.named_parameters(remove_duplicate=False))
    scales = [(name, p) for name, p in params.items() if name.endswith("weight_scale")]  # of 8-bit weights
    try:
        return [(hf, parameter_block(model, ours, part, params))
                for hf, (ours, part) in checkpoint_names(model.config).items()] + scales
    except Exception:  # a model whose parameters the name table does not describe
        return list(model.named_parameters())
