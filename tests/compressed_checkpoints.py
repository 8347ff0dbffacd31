"""Compressed-tensors checkpoints (what llm-compressor writes) made from a tiny full-precision one.

``write_compressed_checkpoint(src, dst, ...)`` copies the HF checkpoint folder ``src`` (from
``tests.checkpoints.write_checkpoint``) to ``dst`` with its projections quantized the way the
compressed-tensors library does it, independently of minillama:

* ``<module>.weight``: float8_e4m3fn ("float-quantized") or int8 ("int-quantized");
* ``<module>.weight_scale``: in the checkpoint's dtype (compressed-tensors takes the observed
  weight's dtype), shape (N, 1) for strategy "channel", (1,) for "tensor";
  ``scale = max|w| / (bit_range / 2)``: 448 for e4m3, 127.5 for int8 (its range is -128..127);
  values are quantized with the scale already rounded to that dtype, as the library does;
* ``<module>.input_scale``: (1,) in the checkpoint's dtype, only for static per-tensor activations;
* no zero points (symmetric), unless ``zero_points``: then ``<module>.weight_zero_point`` (and
  ``<module>.input_zero_point`` with static activations), all zeros, shaped like the scale and in
  the 8-bit dtype, as the library creates them (``lifecycle/initialize.py``, ``zp_dtype``) and
  some checkpoints keep them for symmetric schemes;
* nothing for ignored modules (``lm_head`` by default; with ``ignore=[]`` an untied lm_head is
  quantized too).

``config.json`` gains the ``quantization_config`` written by compressed-tensors 0.1x. Nothing here
imports minillama. ``dequantized_state_dict(dst)`` gives the float64 weights the checkpoint encodes.
"""
import json
import re
import shutil
from pathlib import Path
from typing import Dict, Optional, Sequence

import torch
from safetensors import safe_open
from safetensors.torch import save_file

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _args(kind: str, strategy: str, dynamic: bool, observer: Optional[str]) -> dict:
    return {"actorder": None, "block_structure": None, "dynamic": dynamic, "group_size": None, "num_bits": 8,
            "observer": observer, "observer_kwargs": {}, "strategy": strategy, "symmetric": True, "type": kind}


def quantization_config(kind: str = "float", weight_strategy: str = "channel", activations: Optional[str] = "dynamic",
                        ignore: Sequence[str] = ("lm_head",), targets: Sequence[str] = ("Linear",)) -> dict:
    """The ``quantization_config`` of config.json. activations: "dynamic" (per token), "static"
    (per tensor, input_scale stored) or None. kind "float" (FP8 e4m3) or "int" (INT8)."""
    input_activations = None
    if activations == "dynamic":
        input_activations = _args(kind, "token", True, None)
    elif activations == "static":
        input_activations = _args(kind, "tensor", False, "minmax")
    fmt = f"{kind}-quantized"
    return {
        "config_groups": {"group_0": {
            "format": fmt,
            "input_activations": input_activations,
            "output_activations": None,
            "targets": list(targets),
            "weights": _args(kind, weight_strategy, False, "minmax"),
        }},
        "format": fmt,
        "global_compression_ratio": None,
        "ignore": list(ignore),
        "kv_cache_scheme": None,
        "quant_method": "compressed-tensors",
        "quantization_status": "compressed",
        "sparsity_config": {},
        "transform_config": {},
        "version": "0.12.2",
    }


def _ignored(module: str, ignore: Sequence[str]) -> bool:
    return any(re.match(t[3:], module) if t.startswith("re:") else t == module for t in ignore)


def quantize_like_compressed_tensors(w: torch.Tensor, kind: str, strategy: str):
    """(q, scale) as compressed-tensors' minmax observer + quantize: the scale in w's dtype."""
    w32 = w.float()
    amax = w32.abs().amax(dim=1, keepdim=True) if strategy == "channel" else w32.abs().amax().reshape(1)
    half_range = 448.0 if kind == "float" else 127.5
    scale = (amax / half_range).to(w.dtype)  # the library keeps scales in the observed dtype
    x = w32 / scale.float().reshape(-1, 1) if strategy == "channel" else w32 / scale.float()
    if kind == "float":
        q = x.clamp(-448.0, 448.0).to(torch.float8_e4m3fn)
    else:
        q = x.round().clamp(-128, 127).to(torch.int8)
    return q, scale


def write_compressed_checkpoint(src, dst, kind: str = "float", weight_strategy: str = "channel",
                                activations: Optional[str] = "dynamic", ignore: Sequence[str] = ("lm_head",),
                                input_scale: float = 0.05, zero_points: bool = False) -> Dict[str, torch.Tensor]:
    """Write dst = src with its (non-ignored) projections quantized; returns the written tensors."""
    src, dst = Path(src), Path(dst)
    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    config["quantization_config"] = quantization_config(kind, weight_strategy, activations, ignore)
    (dst / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    files = sorted(dst.glob("*.safetensors"))
    index = dst / "model.safetensors.index.json"
    weight_map = json.loads(index.read_text())["weight_map"] if index.exists() else None
    written = {}
    for path in files:
        with safe_open(path, framework="pt") as f:
            tensors = {name: f.get_tensor(name) for name in f.keys()}
        out = {}
        for name, t in tensors.items():
            module = name.removesuffix(".weight")
            quantizable = module.endswith(PROJECTIONS) or module == "lm_head"  # what targets "Linear" match
            if name.endswith(".weight") and quantizable and not _ignored(module, ignore):
                q, scale = quantize_like_compressed_tensors(t, kind, weight_strategy)
                out[name], out[f"{module}.weight_scale"] = q, scale
                if activations == "static":
                    out[f"{module}.input_scale"] = torch.tensor([input_scale], dtype=t.dtype)
                if zero_points:
                    out[f"{module}.weight_zero_point"] = torch.zeros(scale.shape, dtype=q.dtype)
                    if activations == "static":
                        out[f"{module}.input_zero_point"] = torch.zeros(1, dtype=q.dtype)
                if weight_map is not None:
                    weight_map.update({n: path.name for n in out if n.startswith(f"{module}.")})
            else:
                out[name] = t
        save_file(out, str(path), metadata={"format": "pt"})
        written.update(out)
    if weight_map is not None:
        index.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=2))
    return written


def dequantized_state_dict(folder) -> Dict[str, torch.Tensor]:
    """The float64 weights a compressed checkpoint encodes: ``q * scale`` for quantized ones."""
    tensors = {}
    for path in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(path, framework="pt") as f:
            tensors.update({name: f.get_tensor(name) for name in f.keys()})
    out = {}
    for name, t in tensors.items():
        if name.endswith((".weight_scale", ".input_scale", "_zero_point")):
            continue
        scale = tensors.get(name.removesuffix(".weight") + ".weight_scale")
        if scale is None:
            out[name] = t.double()
        else:
            s = scale.double().reshape(-1, 1) if scale.numel() > 1 else scale.double().reshape(())
            out[name] = t.double() * s
    return out
