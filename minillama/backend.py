"""Kernel backends: each fused op of the model in plain PyTorch and in Triton, under one contract.

The model's layers (``minillama.layers``) hold a backend, chosen once at construction, and call
it; nothing is chosen per call and no environment variable is read on the hot path.

* :class:`TorchBackend`: plain PyTorch ops and flashcore's reference attention. The CPU path, the
  readable statement of each op's contract, and differentiable (the demo model trains with it).
* :class:`TritonBackend`: Triton kernels (``minillama.kernels``) and flashcore's Triton attention.
  Single-token steps run each projection as one GEMV launch with the residual add and RMSNorm
  before it folded into its prologue and SiLU x up into its epilogue; steps of a few rows run a
  Triton matmul (8-bit weights up to a few hundred rows; the model's dtype up to 16 rows, 64 for
  gate/up and down), larger steps cuBLAS, with Triton kernels for residual add + RMSNorm (one
  launch), and for RoPE and SiLU x up where the matmul's epilogue does not do them.

The ops (shapes: T tokens, K in, N out, D head_dim):

* ``attention(q, k, v, cache)``: flashcore's append + attend over one layer's cache view.
* ``varlen_attention(q, k, v, cache, tiles)``: the same for packed tokens of several rows
  (flashcore's varlen contract).
* ``rms_norm(x, weight, eps, residual=None) -> (normed, new_residual)``: new_residual = x + residual
  (x when residual is None), rounded to x's dtype; normed = weight * new_residual /
  sqrt(mean(new_residual^2) + eps) over the last dim, computed in float32 and rounded to x's dtype
  before the gain. The Triton backend returns a single-token ``normed`` as a :class:`NormedInput`,
  computed by the next projection's GEMV in its prologue (or, where that linear's ``fuse_norm`` is
  False, by its own kernel just before the GEMV). Given a :class:`PendingProduct` x, the launch
  that makes x (a single-token GEMV, or a Triton matmul of a few rows) adds the residual, writes
  h * gain and sums the rows' squares in its epilogue, and returns ``normed`` as
  :class:`NormedRows`: the next GEMV or matmul multiplies h * gain and applies each row's 1 / rms
  in its epilogue.
* ``rope_cos_sin(positions, inv_freq, dtype) -> (cos, sin)``: RoPE's tables (T, D) for integer
  positions (T,) (int32 or int64): the angles ``position * inv_freq`` in float32, their cosines and
  sines rounded to dtype, each half of D the same (rotate-half layout).
* ``rope_(qk, cos, sin, n_heads, head_dim)``: rotate the first n_heads heads of each row of
  qk (T, >= n_heads * D) in place; rotate-half layout, cos/sin (T, D).
* ``silu_mul(gate_up)``: ``silu(gate) * up`` for gate_up (..., 2F) = [gate | up] -> (..., F).
* ``linear(x, weight, bias=None, swiglu=False, gemv_config=None, weight_scale=None, fuse_norm=True,
  rope=None, norm_next=False, feeds_norm=False)``: ``x @ weight.T + bias``, then silu_mul when ``swiglu``, then
  ``rope_`` of the output with a :class:`Rope` (the Triton backend's GEMV does it in its epilogue); x is a
  tensor (T, K) (or (..., K) without rope), a :class:`NormedInput` or :class:`NormedRows`. With ``weight_scale`` (N,)
  float32, weight is 8-bit (int8 or float8_e4m3fn) and stands for ``weight * weight_scale[:, None]``
  (``minillama.quantization``).
  gemv_config, fuse_norm and norm_next choose how the Triton backend runs a single-token product
  (the GEMV's tiling; the norm before it in its prologue or not; with norm_next, the output as a
  :class:`PendingProduct`, so that the norm after it runs in its launch): the same function, rounded
  differently. A ``kernels.TensorCoreTiling`` (8-bit weights on the tensor cores) has neither norm in
  its launch: the norm before it runs as its own kernel, the one after it too. feeds_norm: the
  output goes into a residual add + RMSNorm (o, down); the Triton backend returns a product of a few
  rows in its Triton matmul as a :class:`PendingProduct` too (:meth:`TritonBackend.norm_in_matmuls`),
  and the next matmul's product of the normed rows is the same function, rounded differently.
"""
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F

import flashcore
from minillama.quantization import dequantize

