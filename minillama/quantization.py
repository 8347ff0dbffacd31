"""8-bit weights: int8 and float8_e4m3fn, one float32 scale per output channel.

Two ways in, one representation out:

* ``quantize="int8" | "fp8"`` at load: each projection weight W (N, K) is quantized on its own,
  as it is read, symmetric per output channel: ``scale[n] = max_k |W[n, k]| / QMAX`` and
  ``Wq[n, k] = round(W[n, k] / scale[n])`` (int8: round to nearest, QMAX 127; fp8 e4m3: the
  cast's round-to-nearest-even, QMAX 448). The embedding stays in the model dtype, and so does
  lm_head unless ``quantize_lm_head=True`` (as torchao's and gpt-fast's weight-only modes do: with
  8-bit projections, the 8B's bf16 head is 1.05 GB of the 8.0 GB a batch-1 step reads). A tied
  head is the embedding table, which is never quantized.
* A checkpoint whose ``config.json`` carries a compressed-tensors ``quantization_config``
  (what llm-compressor writes, e.g. the Llama 3.1 ``-FP8`` and ``-FP8-dynamic`` models): formats
  ``float-quantized`` (``*.weight`` in float8_e4m3fn) and ``int-quantized`` (int8), weights
  symmetric with ``strategy`` "tensor" or "channel", input activations static per-tensor
  (``*.input_scale`` stored), dynamic per-token, or none; an ``ignore`` list (exact module names
  or ``re:`` regexes, matched with ``re.match`` as compressed-tensors does). Zero points
  (``*.weight_zero_point``, ``*.input_zero_point``), which some checkpoints keep for symmetric
  schemes too, load when they are all zeros (the same math) and are never stored. The 2024 Llama 3.1
  FP8 checkpoints say ``"format": "naive-quantized"`` and ``"quantization_status": "frozen"`` but
  store 8-bit weights all the same: the stored dtypes decide, and a weight that is not 8-bit where
  the config says it is, is an error naming it.

Either way a quantized linear holds ``weight`` (N, K) int8 / float8_e4m3fn and ``weight_scale``
(N,) float32, and its dequantized weight is ``weight.float() * weight_scale[:, None]`` rounded
once to the model dtype. A per-tensor checkpoint scale is broadcast to every channel (the same
numbers), so fused q/k/v or gate/up matrices need no requantization.

What is computed: weight-only (W8A16), whatever the checkpoint's activation scheme; its
``input_scale`` is validated and kept (``QuantizedLinear.input_scale``) but not applied. Batch-1
decode is bound by weight bytes, which 8-bit weights halve either way, and weight-only is the
more accurate of the two. It is also one function at every step size: the server packs decoding
rows into prefill steps, so math that changed with the step's row count (W8A8 where fp8 tensor
cores pay, prefills) would make a request's tokens depend on the requests beside it. The torch
backend dequantizes and multiplies; the Triton backend reads the 8-bit weights in its GEMV
(single-token steps) and in an 8-bit matmul (up to 64 rows; up to 512 on Hopper, where TMA loads
its tiles and a Gluon kernel, ``minillama.hopper_matmul``, runs most prefill chunks); a longer
step multiplies a model-dtype copy of each weight, made in one pass, with cuBLAS. Or, as the
``TritonBackend(matmul_8bit="scaled_mm")`` ablation, it runs fp8 prefill as W8A8 through
``torch._scaled_mm`` with per-token activation scales (``minillama.backend``).

References: compressed-tensors (``quantization/quant_args.py``, ``lifecycle/initialize.py``,
``compressors/naive_quantized``, ``utils/match.py``) for the format; vLLM's
``compressed_tensors.py`` for which schemes are W8A8 / W8A16.
"""
import re
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from minillama.layers import Linear

QUANTIZE_DTYPES = {"int8": torch.int8, "fp8": torch.float8_e4m3fn}
QMAX = {torch.int8: 127.0, torch.float8_e4m3fn: 448.0}
SCALE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # what checkpoints store scales in
# safetensors header dtype names of the tensors a quantized checkpoint may hold
SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16,
                      "F8_E4M3": torch.float8_e4m3fn, "I8": torch.int8}
