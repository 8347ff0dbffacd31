"""The layers the model is built from; each calls its backend (``minillama.backend``) for the math.

A layer's backend is chosen once, when the model is built. A layer subclass (a quantized or a
parallel ``Linear``, say) is swapped in at load time and runs under every backend, because the
model only ever calls its modules.
"""
from typing import Optional, Sequence

import torch
from torch import nn


class RMSNorm(nn.Module):
    """``weight * x / sqrt(mean(x^2) + eps)`` over the last dim, accumulated in float32."""

    def __init__(self, dim: int, eps: float, backend):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.backend = backend

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.backend.rms_norm(x, self.weight, self.eps)


class Linear(nn.Module):
    """A projection with its neighbours: ``residual + norm(x) @ weight.T (+ bias)``.

    ``norm`` (an :class:`RMSNorm`) and ``residual`` are optional arguments of the call so that the
    backend can fuse them: the Triton GEMV folds the norm into its prologue and the residual add
    into its epilogue at single-token steps; cuBLAS adds the residual in its epilogue at larger
    ones. A subclass that must do something between the product and the residual add (a
    row-parallel linear's all-reduce) overrides :meth:`forward` and adds the residual itself.

    Args:
        parts: the sizes of the row blocks this weight was fused from (q, k, v; gate, up), in
            order; the loader copies each checkpoint tensor into its block. Default: one block.
    Attributes:
        gemv_config: the GEMV tiling for this matrix (set by the runner's tuning; None: default).
    """

    swiglu = False  # output silu(first half) * second half: see GateUpLinear

    def __init__(self, in_features: int, out_features: int, bias: bool, backend,
                 parts: Optional[Sequence[int]] = None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.parts = tuple(parts) if parts is not None else (out_features,)
        assert sum(self.parts) == out_features, (self.parts, out_features)
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None
        self.backend = backend
        self.gemv_config = None

    def forward(self, x: torch.Tensor, norm: Optional[RMSNorm] = None,
                residual: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self.backend.linear(x, self.weight, self.bias, norm=norm, swiglu=self.swiglu,
                                   residual=residual, gemv_config=self.gemv_config)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, parts={self.parts}, bias={self.bias is not None}"


class GateUpLinear(Linear):
    """The gate and up projections as one (2F, K) matrix, giving ``silu(gate) * up`` (..., F)."""

    swiglu = True