BACKENDS = ("auto", "triton", "torch")
MATMUL_8BIT = ("triton", "dequantize", "scaled_mm")
# Rows up to which the Triton backend multiplies by 8-bit weights in its fused 8-bit matmul; more
# rows take a model-dtype copy of the weight (one Triton pass: reads 1 byte and writes 2 per weight)
# and cuBLAS. With TMA (Hopper) the fused matmul's swapped form in 256-token tiles beats the copy up
# to 512 rows: H200, 2026-12-01, Llama-3.1-8B's four matrices at 512 rows, us per layer fp8 / int8
# 396 / 431 against 455 / 458 for the copy + cuBLAS (bf16 weights: 289); at 1024 rows they are even
# (719 / 774 against 728). Without TMA the copy wins past 64 rows (gate/up at 512 rows: 273 vs 153 us
# for cuBLAS on the bf16 weight).
FUSED_8BIT_ROWS = 64
FUSED_8BIT_ROWS_TMA = 512
# Rows up to which the Triton backend multiplies by weights of the model's dtype (bfloat16, float16)
# in the same Triton matmul, on a GPU with TMA, RoPE or SiLU x up in its epilogue; more rows (or no TMA) run
# cuBLAS. At 16 rows the matmul streams Llama-3.1-8B's matrices as fast as cuBLAS or faster (H200:
# 115 against 119 us per layer, ``kernels.matmul_config``), and its epilogue saves the SiLU x up
# kernel: batch-16 decode 3130 -> 3385 tok/s (H200, BENCHMARKS.md).
MODEL_DTYPE_ROWS = 16
# Rows up to which the two largest matrices of a layer, gate/up (SiLU x up fused) and down (rows at
# least twice as long as its columns), run the Triton matmul still; qkv and o take cuBLAS past
# ``MODEL_DTYPE_ROWS``. H200, Llama-3.1-8B at 64 rows, us per layer (``kernels.matmul_config``):
# gate/up 60.7 against 65.1 for cuBLAS + ``silu_mul``, down 33.7 against 36.4; 0.1-1.7 us less
# each at 17-32 rows. Batch-64 decode 10569 -> 11047 tok/s, batch 48 8334 -> 8612 (BENCHMARKS.md).
MODEL_DTYPE_LARGE_ROWS = 64


def runs_model_dtype_matmul(rows: int, n: int, k: int, swiglu: bool) -> bool:
    """Whether a product of ``rows`` rows by a weight of the model's dtype, (n, k), runs the Triton
    matmul (on a GPU with TMA) rather than cuBLAS."""
    large = swiglu or k >= 2 * n
    return rows <= (MODEL_DTYPE_LARGE_ROWS if large else MODEL_DTYPE_ROWS)


def rotate_half_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x * cos + rotate_half(x) * sin for x (..., D): dims i and i + D/2 form a pair (HF layout)."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


def rope_cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype):
    """cos, sin of shape (T, D) for integer positions (T,), computed in float32."""
    freqs = positions[:, None].float() * inv_freq  # (T, D/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (T, D): rotate-half layout
    return emb.cos().to(dtype), emb.sin().to(dtype)


class NormedInput(NamedTuple):
    """RMSNorm(x + residual) of one token, not computed yet: the Triton GEMV that takes it as its
    input computes it in its prologue and writes x + residual to ``new_residual``."""

    x: torch.Tensor  # (1, 1, K)
    residual: Optional[torch.Tensor]  # (1, 1, K) or None
    weight: torch.Tensor  # (K,) the norm's gain
    eps: float
    new_residual: torch.Tensor  # (1, 1, K): receives x + residual (x itself when residual is None)

    @property
    def shape(self) -> torch.Size:
        return self.x.shape


class PendingProduct:
    """A product's output (..., N), not computed yet, so that the residual add + RMSNorm after it can
    run in its launch: ``TritonBackend.rms_norm`` launches it with them (a single-token GEMV or a
    multi-row matmul adds the residual, writes h * gain and sums the rows' squares in its epilogue,
    for the next product's epilogue: :class:`NormedRows`). Anything else that takes it gets the
    plain product: ``materialize()`` (``TritonBackend.materialize`` and indexing call it)."""

    __slots__ = ("launch", "shape")

    def __init__(self, launch, shape: torch.Size):
        self.launch = launch  # launch() -> out; launch(norm_next=(residual, weight, eps)) -> (NormedRows, h)
        self.shape = shape

    def materialize(self) -> torch.Tensor:
        return self.launch()

    def __getitem__(self, index):
        return self.materialize()[index]