FORMATS = {"float-quantized": "float", "int-quantized": "int", "naive-quantized": None}
TENSOR_SHAPES = [(1,), ()]  # of a per-tensor scale: (1,) is what compressed-tensors writes; () older files
WEIGHT_DTYPES = {"float": torch.float8_e4m3fn, "int": torch.int8}

SUPPORTED = (
    "minillama reads compressed-tensors checkpoints (quant_method 'compressed-tensors', format "
    "'float-quantized' FP8 e4m3 or 'int-quantized' INT8 weights, symmetric, strategy 'tensor' or "
    "'channel'; input activations static per-tensor, dynamic per-token or none) and quantizes "
    "full-precision checkpoints at load with quantize='int8' or 'fp8'"
)

# Class names of HF Llama's modules, which compressed-tensors targets may name ("Linear": every projection).
LINEAR = "Linear"
ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
FUSED = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))  # each group becomes one matrix


@dataclass(frozen=True)
class QuantScheme:
    """How one linear layer's weight (and, for the record, its input) is quantized."""

    weight_dtype: torch.dtype  # torch.int8 or torch.float8_e4m3fn
    weight_strategy: str = "channel"  # "channel": weight_scale (N, 1); "tensor": one scale
    activations: Optional[str] = None  # None, "static" (per-tensor input_scale) or "dynamic" (per-token)

    def checkpoint_tensors(self, module: str, out_features: int, in_features: int) -> Dict[str, "TensorSpec"]:
        """The tensors a compressed checkpoint holds for ``module`` (an HF module name)."""
        specs = {
            f"{module}.weight": TensorSpec([(out_features, in_features)], (self.weight_dtype,)),
            f"{module}.weight_scale": TensorSpec(self._scale_shapes(out_features), SCALE_DTYPES),
        }
        if self.activations == "static":
            specs[f"{module}.input_scale"] = TensorSpec(TENSOR_SHAPES, SCALE_DTYPES)
        return specs

    def zero_points(self, module: str, out_features: int) -> Dict[str, "TensorSpec"]:
        """The zero points a compressed checkpoint may hold for ``module`` besides: compressed-tensors
        makes them shaped like the scales, in the 8-bit dtype (``zp_dtype``, lifecycle/initialize.py),
        and drops them when it saves a symmetric scheme; checkpoints saved otherwise keep them, all zeros."""
        specs = {f"{module}.weight_zero_point": TensorSpec(self._scale_shapes(out_features), (self.weight_dtype,))}
        if self.activations == "static":
            specs[f"{module}.input_zero_point"] = TensorSpec(TENSOR_SHAPES, (self.weight_dtype,))
        return specs

    def _scale_shapes(self, out_features: int) -> List[tuple]:
        return [(out_features, 1)] if self.weight_strategy == "channel" else TENSOR_SHAPES


@dataclass(frozen=True)
class TensorSpec:
    """Allowed shapes and dtypes of one checkpoint tensor."""

    shapes: List[tuple]
    dtypes: Tuple[torch.dtype, ...]

    def check(self, name: str, shape: tuple, dtype, where: str) -> None:
        """ValueError naming the tensor and file unless shape and dtype (a torch dtype or a
        safetensors header name such as "F8_E4M3") are allowed."""
        if tuple(shape) not in [tuple(s) for s in self.shapes]:
            expected = " or ".join(str(tuple(s)) for s in self.shapes)
            raise ValueError(f"tensor {name} in {where} has shape {tuple(shape)}, expected {expected}")
        if SAFETENSORS_DTYPES.get(dtype, dtype) not in self.dtypes:
            names = {t: n for n, t in SAFETENSORS_DTYPES.items()} if isinstance(dtype, str) else {}
            expected = " or ".join(names.get(d, str(d).removeprefix("torch.")) for d in self.dtypes)
            raise ValueError(
                f"tensor {name} in {where} has dtype {str(dtype).removeprefix('torch.')}, expected {expected}")


