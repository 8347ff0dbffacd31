"""Peak host memory while loading a large synthetic checkpoint.

Writes a sharded bf16 LLaMA checkpoint of about --gb gigabytes (random weights, Llama-3.1-8B layer
shapes scaled down in depth), then loads it in a fresh process with Llama.from_pretrained and
reports the process's peak resident memory (VmHWM) against the size of the model and of the
largest shard. Loading streams one tensor at a time from memory-mapped shards, so on a GPU the
peak host memory stays near one shard; on the CPU the model itself lives in host memory, so the
peak is the model plus about one shard, never two copies of the model.

    python scripts/bench_load.py --gb 2 --shards 4 --device cpu
    python scripts/bench_load.py --gb 16 --shards 4 --device cuda     # Llama-3.1-8B size
    python scripts/bench_load.py --gb 2 --quantize int8               # quantized while loading
"""
import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))


def write_synthetic_checkpoint(folder: Path, gb: float, shards: int, hidden: int = 4096) -> dict:
    """A checkpoint of ~gb GB: 8B-shaped layers (or narrower with --hidden), as many as fit."""
    inter, vocab = int(hidden * 3.5), 128256 // (4096 // hidden)
    heads, kv_heads, head_dim = hidden // 128, max(1, hidden // 512), 128
    layer_bytes = 2 * (2 * hidden * hidden + 2 * hidden * kv_heads * head_dim + 3 * hidden * inter + 2 * hidden)
    embed_bytes = 2 * 2 * vocab * hidden
    n_layers = max(1, int((gb * 1e9 - embed_bytes) // layer_bytes))
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
        "intermediate_size": inter, "num_hidden_layers": n_layers, "num_attention_heads": heads,
        "num_key_value_heads": kv_heads, "head_dim": head_dim, "vocab_size": vocab, "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0, "rope_scaling": None, "max_position_embeddings": 8192,
        "tie_word_embeddings": False, "attention_bias": False, "mlp_bias": False, "hidden_act": "silu",
        "torch_dtype": "bfloat16", "bos_token_id": 1, "eos_token_id": 2,
    }
    shapes = {"model.embed_tokens.weight": (vocab, hidden)}
    for i in range(n_layers):
        p = f"model.layers.{i}."
        shapes.update({
            p + "self_attn.q_proj.weight": (heads * head_dim, hidden),
            p + "self_attn.k_proj.weight": (kv_heads * head_dim, hidden),
            p + "self_attn.v_proj.weight": (kv_heads * head_dim, hidden),
            p + "self_attn.o_proj.weight": (hidden, heads * head_dim),
            p + "mlp.gate_proj.weight": (inter, hidden),
            p + "mlp.up_proj.weight": (inter, hidden),
            p + "mlp.down_proj.weight": (hidden, inter),
            p + "input_layernorm.weight": (hidden,),
            p + "post_attention_layernorm.weight": (hidden,),
        })
    shapes["model.norm.weight"] = (hidden,)
    shapes["lm_head.weight"] = (vocab, hidden)
    total = sum(2 * torch.Size(s).numel() for s in shapes.values())
    per_shard = total / shards
    weight_map, part, part_bytes, k = {}, {}, 0, 1
    gen = torch.Generator().manual_seed(0)

    def flush():
        nonlocal part, part_bytes, k
        name = f"model-{k:05d}-of-{shards:05d}.safetensors"
        save_file(part, str(folder / name), metadata={"format": "pt"})
        weight_map.update({t: name for t in part})
        part, part_bytes, k = {}, 0, k + 1

    for name, shape in shapes.items():
        part[name] = (torch.rand(shape, generator=gen) * 0.02 - 0.01).to(torch.bfloat16)
        part_bytes += 2 * torch.Size(shape).numel()
        if part_bytes >= per_shard and k < shards:
            flush()
    if part:
        flush()
    # shard count may come out lower than asked when tensors are large; rename to the real count
    real = k - 1
    if real != shards:
        renamed = {}
        for old in sorted(set(weight_map.values())):
            idx = int(old.split("-")[1])
            new = f"model-{idx:05d}-of-{real:05d}.safetensors"
            (folder / old).rename(folder / new)
            renamed[old] = new
        weight_map = {t: renamed[f] for t, f in weight_map.items()}
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "tokenizer_config.json").write_text(json.dumps({"add_bos_token": True}))
    _write_tokenizer(folder)
    return config


def _write_tokenizer(folder: Path) -> None:
    from tokenizers import Tokenizer, models

    tok = Tokenizer(models.WordLevel({"<unk>": 0, "<s>": 1, "</s>": 2}, unk_token="<unk>"))
    tok.save(str(folder / "tokenizer.json"))


CHILD = """
import json, sys, torch
sys.path.insert(0, {root!r})
def hwm():
    for line in open('/proc/self/status'):
        if line.startswith('VmHWM'):
            return int(line.split()[1]) * 1024
before = hwm()
from minillama import Llama
from minillama.config import LlamaConfig
from minillama.model import Transformer
# one-time costs (imports, the meta device's first use) happen before measuring
tiny = LlamaConfig(hidden_size=8, intermediate_size=8, num_hidden_layers=1, num_attention_heads=1,
                   num_key_value_heads=1, vocab_size=8)
with torch.device("meta"):
    Transformer(tiny)
base = hwm()
llm = Llama.from_pretrained({folder!r}, device={device!r}, dtype=torch.bfloat16, quantize={quantize!r})
loaded = sum(t.numel() * t.element_size() for t in llm.model.state_dict().values())
print(json.dumps({{"peak_before_load": base, "peak_after_load": hwm(), "loaded_model_bytes": loaded}}))
"""


def measure(folder: Path, device: str, quantize=None) -> dict:
    code = CHILD.format(root=str(HERE.parent), folder=str(folder), device=device, quantize=quantize)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    files = sorted(folder.glob("*.safetensors"))
    result["model_bytes"] = sum(f.stat().st_size for f in files)
    result["largest_shard_bytes"] = max(f.stat().st_size for f in files)
    result["load_peak_increase"] = result["peak_after_load"] - result["peak_before_load"]
    return result


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gb", type=float, default=2.0, help="checkpoint size in GB (16 for Llama-3.1-8B)")
    ap.add_argument("--shards", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=4096, help="hidden size (smaller for quick runs)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dir", default=None, help="where to write the checkpoint (default: a temp folder)")
    ap.add_argument("--quantize", default=None, choices=("int8", "fp8"), help="load with 8-bit projections")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        folder = Path(tmp)
        config = write_synthetic_checkpoint(folder, args.gb, args.shards, args.hidden)
        result = measure(folder, args.device, args.quantize)
    result.update(device=args.device, layers=config["num_hidden_layers"], hidden=config["hidden_size"],
                  quantize=args.quantize)
    gib = 2**30
    print(f"model {result['model_bytes'] / gib:.2f} GiB in shards of at most "
          f"{result['largest_shard_bytes'] / gib:.2f} GiB; loading to {args.device} raised peak host memory "
          f"by {result['load_peak_increase'] / gib:.2f} GiB", file=sys.stderr)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
