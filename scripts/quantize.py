"""Write a compressed-tensors checkpoint with 8-bit projection weights, so a model is quantized once.

    python scripts/quantize.py meta-llama/Llama-3.1-8B-Instruct Llama-3.1-8B-Instruct-FP8 --kind fp8
    python scripts/quantize.py ./my-llama ./my-llama-int8 --kind int8 --device cuda
    python scripts/quantize.py ./my-llama ./my-llama-fp8-head --kind fp8 --lm-head   # lm_head in fp8 too

The output is what llm-compressor writes for its FP8_DYNAMIC (``--kind fp8``) and W8A8 INT8
(``--kind int8``) presets with a min-max observer: every q/k/v/o/gate/up/down projection
stored as ``<module>.weight`` (float8_e4m3fn or int8, symmetric, one scale per output channel)
plus ``<module>.weight_scale`` (N, 1) float32; embedding, norms and lm_head unchanged (``ignore:
["lm_head"]``), or with ``--lm-head`` lm_head quantized the same way (``ignore: []``; not for a
model whose lm_head is its embedding table); ``config.json`` gains the ``quantization_config``.
Input activations are declared dynamic per-token (``--activations none`` declares weight-only);
minillama computes weight-only either way, vLLM runs W8A8 on the dynamic ones. Load it with
``Llama.from_pretrained(out)``.

Tensors stream one at a time from the memory-mapped source shards (on ``--device``, then back to
the host); one output shard is held at a time, written with the source's shard layout.
"""
import argparse
import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a clone without installing

import torch  # noqa: E402
from safetensors import safe_open  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from minillama import cli  # noqa: E402
from minillama.api import _resolve_device  # noqa: E402
from minillama.config import LlamaConfig, read_json  # noqa: E402
from minillama.hub import resolve_checkpoint  # noqa: E402
from minillama.quantization import QUANTIZE_DTYPES, QuantizationConfig, QuantScheme, module_schemes  # noqa: E402
from minillama.quantization import quantize_per_channel  # noqa: E402


def parse_args(argv):
    p = cli.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", help="full-precision checkpoint: local folder or hub repo id")
    p.add_argument("output", help="folder to create (must not exist)")
    p.add_argument("--kind", required=True, choices=sorted(QUANTIZE_DTYPES), help="8-bit weight format")
    p.add_argument("--activations", default="dynamic", choices=["dynamic", "none"],
                   help="input activation scheme declared in the config (default: dynamic per-token)")
    p.add_argument("--device", default="cpu", help="where to quantize (cuda is much faster for large models)")
    p.add_argument("--lm-head", action="store_true", help="quantize lm_head too (an untied one)")
    return p.parse_args(argv)


def quantize_checkpoint(source, output, kind: str, activations: str = "dynamic", device="cpu",
                        progress=None, lm_head: bool = False) -> dict:
    """Write the compressed-tensors checkpoint; returns its quantization_config.

    progress: optional callable(tensor_name) called after each quantized tensor.
    """
    source, output = Path(source), Path(output)
    device = _resolve_device(device)  # a device that cannot run fails before the output folder exists
    raw = read_json(source / "config.json")
    if "quantization_config" in raw:
        method = raw["quantization_config"]
        method = method.get("quant_method") if isinstance(method, dict) else method
        raise ValueError(f"{source} is already quantized ({method}); start from a full-precision checkpoint")
    if output.exists():
        raise ValueError(f"{output} exists; choose a new folder")
    config = LlamaConfig.from_dict(raw)
    if lm_head and config.tie_word_embeddings:
        raise ValueError(f"{source}'s lm_head is its embedding table (tie_word_embeddings), which stays in the "
                         f"model dtype; drop --lm-head")
    scheme = QuantScheme(QUANTIZE_DTYPES[kind], "channel", None if activations == "none" else activations)
    qconfig = QuantizationConfig(groups=((("Linear",), scheme),), ignore=() if lm_head else ("lm_head",))
    schemes = module_schemes(qconfig, config.num_hidden_layers, config.tie_word_embeddings)
    quantized = {f"{m}.weight" for m, s in schemes.items() if s is not None}

    index_path = source / "model.safetensors.index.json"
    shards = sorted(set(read_json(index_path)["weight_map"].values())) if index_path.exists() else ["model.safetensors"]
    output.mkdir(parents=True)
    try:
        return _write(source, output, raw, qconfig, scheme, quantized, shards, index_path, device, progress)
    except BaseException:  # a failure (or Ctrl-C) midway leaves no half-written checkpoint behind
        shutil.rmtree(output, ignore_errors=True)
        raise


def _write(source, output, raw, qconfig, scheme, quantized, shards, index_path, device, progress) -> dict:
    weight_map = {}
    for shard in shards:
        tensors = {}
        with safe_open(source / shard, framework="pt", device="cpu") as f:
            for name in f.keys():
                t = f.get_tensor(name)
                if name in quantized:
                    q, scale = quantize_per_channel(t.to(device), scheme.weight_dtype)
                    module = name.removesuffix(".weight")
                    tensors[name] = q.cpu()
                    tensors[f"{module}.weight_scale"] = scale[:, None].cpu()  # (N, 1) as compressed-tensors
                    if progress is not None:
                        progress(name)
                else:
                    tensors[name] = t
        save_file(tensors, str(output / shard), metadata={"format": "pt"})
        weight_map.update({name: shard for name in tensors})
        del tensors
    missing = quantized - set(weight_map)
    if missing:
        raise ValueError(f"{source} lacks projection weights {sorted(missing)[:3]}")
    if index_path.exists():
        index = read_json(index_path)
        index["weight_map"] = weight_map
        (output / index_path.name).write_text(json.dumps(index, indent=2) + "\n")
    for path in source.iterdir():
        if path.is_file() and path.suffix != ".safetensors" and path.name not in ("config.json", index_path.name):
            shutil.copyfile(path, output / path.name)
    raw["quantization_config"] = qconfig.to_dict()
    (output / "config.json").write_text(json.dumps(raw, indent=2) + "\n")
    return raw["quantization_config"]


def main(argv=None) -> int:
    """Exit status: 0, or 2 after a one-line error (a bad source, device or output), 130 on Ctrl-C."""
    return cli.run(_main, argv)


def _main(argv) -> int:
    args = parse_args(argv)
    source = resolve_checkpoint(args.source)
    count = [0]

    def progress(name):
        count[0] += 1
        print(f"\rquantized {count[0]} tensors ({name})", end="", file=sys.stderr, flush=True)

    quantize_checkpoint(source, args.output, args.kind, args.activations, args.device, progress, args.lm_head)
    what = "weights (the projections and lm_head)" if args.lm_head else "projection weights"
    print(f"\nwrote {args.output}: {count[0]} {what} in {args.kind}, per-channel scales", file=sys.stderr)
    return 0


if __name__ == "__main__":
    cli.exit_with(main())