@dataclass(frozen=True)
class QuantizationConfig:
    """Which linear modules are quantized and how: config groups (targets -> scheme) and ignores.

    ``compressed`` is True for a checkpoint that stores 8-bit tensors, False for quantization at load.
    """

    groups: Tuple[Tuple[Tuple[str, ...], QuantScheme], ...]
    ignore: Tuple[str, ...] = ()
    compressed: bool = True

    @classmethod
    def at_load(cls, quantize: str, lm_head: bool = False) -> "QuantizationConfig":
        """Weight-only per-channel quantization of every projection; the embedding kept, and lm_head
        unless ``lm_head``."""
        if quantize not in QUANTIZE_DTYPES:
            raise ValueError(f"quantize={quantize!r} is not supported; use one of {sorted(QUANTIZE_DTYPES)} or None")
        return cls(groups=(((LINEAR,), QuantScheme(QUANTIZE_DTYPES[quantize])),),
                   ignore=() if lm_head else ("lm_head",), compressed=False)

    def scheme_for(self, module: str, module_class: str) -> Optional[QuantScheme]:
        """The scheme of an HF module (e.g. "model.layers.0.self_attn.q_proj", class "Linear"), or None.

        Ignored modules are None; otherwise the first group whose targets match. A match on a
        module that is not a Linear is an error (minillama quantizes projections only).
        """
        if any(_matches(module, module_class, t) for t in self.ignore):
            return None
        for targets, scheme in self.groups:
            if any(_matches(module, module_class, t) for t in targets):
                if module_class != LINEAR:
                    raise NotImplementedError(
                        f"quantization_config quantizes {module} ({module_class}); minillama quantizes "
                        f"Linear projections only: add it to 'ignore'")
                return scheme
        return None

    def to_dict(self) -> dict:
        """A compressed-tensors ``quantization_config`` for this config, as llm-compressor writes it."""
        groups = {}
        formats = set()
        for i, (targets, scheme) in enumerate(self.groups):
            kind = "float" if scheme.weight_dtype == torch.float8_e4m3fn else "int"
            fmt = f"{kind}-quantized"
            formats.add(fmt)
            groups[f"group_{i}"] = {
                "format": fmt,
                "targets": list(targets),
                "weights": _args_dict(kind, scheme.weight_strategy, dynamic=False, observer="minmax"),
                "input_activations": None if scheme.activations is None else _args_dict(
                    kind, "tensor" if scheme.activations == "static" else "token",
                    dynamic=scheme.activations == "dynamic",
                    observer="minmax" if scheme.activations == "static" else None),
                "output_activations": None,
            }
        return {
            "config_groups": groups,
            "format": formats.pop() if len(formats) == 1 else "mixed-precision",
            "global_compression_ratio": None,
            "ignore": list(self.ignore),
            "kv_cache_scheme": None,
            "quant_method": "compressed-tensors",
            "quantization_status": "compressed",
            "sparsity_config": {},
            "transform_config": {},
        }


def _args_dict(kind: str, strategy: str, dynamic: bool, observer: Optional[str]) -> dict:
    return {"actorder": None, "block_structure": None, "dynamic": dynamic, "group_size": None, "num_bits": 8,
            "observer": observer, "observer_kwargs": {}, "strategy": strategy, "symmetric": True, "type": kind}


def _matches(module: str, module_class: str, target: str) -> bool:
    """compressed-tensors' rule: "re:<regex>" is re.match on the name, else the exact name or class."""
    if target.startswith("re:"):
        return re.match(target[3:], module) is not None
    return target == module or target == module_class


