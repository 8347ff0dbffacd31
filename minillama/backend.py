"""Kernel backends: each fused op of the model in plain PyTorch and in Triton, under one contract.

The model's layers (``minillama.layers``) hold a backend, chosen once at construction, and call
it; nothing is chosen per call and no environment variable is read on the hot path.

* :class:`TorchBackend`: plain PyTorch ops and flashcore's reference attention. The CPU path, the
  readable statement of each op's contract, and differentiable (the demo model trains with it).
* :class:`TritonBackend`: Triton kernels (``minillama.kernels``) and flashcore's Triton attention.
  Single-token steps run each projection as one GEMV launch with its RMSNorm prologue and its
  SiLU x up or residual-add epilogue folded in; larger steps run cuBLAS for the matrices (the
  residual add in its epilogue, beta = 1) and Triton kernels for RMSNorm, RoPE and SiLU x up.

The ops (shapes: T tokens, K in, N out, D head_dim):

* ``attention(q, k, v, cache)``: flashcore's append + attend over one layer's cache view.
* ``rms_norm(x, weight, eps)``: ``weight * x / sqrt(mean(x^2) + eps)`` over the last dim, computed
  in float32 and rounded to x's dtype before the gain.
* ``rope_(qk, cos, sin, n_heads, head_dim)``: rotate the first n_heads heads of each row of
  qk (T, >= n_heads * D) in place; rotate-half layout, cos/sin (T, D).
* ``silu_mul(gate_up)``: ``silu(gate) * up`` for gate_up (..., 2F) = [gate | up] -> (..., F).
* ``linear(x, weight, bias, norm=, swiglu=, residual=, gemv_config=)``:
  ``residual + act(norm(x) @ weight.T + bias)`` with act = silu_mul when ``swiglu``; norm is an
  RMSNorm module (or None), residual a tensor of the output's shape (or None).
"""
from typing import Optional

import torch
import torch.nn.functional as F

import flashcore

BACKENDS = ("auto", "triton", "torch")


def rotate_half_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x * cos + rotate_half(x) * sin for x (..., D): dims i and i + D/2 form a pair (HF layout)."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class TorchBackend:
    """Plain PyTorch; flashcore's reference attention."""

    name = "torch"
    attention_implementation = "reference"

    def __deepcopy__(self, memo):  # stateless: a copied model shares its backend
        return self

    def attention(self, q, k, v, cache) -> torch.Tensor:
        return flashcore.attention_with_kv_cache(
            q, k, v, cache.k, cache.v, cache.seq_lens, seq_lens_cpu=cache.seq_lens_cpu,
            implementation=self.attention_implementation,
        )

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        x32 = x.float()  # accumulate in float32 whatever the model dtype
        return weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)

    def rope_(self, qk: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, n_heads: int, head_dim: int) -> None:
        T = qk.shape[0]
        x = qk[:, : n_heads * head_dim].view(T, n_heads, head_dim)  # (T, H, D), a view of qk
        x.copy_(rotate_half_rope(x, cos[:, None, :], sin[:, None, :]))

    def silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        gate, up = gate_up.chunk(2, dim=-1)
        return F.silu(gate) * up

    def linear(self, x, weight, bias=None, *, norm=None, swiglu: bool = False,
               residual: Optional[torch.Tensor] = None, gemv_config=None) -> torch.Tensor:
        if norm is not None:
            x = norm(x)
        y = F.linear(x, weight, bias)
        if swiglu:
            y = self.silu_mul(y)
        return y if residual is None else residual + y


class TritonBackend(TorchBackend):
    """Triton kernels and flashcore's Triton attention (CUDA, or Triton's interpreter on the CPU).

    Args:
        gemv: run single-token projections as the fused Triton GEMV (True) or through cuBLAS with
            the separate kernels (False; a benchmark ablation).
    """

    name = "triton"
    attention_implementation = "triton"

    def __init__(self, gemv: bool = True):
        from minillama import kernels  # Triton is imported only where it runs

        self.kernels = kernels
        self.gemv = gemv

    def rms_norm(self, x, weight, eps):
        return self.kernels.rms_norm(x, weight, eps)

    def rope_(self, qk, cos, sin, n_heads, head_dim):
        self.kernels.rope_(qk, cos, sin, n_heads, head_dim)

    def silu_mul(self, gate_up):
        lead = gate_up.shape[:-1]
        return self.kernels.silu_mul(gate_up.reshape(-1, gate_up.shape[-1])).view(*lead, -1)

    def linear(self, x, weight, bias=None, *, norm=None, swiglu=False, residual=None, gemv_config=None):
        K = x.shape[-1]
        rows = x.numel() // K
        lead = x.shape[:-1]
        if bias is not None:  # the GEMV and the addmm path take no bias: run the plain ops
            return super().linear(x, weight, bias, norm=norm, swiglu=swiglu, residual=residual)
        if rows == 1 and self.gemv:
            out = self.kernels.gemv(
                x.reshape(K).contiguous(), weight,
                norm_weight=None if norm is None else norm.weight, eps=0.0 if norm is None else norm.eps,
                swiglu=swiglu, residual=None if residual is None else residual.reshape(-1), config=gemv_config,
            )
            return out.view(*lead, -1)
        if norm is not None:
            x = norm(x)
        if residual is not None and not swiglu:  # residual + x W^T in cuBLAS's epilogue
            return torch.addmm(residual.reshape(rows, -1), x.reshape(rows, K), weight.t()).view(*lead, -1)
        y = F.linear(x, weight)
        if swiglu:
            y = self.silu_mul(y)
        return y if residual is None else residual + y


def make_backend(name: str, device) -> TorchBackend:
    """The backend called ``name`` for a model on ``device``.

    "auto": Triton on CUDA, torch elsewhere. "triton" on the CPU runs the kernels in Triton's
    interpreter, which needs ``TRITON_INTERPRET=1`` set before Triton is imported (the tests);
    otherwise it is a ValueError saying so.
    """
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    device = torch.device(device)
    if name == "auto":
        name = "triton" if device.type == "cuda" else "torch"
    if name == "torch":
        return TorchBackend()
    if device.type != "cuda" and not (device.type == "cpu" and flashcore.INTERPRET):
        raise ValueError(
            f"backend='triton' cannot run on {device}: its kernels need a CUDA device, or TRITON_INTERPRET=1 "
            f"set before Triton is imported to run them in Triton's interpreter on the CPU (slow; for tests); "
            f"use backend='torch' or 'auto'"
        )
    return TritonBackend()
