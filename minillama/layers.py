"""The layers the model is built from; each calls its backend (``minillama.backend``) for the math.

A layer's backend is chosen once, when the model is built. Tensor parallelism is a property of a
``Linear`` (its ``parallel`` share and the group), set when the model is built; a layer subclass
(the 8-bit ``QuantizedLinear`` of ``minillama.quantization``, say) is swapped in at load time and
runs under every backend, because the model only ever calls its modules.
"""
from typing import Optional, Sequence

import torch
from torch import nn


class RMSNorm(nn.Module):
    """``norm(x, residual) -> (normed, new_residual)``: new_residual = x + residual (x when None),
    normed = ``weight * new_residual / sqrt(mean(new_residual^2) + eps)`` over the last dim,
    accumulated in float32. The add and the norm are one launch; at single-token steps the Triton
    backend defers both into the next projection's GEMV."""

    def __init__(self, dim: int, eps: float, backend):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.backend = backend

    def forward(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None):
        return self.backend.rms_norm(x, self.weight, self.eps, residual)


class Linear(nn.Module):
    """``x @ weight.T (+ bias)``. x is a tensor or, under the Triton backend at single-token steps,
    the deferred output of an :class:`RMSNorm` that the GEMV computes in its prologue.

    A subclass (quantized, say) is swapped in at load time; the model only calls :meth:`forward`.
    Under tensor parallelism (``minillama.parallel``) the layer holds this rank's share:

    * ``"column"``: this rank's rows (each fused part split evenly): its output is this rank's
      heads or FFN columns;
    * ``"row"``: this rank's input columns: the partial products are summed by one all-reduce in
      :meth:`forward` (the bias added once, after it). The residual add that follows happens in
      the next norm (``norm(x, residual)``), after the reduction;
    * ``"vocab"``: this rank's rows of the LM head; the ranks' logits are all-gathered.

    Args:
        in_features, out_features: the full sizes (this rank holds its share of them).
        parts: the full sizes of the row blocks this weight was fused from (q, k, v; gate, up),
            in order; the loader copies each checkpoint tensor (or this rank's slice of it) into
            its block. Default: one block.
        parallel: None (replicated), "column", "row" or "vocab"; tp: the group (None: one process).
    Attributes:
        parts: the row blocks as this rank holds them. gemv_config: the GEMV tiling for this
            matrix (set by the runner's tuning; None: default). fuse_norm: at single-token steps,
            the residual add + RMSNorm before this matrix runs inside its GEMV (True, the default)
            or as its own kernel first (False); set by the runner's tuning. norm_next: at
            single-token steps, the residual add + RMSNorm after this matrix run in its GEMV's
            epilogue, the next GEMV's applying the 1 / rms (``backend.PendingProduct``,
            ``backend.NormedRows``; replicated layers only); set by the runner's tuning.
        feeds_norm: the output goes into the residual add + RMSNorm (o and down): under the Triton
            backend a product of a few rows (``TritonBackend.norm_in_matmuls``) adds the residual,
            writes h * the norm's gain and sums the rows' squares in its epilogue, and the next
            product applies each row's 1 / rms in its own (replicated layers only); set by the model.
    """

    swiglu = False  # output silu(first half) * second half: see GateUpLinear

    def __init__(self, in_features: int, out_features: int, bias: bool, backend,
                 parts: Optional[Sequence[int]] = None, parallel: Optional[str] = None, tp=None,
                 feeds_norm: bool = False):
        super().__init__()
        assert parallel in (None, "column", "row", "vocab"), parallel
        n = tp.world_size if tp is not None and parallel is not None else 1
        parts = tuple(parts) if parts is not None else (out_features,)
        assert sum(parts) == out_features, (parts, out_features)
        if parallel in ("column", "vocab"):
            assert all(p % n == 0 for p in parts), (parts, n)
            parts = tuple(p // n for p in parts)
            out_features //= n
        elif parallel == "row":
            assert in_features % n == 0, (in_features, n)
            in_features //= n
        self.in_features, self.out_features, self.parts = in_features, out_features, parts
        self.parallel = parallel if n > 1 else None
        self.tp = tp if n > 1 else None
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None
        self.backend = backend
        self.gemv_config = None
        self.fuse_norm = True
        self.norm_next = False
        self.feeds_norm = feeds_norm

    @property
    def shard_dim(self) -> Optional[int]:
        """The dim of the checkpoint's weight that ranks split (None: every rank holds all of it)."""
        return {None: None, "column": 0, "vocab": 0, "row": 1}[self.parallel]

    def forward(self, x, rope=None) -> torch.Tensor:
        """x (T, in) -> (T, out); rope (a ``backend.Rope``): rotate heads of the output (column
        parallel or replicated layers only)."""
        reduce = self.parallel == "row"
        assert rope is None or self.parallel in (None, "column"), self.parallel
        y = self.backend.linear(x, self.weight, None if reduce else self.bias, swiglu=self.swiglu,
                                gemv_config=self.gemv_config, fuse_norm=self.fuse_norm, rope=rope,
                                norm_next=self.norm_next and self.parallel is None,
                                feeds_norm=self.feeds_norm and self.parallel is None)
        return self.combine(y)

    def combine(self, y: torch.Tensor) -> torch.Tensor:
        """This rank's output -> the layer's: all-reduce (row), all-gather (vocab), as is (else)."""
        if self.parallel == "row":
            y = self.tp.all_reduce_(y)
            return y if self.bias is None else y + self.bias
        if self.parallel == "vocab":
            return self.tp.all_gather_last(y)
        return y

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, parts={self.parts}, bias={self.bias is not None}"
                + (f", parallel={self.parallel} over {self.tp.world_size}" if self.parallel else ""))


class GateUpLinear(Linear):
    """The gate and up projections as one (2F, K) matrix, giving ``silu(gate) * up`` (..., F)."""

    swiglu = True