def parse_quantization_config(d: dict) -> QuantizationConfig:
    """Validate a config.json ``quantization_config`` (before any tensor is read).

    Raises NotImplementedError naming the quant_method, format or field that is not supported, and
    what is; ValueError for a malformed config.
    """
    if not isinstance(d, dict):
        raise ValueError(f"quantization_config must be a JSON object, got {d!r}")
    method = d.get("quant_method")
    if method != "compressed-tensors":
        raise NotImplementedError(f"quantization_config (quant_method {method!r}) is not supported; {SUPPORTED}")
    status = d.get("quantization_status", "compressed")
    if status not in ("compressed", "frozen"):
        raise NotImplementedError(
            f"compressed-tensors quantization_status {status!r} is not supported (the model was not quantized "
            f"yet); 'compressed' and 'frozen' checkpoints load")
    for key in ("sparsity_config", "transform_config", "kv_cache_scheme"):
        if d.get(key):
            raise NotImplementedError(f"compressed-tensors {key} is not supported (got {d[key]!r}); {SUPPORTED}")
    groups_in = d.get("config_groups")
    if not isinstance(groups_in, dict) or not groups_in:
        raise ValueError("compressed-tensors quantization_config has no config_groups")
    groups = []
    for name, group in groups_in.items():
        where = f"config_groups.{name}"
        fmt = group.get("format") or d.get("format")
        if fmt not in FORMATS:
            raise NotImplementedError(f"compressed-tensors format {fmt!r} ({where}) is not supported; {SUPPORTED}")
        targets = group.get("targets")
        if not isinstance(targets, list) or not targets or not all(isinstance(t, str) for t in targets):
            raise ValueError(f"{where}.targets must be a non-empty list of strings, got {targets!r}")
        weights = group.get("weights")
        if not weights:
            raise NotImplementedError(f"{where} quantizes no weights; {SUPPORTED}")
        kind = _check_args(weights, f"{where}.weights", strategies=("tensor", "channel"))
        if weights.get("dynamic"):
            raise NotImplementedError(f"{where}.weights: dynamic weight quantization is not supported; {SUPPORTED}")
        if FORMATS[fmt] not in (None, kind):
            raise ValueError(f"{where}: format {fmt!r} does not store {kind} weights")
        activations = _parse_activations(group.get("input_activations"), kind, f"{where}.input_activations")
        if group.get("output_activations"):
            raise NotImplementedError(f"{where}.output_activations: output quantization is not supported; {SUPPORTED}")
        scheme = QuantScheme(WEIGHT_DTYPES[kind], weights.get("strategy"), activations)
        groups.append((tuple(targets), scheme))
    ignore = d.get("ignore") or []
    if not isinstance(ignore, list) or not all(isinstance(t, str) for t in ignore):
        raise ValueError(f"compressed-tensors ignore must be a list of module names, got {ignore!r}")
    all_targets = list(ignore) + [t for targets, _ in groups for t in targets]
    for pattern in [t[3:] for t in all_targets if t.startswith("re:")]:
        try:
            re.compile(pattern)
        except re.error as e:
            raise ValueError(f"compressed-tensors regex {pattern!r} does not compile: {e}") from None
    return QuantizationConfig(groups=tuple(groups), ignore=tuple(ignore), compressed=True)


def _check_args(args: dict, where: str, strategies: Sequence[str]) -> str:
    """Check one QuantizationArgs dict: 8 bits, symmetric, supported strategy. Returns its type."""
    if not isinstance(args, dict):
        raise ValueError(f"{where} must be a JSON object, got {args!r}")
    kind = args.get("type", "int")
    if kind not in WEIGHT_DTYPES:
        raise NotImplementedError(f"{where}: type {kind!r} is not supported; {SUPPORTED}")
    if args.get("num_bits") != 8:
        raise NotImplementedError(f"{where}: num_bits {args.get('num_bits')!r} is not supported (8 only); {SUPPORTED}")
    if not args.get("symmetric", True):
        raise NotImplementedError(f"{where}: asymmetric quantization (zero points) is not supported; {SUPPORTED}")
    strategy = args.get("strategy")
    if strategy not in strategies:
        raise NotImplementedError(f"{where}: strategy {strategy!r} is not supported; expected one of {list(strategies)}")
    for key in ("group_size", "block_structure", "actorder"):
        if args.get(key) is not None:
            raise NotImplementedError(f"{where}: {key} {args[key]!r} is not supported; {SUPPORTED}")
    scale_dtype = args.get("scale_dtype")
    if scale_dtype is not None and scale_dtype.removeprefix("torch.") not in ("float32", "bfloat16", "float16"):
        raise NotImplementedError(f"{where}: scale_dtype {scale_dtype!r} is not supported (float32, bfloat16, float16)")
    return kind


def _parse_activations(args: Optional[dict], weight_kind: str, where: str) -> Optional[str]:
    """None, "static" (per-tensor, input_scale stored) or "dynamic" (per-token, nothing stored)."""
    if not args:
        return None
    kind = _check_args(args, where, strategies=("tensor", "token"))
    if kind != weight_kind:
        raise NotImplementedError(f"{where}: {kind} activations with {weight_kind} weights are not supported")
    dynamic = args.get("dynamic", False)
    if args["strategy"] == "tensor" and dynamic is False:
        return "static"
    if args["strategy"] == "token" and dynamic is True:
        return "dynamic"
    raise NotImplementedError(
        f"{where}: strategy {args['strategy']!r} with dynamic={dynamic!r} is not supported; "
        f"expected static per-tensor or dynamic per-token")