class NormedRows(NamedTuple):
    """RMSNorm(h) * weight of rows h (T, K), not applied yet: the Triton GEMV (one row) or matmul
    that takes it as its input multiplies ``gained`` (h * weight) and each row's dot products by its
    1 / rms, from ``sumsq`` (pieces, T), the sums of squares of pieces of h's rows; the product
    making h wrote both (``kernels.gemv``'s or ``kernels.matmul``'s norm_next). Any other consumer
    gets the norm's kernel: ``TritonBackend.materialize``."""

    h: torch.Tensor  # (T, K) (a GEMV's: (1, 1, K)), the new residual stream
    gained: torch.Tensor  # h's shape, h * weight rounded to h's dtype
    sumsq: torch.Tensor  # (pieces, T) float32
    weight: torch.Tensor  # (K,) the norm's gain
    eps: float

    @property
    def shape(self) -> torch.Size:
        return self.h.shape


class Rope(NamedTuple):
    """RoPE for a linear layer's output (T, N): rotate its first ``n_heads`` heads of ``head_dim``
    values, as ``rope_(output, cos, sin, n_heads, head_dim)`` does."""

    cos: torch.Tensor  # (T, head_dim)
    sin: torch.Tensor
    n_heads: int
    head_dim: int


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

    def varlen_attention(self, q, k, v, cache, tiles) -> torch.Tensor:
        return flashcore.varlen_attention_with_kv_cache(
            q, k, v, cache.k, cache.v, tiles, implementation=self.attention_implementation,
        )

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float, residual=None):
        if residual is not None:
            x = x + residual
        x32 = x.float()  # accumulate in float32 whatever the model dtype
        mean_sq = x32.pow(2).mean(-1, keepdim=True)
        # NaN where mean(x^2) overflowed: the overflow reaches the logits (and the generate loop's
        # NaN check) instead of turning the row into zeros
        inverse_rms = torch.where(torch.isinf(mean_sq), torch.nan, torch.rsqrt(mean_sq + eps))
        return weight * (x32 * inverse_rms).to(x.dtype), x

    def rope_cos_sin(self, positions: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype):
        return rope_cos_sin(positions, inv_freq, dtype)

    def rope_(self, qk: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, n_heads: int, head_dim: int) -> None:
        T = qk.shape[0]
        x = qk[:, : n_heads * head_dim].view(T, n_heads, head_dim)  # (T, H, D), a view of qk
        x.copy_(rotate_half_rope(x, cos[:, None, :], sin[:, None, :]))

    def silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        gate, up = gate_up.chunk(2, dim=-1)
        return F.silu(gate) * up

    def linear(self, x, weight, bias=None, *, swiglu: bool = False, gemv_config=None,
               weight_scale: Optional[torch.Tensor] = None, fuse_norm: bool = True,
               rope: Optional[Rope] = None, norm_next: bool = False, feeds_norm: bool = False) -> torch.Tensor:
        if weight_scale is not None:  # 8-bit weight: dequantize to the activations' dtype
            weight = dequantize(weight, weight_scale, x.dtype)
        y = F.linear(x, weight, bias)
        y = self.silu_mul(y) if swiglu else y
        if rope is not None:
            self.rope_(y, *rope)
        return y


def scaled_mm_w8a8(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor) -> torch.Tensor:
    """x (M, K) @ (weight * weight_scale[:, None])^T with x quantized to e4m3 per row (dynamic
    per-token scales, as FP8-dynamic checkpoints specify): one fp8 ``torch._scaled_mm`` with
    row-wise scales (Hopper). Returns (M, N) in x's dtype."""
    amax = x.abs().amax(dim=1, keepdim=True).float().clamp(min=1e-12)
    x_scale = amax / 448.0  # (M, 1)
    xq = (x.float() / x_scale).clamp(-448.0, 448.0).to(torch.float8_e4m3fn)
    return torch._scaled_mm(xq, weight.t(), scale_a=x_scale, scale_b=weight_scale[None, :].contiguous(),
                            out_dtype=x.dtype)


class TritonBackend(TorchBackend):
    """Triton kernels and flashcore's Triton attention (CUDA, or Triton's interpreter on the CPU).

    Args:
        gemv: run single-token projections as the fused Triton GEMV (True) or through cuBLAS with
            the separate kernels (False; a benchmark ablation).
        matmul_8bit: multi-row steps (prefill, batched decode) with 8-bit weights: "triton"
            (weight-only, the default: up to ``FUSED_8BIT_ROWS`` rows, or ``FUSED_8BIT_ROWS_TMA`` on
            a GPU with TMA, a Triton matmul that converts the 8-bit tiles in registers, on Hopper its
            Gluon form, ``minillama.hopper_matmul``, for most prefill chunks; more rows, a
            model-dtype copy of the weight made by one Triton kernel, then cuBLAS), "dequantize"
            (that copy and cuBLAS at every size; an ablation) or "scaled_mm" (as "triton", but an
            fp8 step of more than ``FUSED_8BIT_ROWS`` rows
            quantizes its activations per token and runs one fp8 ``torch._scaled_mm``: the W8A8
            math of FP8-dynamic checkpoints). Single-token steps always run the 8-bit GEMV.
    """

    name = "triton"
    attention_implementation = "triton"

    def __init__(self, gemv: bool = True, matmul_8bit: str = "triton"):
        from minillama import kernels  # Triton is imported only where it runs

        if matmul_8bit not in MATMUL_8BIT:
            raise ValueError(f"matmul_8bit must be one of {MATMUL_8BIT}, got {matmul_8bit!r}")
        self.kernels = kernels
        self.gemv = gemv
        self.matmul_8bit = matmul_8bit

    def rms_norm(self, x, weight, eps, residual=None):
        if isinstance(x, PendingProduct):
            if residual is None:
                x = x.materialize()
            else:  # the launch that makes x adds the residual (and norms, or sums the squares)
                return x.launch(norm_next=(residual, weight, eps))
        if self.gemv and x.numel() == x.shape[-1]:  # one token: the next projection's GEMV does it
            new_residual = x if residual is None else torch.empty_like(x)
            return NormedInput(x, residual, weight, eps, new_residual), new_residual
        return self.kernels.add_rms_norm(x, residual, weight, eps)

    def materialize(self, x):
        """A tensor for x: a :class:`NormedInput`, :class:`NormedRows` or :class:`PendingProduct` is
        computed now (for a consumer other than the GEMV or matmul, or than the norm)."""
        if isinstance(x, PendingProduct):
            return x.materialize()
        if isinstance(x, NormedRows):
            return self.kernels.add_rms_norm(x.h, None, x.weight, x.eps)[0]
        if not isinstance(x, NormedInput):
            return x
        normed, _ = self.kernels.add_rms_norm(x.x, x.residual, x.weight, x.eps,
                                              h_out=None if x.residual is None else x.new_residual)
        return normed

    def rope_cos_sin(self, positions, inv_freq, dtype):
        return self.kernels.rope_cos_sin(positions, inv_freq, dtype)

    def rope_(self, qk, cos, sin, n_heads, head_dim):
        self.kernels.rope_(qk, cos, sin, n_heads, head_dim)

    def silu_mul(self, gate_up):
        lead = gate_up.shape[:-1]
        return self.kernels.silu_mul(gate_up.reshape(-1, gate_up.shape[-1])).view(*lead, -1)

    def _runs_triton_matmul(self, x2: torch.Tensor, weight: torch.Tensor, weight_scale, swiglu: bool) -> bool:
        """Whether a bias-free product of rows x2 (T, K) runs ``kernels.matmul`` (else a model-dtype
        copy of an 8-bit weight and cuBLAS, or cuBLAS): see ``FUSED_8BIT_ROWS`` and
        :func:`runs_model_dtype_matmul`."""
        rows = x2.shape[0]
        if weight_scale is not None:
            return self.matmul_8bit != "dequantize" and (
                rows <= FUSED_8BIT_ROWS or rows <= FUSED_8BIT_ROWS_TMA and self.kernels.tma_ready(x2, weight))
        return (runs_model_dtype_matmul(rows, *weight.shape, swiglu) and weight.dtype == x2.dtype
                and weight.dtype in (torch.bfloat16, torch.float16) and self.kernels.tma_ready(x2, weight))

    def norm_in_matmuls(self, rows: int, weight_scale) -> bool:
        """Whether a product of ``rows`` rows in the Triton matmul that feeds a residual add + RMSNorm
        (``feeds_norm``) runs that add in its epilogue, for the next matmul to apply the norm in its
        own (:class:`NormedRows`): no norm kernel between them. H200, 2026-12-03, random
        Llama-3.1-8B, fill 512, tok/s, norms as kernels -> in the matmuls: bf16 batch 16 3502 ->
        3559 (+1.6%), batch 64 11102 -> 11069 (-0.3%: its qkv and o run cuBLAS, so the norm's kernel
        stays); fp8 batch 16 4968 -> 5141 (+3.5%), batch 64 12499 -> 12692 (+1.5%); int8 batch 16
        4947 -> 5075 (+2.6%), batch 64 11039 -> 11187 (+1.3%) (BENCHMARKS.md). Hence weights of the
        model's dtype up to ``MODEL_DTYPE_ROWS`` rows and 8-bit weights up to ``FUSED_8BIT_ROWS``."""
        return rows <= (MODEL_DTYPE_ROWS if weight_scale is None else FUSED_8BIT_ROWS)

    def linear(self, x, weight, bias=None, *, swiglu=False, gemv_config=None, weight_scale=None, fuse_norm=True,
               rope=None, norm_next=False, feeds_norm=False):
        """norm_next: at a single-token step without a norm before it, return a :class:`PendingProduct`
        so that the residual add + RMSNorm after it run in the GEMV's launch. feeds_norm: the same for
        a product in the Triton matmul where :meth:`norm_in_matmuls` says so. Either launch's epilogue
        adds the residual, writes h * the norm's gain and sums the rows' squares, and the next GEMV or
        matmul multiplies h * gain and applies each row's 1 / rms in its epilogue (:class:`NormedRows`),
        so the norm's kernel goes."""
        if (isinstance(x, NormedInput) and bias is None and fuse_norm
                and not isinstance(gemv_config, self.kernels.TensorCoreTiling)):  # it runs no norm
            K = x.x.shape[-1]
            out = self.kernels.gemv(
                x.x.reshape(K), weight,
                add=None if x.residual is None else x.residual.reshape(K),
                h_out=None if x.residual is None else x.new_residual.view(K),
                norm_weight=x.weight, eps=x.eps, swiglu=swiglu, rope=rope, config=gemv_config, scale=weight_scale,
            )
            return out.view(*x.shape[:-1], -1)
        if isinstance(x, NormedRows) and bias is None and self.gemv and x.h.numel() == x.h.shape[-1]:
            K = x.h.shape[-1]
            out = self.kernels.gemv(x.gained.reshape(K), weight, norm=(x.sumsq, x.eps), swiglu=swiglu, rope=rope,
                                    config=gemv_config, scale=weight_scale)
            return out.view(*x.shape[:-1], -1)
        if isinstance(x, NormedRows) and bias is None and self._runs_triton_matmul(x.h, weight, weight_scale, swiglu):
            return self.kernels.matmul(x.gained, weight, weight_scale, swiglu=swiglu, rope=rope, norm=(x.sumsq, x.eps))
        x = self.materialize(x)
        shape = torch.Size((*x.shape[:-1], weight.shape[0] // 2 if swiglu else weight.shape[0]))
        if bias is None and self.gemv and x.numel() == x.shape[-1]:  # one token, no norm before it
            x1 = x.reshape(-1).contiguous()

            def launch(norm_next=None):
                if norm_next is None:
                    return self.kernels.gemv(x1, weight, swiglu=swiglu, rope=rope, config=gemv_config,
                                             scale=weight_scale).view(shape)
                residual, gain, eps = norm_next
                h, gained, sumsq = self.kernels.gemv(x1, weight, config=gemv_config, scale=weight_scale,
                                                     norm_next=(residual.reshape(-1), gain))
                return NormedRows(h.view(shape), gained.view(shape), sumsq, gain, eps), h.view(shape)

            tensor_core = isinstance(gemv_config, self.kernels.TensorCoreTiling)  # it runs no norm
            if norm_next and not swiglu and rope is None and not tensor_core:
                return PendingProduct(launch, shape)
            return launch()
        x2 = x.reshape(-1, x.shape[-1])
        rows = x2.shape[0]
        if (weight_scale is not None and bias is None and self.matmul_8bit == "scaled_mm" and rows > FUSED_8BIT_ROWS
                and weight.dtype == torch.float8_e4m3fn and x.is_cuda):
            y = scaled_mm_w8a8(x2, weight, weight_scale)
        elif bias is None and self._runs_triton_matmul(x2, weight, weight_scale, swiglu):
            x2 = x2.contiguous()  # kernels.matmul runs SiLU x up and RoPE in its epilogue
            if feeds_norm and self.norm_in_matmuls(rows, weight_scale) and not swiglu and rope is None:

                def launch(norm_next=None):
                    if norm_next is None:
                        return self.kernels.matmul(x2, weight, weight_scale).view(shape)
                    residual, gain, eps = norm_next
                    h, gained, sumsq = self.kernels.matmul(x2, weight, weight_scale,
                                                           norm_next=(residual.reshape(rows, -1), gain))
                    return NormedRows(h, gained, sumsq, gain, eps), h.view(shape)

                return PendingProduct(launch, shape)
            return self.kernels.matmul(x2, weight, weight_scale, swiglu=swiglu, rope=rope).view(shape)
        else:
            if weight_scale is not None:  # a model-dtype copy of the weight, then cuBLAS
                weight = self.kernels.dequantize(weight, weight_scale, x.dtype)
            y = F.linear(x2, weight, bias)
        y = y.view(*x.shape[:-1], -1)
        y = self.silu_mul(y) if swiglu else y
        if rope is not None:
            self.rope_(y, *rope)
        return y


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