def quantize_per_channel(weight: torch.Tensor, dtype: torch.dtype, out: Optional[torch.Tensor] = None,
                         block_elements: Optional[int] = None,
                         reduce_amax: Optional[Callable[[torch.Tensor], torch.Tensor]] = None
                         ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel quantization of ``weight`` (N, K).

    Returns (q (N, K) in ``dtype``, scale (N,) float32) with ``q * scale[:, None] ~ weight``:
    int8 rounds to nearest (|error| <= scale / 2); fp8 e4m3 keeps 3 mantissa bits (relative error
    <= 2^-4, absolute <= 2^-10 * scale below e4m3's smallest normal 2^-6). A zero row gets scale 1.

    Works in float32 on blocks of whole rows (about ``block_elements`` each), so its temporaries
    stay one block's size whatever the matrix (the float32 copy of a whole 70B MLP matrix is 0.9 GB).
    Default: 2^20 elements on the CPU (host memory, where freed blocks stay with the process), 2^24
    elsewhere (a 64 MB buffer on a GPU; smaller blocks would only multiply the launches).
    ``out`` (N, K) in ``dtype``, on any device, receives q, and the work runs on its device,
    ``weight`` moving there one block at a time; without it q is a new tensor on ``weight``'s device.
    ``reduce_amax``: takes each block's per-row max |w| (float32) and returns the whole rows' (a
    row-parallel rank holds some columns of each row: its scales must be those one process
    computes, or the ranks' partial products sum to another function).
    """
    if dtype not in QMAX:
        raise ValueError(f"cannot quantize to {dtype}; use torch.int8 or torch.float8_e4m3fn")
    if weight.dim() != 2:
        raise ValueError(f"quantize_per_channel takes a 2-D weight, got shape {tuple(weight.shape)}")
    if out is None:
        out = torch.empty(weight.shape, dtype=dtype, device=weight.device)
    elif out.shape != weight.shape or out.dtype != dtype:
        raise ValueError(f"out is {out.dtype} {tuple(out.shape)}; expected {dtype} {tuple(weight.shape)}")
    N, K = weight.shape
    scale = torch.empty(N, dtype=torch.float32, device=out.device)
    if block_elements is None:
        block_elements = 1 << 20 if out.device.type == "cpu" else 1 << 24
    rows = max(1, min(N, block_elements // max(K, 1)))
    work = torch.empty(rows, K, dtype=torch.float32, device=out.device)  # one buffer for every block
    for r in range(0, N, rows):
        block = weight[r:r + rows].to(out.device)
        amax = torch.maximum(block.amax(dim=1), -block.amin(dim=1)).float()  # exact; no |block| copy
        if reduce_amax is not None:
            amax = reduce_amax(amax)
        w = work[:block.shape[0]].copy_(block)  # exact for bf16 and fp16 weights
        s = scale[r:r + rows]
        torch.where(amax > 0, amax / QMAX[dtype], torch.ones_like(amax), out=s)
        w.div_(s[:, None])
        if dtype == torch.int8:
            w.round_()
        out[r:r + rows].copy_(w.clamp_(-QMAX[dtype], QMAX[dtype]))
    return out, scale


def dequantize(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``q.float() * scale[:, None]`` rounded once to ``dtype``; q (N, K), scale (N,) float32."""
    return (q.float() * scale.float()[:, None]).to(dtype)


def channel_scales(stored: torch.Tensor, out_features: int) -> torch.Tensor:
    """A checkpoint's ``weight_scale`` ((N, 1) per channel, (1,) or () per tensor) as (N,) float32."""
    flat = stored.float().reshape(-1)
    if flat.numel() == 1:
        return flat.expand(out_features).contiguous()
    assert flat.numel() == out_features, (tuple(stored.shape), out_features)
    return flat


def hf_modules(num_layers: int) -> Dict[str, str]:
    """HF Llama module name -> class name, for every module a quantization target could name."""
    modules = {"model.embed_tokens": "Embedding", "model.norm": "LlamaRMSNorm", "lm_head": LINEAR}
    for i in range(num_layers):
        prefix = f"model.layers.{i}"
        modules.update({f"{prefix}.self_attn.{p}": LINEAR for p in ATTENTION_PROJECTIONS})
        modules.update({f"{prefix}.mlp.{p}": LINEAR for p in MLP_PROJECTIONS})
        modules.update({f"{prefix}.{n}": "LlamaRMSNorm" for n in ("input_layernorm", "post_attention_layernorm")})
    return modules


def module_schemes(qconfig: QuantizationConfig, num_layers: int,
                   tie_word_embeddings: bool) -> Dict[str, Optional[QuantScheme]]:
    """HF Linear module name -> its scheme (None: kept in the model dtype), checked as a whole.

    Errors: a module other than a Linear targeted; a tied lm_head targeted (it is the embedding
    table); the parts of one fused matrix (q/k/v, gate/up) quantized to different types.
    """
    schemes = {}
    for name, cls in hf_modules(num_layers).items():
        scheme = qconfig.scheme_for(name, cls)  # raises for a targeted non-Linear
        if cls == LINEAR:
            schemes[name] = scheme
    if tie_word_embeddings:
        if schemes.pop("lm_head") is not None:
            raise NotImplementedError("quantization_config quantizes lm_head, but it is tied to the embedding "
                                      "table (tie_word_embeddings): add 'lm_head' to 'ignore'")
    for i in range(num_layers):
        for parts in FUSED:
            names = [f"model.layers.{i}.{'self_attn' if p in ATTENTION_PROJECTIONS else 'mlp'}.{p}" for p in parts]
            kinds = {None if s is None else (s.weight_dtype, s.activations == "static")
                     for s in (schemes[n] for n in names)}
            if len(kinds) > 1:
                raise NotImplementedError(
                    f"{', '.join(names)} are quantized differently; minillama fuses them into one matrix, "
                    f"so they must all be quantized to the same type (all with static input scales or "
                    f"none) or all be ignored")
    return schemes


class QuantizedLinear(Linear):
    """A :class:`~minillama.layers.Linear` whose weight is 8-bit, swapped in at load time.

    ``weight`` (N, K) int8 or float8_e4m3fn and ``weight_scale`` (N,) float32 (one per output
    channel; each fused part keeps its own rows); ``input_scale`` (one per part, float32) only when
    the checkpoint stores static activation scales. It computes what ``Linear`` does with the
    weight ``weight * weight_scale[:, None]``: the torch backend dequantizes to the activation
    dtype and multiplies; the Triton backend's single-token GEMV streams the 8-bit weight (with
    the same residual add + RMSNorm prologue and SiLU x up epilogue as bf16) and applies the scale
    per output row, and its multi-row matmul converts 8-bit tiles in registers.

    Under tensor parallelism it keeps the replaced layer's share and reduction: column-parallel
    ranks hold their rows and those rows' scales; row-parallel ranks hold their input columns and
    every row's scale (a scale multiplies a whole row, so the partial products still sum right).
    """

    def __init__(self, linear: Linear, weight_dtype: torch.dtype, static_input: bool = False):
        device = linear.weight.device
        with torch.device("meta"):  # Linear's own float weight is replaced below: never allocate it
            super().__init__(linear.in_features, linear.out_features, False, linear.backend, linear.parts)
        self.parallel, self.tp = linear.parallel, linear.tp
        self.swiglu = linear.swiglu
        self.bias = linear.bias
        self.gemv_config = linear.gemv_config
        self.fuse_norm = linear.fuse_norm
        self.norm_next = linear.norm_next
        self.feeds_norm = linear.feeds_norm
        N, K = self.out_features, self.in_features
        self.weight = nn.Parameter(torch.empty(N, K, dtype=weight_dtype, device=device), requires_grad=False)
        self.weight_scale = nn.Parameter(torch.empty(N, dtype=torch.float32, device=device), requires_grad=False)
        self.input_scale = None
        if static_input:
            self.input_scale = nn.Parameter(torch.empty(len(self.parts), dtype=torch.float32, device=device),
                                            requires_grad=False)

    def forward(self, x, rope=None) -> torch.Tensor:
        reduce = self.parallel == "row"
        assert rope is None or self.parallel in (None, "column"), self.parallel
        y = self.backend.linear(x, self.weight, None if reduce else self.bias, swiglu=self.swiglu,
                                gemv_config=self.gemv_config, weight_scale=self.weight_scale,
                                fuse_norm=self.fuse_norm, rope=rope, norm_next=self.norm_next and self.parallel is None,
                                feeds_norm=self.feeds_norm and self.parallel is None)
        return self.combine(y)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, weight={str(self.weight.dtype).removeprefix('torch.')}"


class _Into:
    """A loader target that is not a plain tensor: ``copy_(checkpoint tensor)`` runs ``fill``;
    ``numel``/``element_size`` (for the loader's progress) are those of ``like``."""

    def __init__(self, fill, like: torch.Tensor):
        self.fill, self.like = fill, like

    def copy_(self, src: torch.Tensor) -> None:
        self.fill(src)

    def numel(self) -> int:
        return self.like.numel()

    def element_size(self) -> int:
        return self.like.element_size()


class LoadPlan:
    """What the loader does differently for 8-bit weights, decided from the config before any tensor is read.

    Built on the meta model, whose quantized Linear modules it swaps for :class:`QuantizedLinear`.
    ``specs``: checkpoint tensor -> :class:`TensorSpec` for every tensor of a compressed
    checkpoint's quantized modules (weights, scales); ``zero_points``: the same for the zero points
    it may also hold (checked, never loaded); ``names``: the extra checkpoint tensors
    (scales) -> (our parameter, part), to extend the loader's name table; :meth:`piece`: where
    each of them goes. ``weight_shape(ours, part)``: the checkpoint shape of that weight.
    """

    def __init__(self, qconfig: QuantizationConfig, config, names: Dict[str, Tuple[str, Optional[int]]], model,
                 weight_shape):
        self.specs: Dict[str, TensorSpec] = {}
        self.zero_points: Dict[str, TensorSpec] = {}
        self.names: Dict[str, Tuple[str, Optional[int]]] = {}
        self._kinds: Dict[str, str] = {}  # checkpoint tensor -> weight / weight_scale / input_scale / quantize
        modules: Dict[str, Tuple[torch.dtype, bool]] = {}  # our Linear -> (weight dtype, static input)
        schemes = module_schemes(qconfig, config.num_hidden_layers, config.tie_word_embeddings)
        for hf_module, scheme in schemes.items():
            if scheme is None:
                continue
            ours, part = names[f"{hf_module}.weight"]
            module = ours.removesuffix(".weight")
            modules[module] = (scheme.weight_dtype, scheme.activations == "static")  # fused parts agree
            if not qconfig.compressed:
                self._kinds[f"{hf_module}.weight"] = "quantize"
                continue
            out_features, in_features = weight_shape(ours, part)
            self.zero_points.update(scheme.zero_points(hf_module, out_features))
            for name, spec in scheme.checkpoint_tensors(hf_module, out_features, in_features).items():
                kind = name.rsplit(".", 1)[1]
                self.specs[name] = spec
                self._kinds[name] = kind
                if kind != "weight":
                    self.names[name] = (f"{module}.{kind}", part)
        for module, (dtype, static) in modules.items():
            parent, _, attr = module.rpartition(".")
            holder = model.get_submodule(parent) if parent else model
            setattr(holder, attr, QuantizedLinear(getattr(holder, attr), dtype, static))

    def handles(self, name: str) -> bool:
        return name in self._kinds

    def piece(self, model, name: str, names: Dict[str, Tuple[str, Optional[int]]], piece):
        """The loader's piece (a ``weights.Slice``) for checkpoint tensor ``name``, given the one of
        its module's weight (this rank's slice of that part): 8-bit weights are copied as they are;
        a full-precision weight is quantized as it is copied (a row-parallel rank quantizes its own
        columns with the whole rows' scales, their max |w| taken over the ranks); scales are read
        whole and this rank's rows taken."""
        kind = self._kinds[name]
        if kind == "weight":
            return piece
        ours, part = names[name]
        linear = model.get_submodule(ours.rpartition(".")[0])
        index = part or 0
        rows = slice(sum(linear.parts[:index]), sum(linear.parts[:index + 1]))  # this rank's rows of the part
        if kind == "quantize":
            def quantize(src):
                _, scale = quantize_per_channel(src, linear.weight.dtype, out=piece.target,
                                                reduce_amax=whole_row_amax(linear))
                linear.weight_scale[rows].copy_(scale)
            return piece._replace(target=_Into(quantize, piece.target))
        if kind == "input_scale":
            return piece._replace(target=_Into(lambda src: linear.input_scale[index].copy_(src.reshape(())),
                                               linear.input_scale[index]), dim=None)
        n = rows.stop - rows.start
        split = linear.parallel in ("column", "vocab")
        ranks, rank = (linear.tp.world_size, linear.tp.rank) if split else (1, 0)
        return piece._replace(target=_Into(
            lambda src: linear.weight_scale[rows].copy_(channel_scales(src, n * ranks)[rank * n:(rank + 1) * n]),
            linear.weight_scale[rows]), dim=None)


def check_quantize_lm_head(config, quantize: Optional[str], quantize_lm_head: bool) -> None:
    """``quantize_lm_head=True`` needs ``quantize=``, a full-precision checkpoint and an lm_head of its
    own (not the embedding's)."""
    if not quantize_lm_head:
        return
    if config.quantization is not None:
        raise ValueError("quantize_lm_head=True, but the checkpoint is already quantized: its quantization_config's "
                         "'ignore' list says whether lm_head is 8-bit; drop quantize_lm_head (scripts/quantize.py "
                         "--lm-head writes a checkpoint with an 8-bit lm_head)")
    if quantize is None:
        raise ValueError("quantize_lm_head=True quantizes lm_head along with the projections: pass quantize='int8' "
                         "or 'fp8' too")
    if config.tie_word_embeddings:
        raise ValueError("quantize_lm_head=True, but this model's lm_head is its embedding table "
                         "(tie_word_embeddings), which stays in the model dtype; drop quantize_lm_head")


def load_plan(config, quantize: Optional[str], names, model, weight_shape,
              quantize_lm_head: bool = False) -> Optional[LoadPlan]:
    """The plan for a checkpoint's own quantization_config or for ``quantize=`` (None: neither)."""
    checkpoint = config.quantization
    if quantize is not None and checkpoint is not None:
        raise ValueError(f"quantize={quantize!r}, but the checkpoint is already quantized (its config.json has a "
                         f"compressed-tensors quantization_config); load it with quantize=None")
    check_quantize_lm_head(config, quantize, quantize_lm_head)
    qconfig = checkpoint if checkpoint is not None else (
        QuantizationConfig.at_load(quantize, quantize_lm_head) if quantize is not None else None)
    return None if qconfig is None else LoadPlan(qconfig, config, names, model, weight_shape)


def whole_row_amax(linear) -> Optional[Callable[[torch.Tensor], torch.Tensor]]:
    """``reduce_amax`` for quantizing ``linear``'s weight: a row-parallel rank holds some columns of
    each row, so its rows' max |w| is taken over the ranks (the scales one process computes)."""
    return linear.tp.all_reduce_max_ if linear.parallel == "row" else None


def quantize_model(model, quantize: str, lm_head: bool = False) -> None:
    """Quantize a built model's projections in place, one matrix at a time, as loading with
    ``quantize=`` (and ``quantize_lm_head=lm_head``) does: for benchmarks on random weights and for
    models made in memory. Checkpoints should load with ``Llama.from_pretrained(quantize=...)``."""
    if quantize not in QUANTIZE_DTYPES:
        raise ValueError(f"quantize must be one of {sorted(QUANTIZE_DTYPES)}, got {quantize!r}")
    check_quantize_lm_head(model.config, quantize, lm_head)
    dtype = QUANTIZE_DTYPES[quantize]
    matrices = [(holder, attr) for layer in model.layers
                for holder, attr in ((layer.attention, "wqkv"), (layer.attention, "wo"),
                                     (layer.feed_forward, "w13"), (layer.feed_forward, "w2"))]
    if lm_head:
        matrices.append((model, "output"))
    for holder, attr in matrices:
        linear = getattr(holder, attr)
        quantized = QuantizedLinear(linear, dtype)
        with torch.no_grad():
            _, scale = quantize_per_channel(linear.weight, dtype, out=quantized.weight,
                                            reduce_amax=whole_row_amax(linear))
            quantized.weight_scale.copy_(scale)
        setattr(holder, attr, quantized)
