"""Loading and saving Hugging Face LLaMA safetensors checkpoints.

The model is built on the meta device and each tensor goes straight from its memory-mapped shard
to the target device and dtype, one tensor at a time, one shard open at a time: host memory never
holds a second copy of the model (measured: loading to the CPU adds the model plus one shard;
scripts/bench_load.py, tests/test_load_memory.py). Loading is strict: every tensor the model needs
must be there with the right shape, and nothing else may be. All files and headers are read and
checked before any tensor is.
"""
import json
from pathlib import Path
from typing import Dict, List, Tuple

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from minillama.config import LlamaConfig, read_json
from minillama.files import checkpoint_file, shard_names
from minillama.model import Transformer, rope_inv_freq

# safetensors dtypes a checkpoint without quantization may store (each is cast to the model dtype)
FLOAT_DTYPES = ("F32", "F16", "BF16", "F64")

# The one table from checkpoint names (HF) to ours; "{i}" is the layer index.
LAYER_NAMES = {
    "model.layers.{i}.input_layernorm.weight": "layers.{i}.attention_norm.weight",
    "model.layers.{i}.self_attn.q_proj.weight": "layers.{i}.attention.wq.weight",
    "model.layers.{i}.self_attn.k_proj.weight": "layers.{i}.attention.wk.weight",
    "model.layers.{i}.self_attn.v_proj.weight": "layers.{i}.attention.wv.weight",
    "model.layers.{i}.self_attn.o_proj.weight": "layers.{i}.attention.wo.weight",
    "model.layers.{i}.post_attention_layernorm.weight": "layers.{i}.ffn_norm.weight",
    "model.layers.{i}.mlp.gate_proj.weight": "layers.{i}.feed_forward.w1.weight",
    "model.layers.{i}.mlp.up_proj.weight": "layers.{i}.feed_forward.w3.weight",
    "model.layers.{i}.mlp.down_proj.weight": "layers.{i}.feed_forward.w2.weight",
}
ATTENTION_BIAS_NAMES = {
    f"model.layers.{{i}}.self_attn.{p}_proj.bias": f"layers.{{i}}.attention.w{p}.bias" for p in "qkvo"
}
MLP_BIAS_NAMES = {
    "model.layers.{i}.mlp.gate_proj.bias": "layers.{i}.feed_forward.w1.bias",
    "model.layers.{i}.mlp.up_proj.bias": "layers.{i}.feed_forward.w3.bias",
    "model.layers.{i}.mlp.down_proj.bias": "layers.{i}.feed_forward.w2.bias",
}
TOP_NAMES = {
    "model.embed_tokens.weight": "tok_embeddings.weight",
    "model.norm.weight": "norm.weight",
    "lm_head.weight": "output.weight",
}


def checkpoint_names(config: LlamaConfig) -> Dict[str, str]:
    """Checkpoint tensor name -> model parameter name, for exactly the tensors a checkpoint must hold."""
    per_layer = dict(LAYER_NAMES)
    if config.attention_bias:
        per_layer.update(ATTENTION_BIAS_NAMES)
    if config.mlp_bias:
        per_layer.update(MLP_BIAS_NAMES)
    names = dict(TOP_NAMES)
    if config.tie_word_embeddings:
        del names["lm_head.weight"]
    for i in range(config.num_hidden_layers):
        names.update({hf.format(i=i): ours.format(i=i) for hf, ours in per_layer.items()})
    return names


def safetensors_files(folder: Path) -> List[Path]:
    """The checkpoint's safetensors files: model.safetensors, or the shards its index names."""
    index = checkpoint_file(folder, "model.safetensors.index.json")
    if index is not None:
        files = [folder / name for name in shard_names(read_json(index), index)]  # plain names in the folder
        missing = [f.name for f in files if checkpoint_file(folder, f.name) is None]
        if missing:
            raise FileNotFoundError(
                f"{index.name} names shard(s) {missing} that are not in {folder}; download the complete checkpoint"
            )
        return files
    single = checkpoint_file(folder, "model.safetensors")
    if single is not None:
        return [single]
    others = sorted(p.name for p in folder.glob("*.safetensors"))
    hint = f" (found {others} but no model.safetensors.index.json naming them)" if others else ""
    if list(folder.glob("*.bin")) or list(folder.glob("*.pth")):
        hint += "; only PyTorch .bin/.pth weights were found: convert them to safetensors"
    raise FileNotFoundError(f"no model.safetensors or model.safetensors.index.json in {folder}{hint}")


def read_headers(files: List[Path], dtypes: Tuple[str, ...] = FLOAT_DTYPES) -> Dict[str, Tuple[Path, tuple]]:
    """tensor name -> (file, shape), reading only the headers. Corrupt or truncated files fail here,
    and so does a tensor whose safetensors dtype is not one of ``dtypes`` (no silent cast)."""
    found: Dict[str, Tuple[Path, tuple]] = {}
    for path in files:
        try:
            with safe_open(path, framework="pt") as f:
                for name in f.keys():
                    if name in found:
                        raise ValueError(f"tensor {name} appears in both {found[name][0].name} and {path.name}")
                    tensor = f.get_slice(name)
                    if tensor.get_dtype() not in dtypes:
                        raise ValueError(
                            f"tensor {name} in {path.name} has dtype {tensor.get_dtype()}; this checkpoint's weights "
                            f"must be one of {', '.join(dtypes)}"
                        )
                    found[name] = (path, tuple(tensor.get_shape()))
        except (SafetensorError, OSError) as e:
            raise ValueError(f"{path} is not a readable safetensors file (truncated or corrupt?): {e}") from None
    return found


def copy_tensors_from_file(path: Path, targets: Dict[str, torch.Tensor]) -> None:
    """Copy each named tensor of one file into its target (any device and dtype)."""
    with safe_open(path, framework="pt", device="cpu") as f:
        for name, target in targets.items():
            target.copy_(f.get_tensor(name))


def load_model(folder, config: LlamaConfig, device: torch.device, dtype: torch.dtype) -> Transformer:
    """Build the model on the meta device and fill it from the folder's safetensors, strictly."""
    folder = Path(folder)
    files = safetensors_files(folder)
    found = read_headers(files)
    check_layer_count(config, found)  # before the name table: a config of 10**9 layers must fail, not hang
    names = checkpoint_names(config)
    with torch.device("meta"):
        model = Transformer(config).to(dtype)
    shapes = {name: tuple(p.shape) for name, p in model.named_parameters(remove_duplicate=False)}

    missing = [n for n in names if n not in found]
    if missing:
        raise ValueError(
            f"checkpoint in {folder} lacks {len(missing)} tensor(s) the config requires, e.g. {missing[:3]}"
        )
    extra = [n for n in found if n not in names]
    tied_head = config.tie_word_embeddings and "lm_head.weight" in found
    if tied_head:
        extra.remove("lm_head.weight")  # some tied checkpoints also store the (equal) head: checked below
    extra = [n for n in extra if not n.endswith("rotary_emb.inv_freq")]  # old HF saves; recomputed here
    if extra:
        path = found[extra[0]][0].name
        raise ValueError(f"unexpected tensor(s) {extra[:3]} in {path}: they do not belong to this config's model")
    for hf_name, ours in names.items():
        path, shape = found[hf_name]
        expected = shapes[ours]
        if shape != expected:
            raise ValueError(f"tensor {hf_name} in {path.name} has shape {shape}, the config expects {expected}")

    model.to_empty(device=device)
    if config.tie_word_embeddings:
        model.output.weight = model.tok_embeddings.weight
    model.inv_freq = rope_inv_freq(config).to(device)
    params = dict(model.named_parameters(remove_duplicate=False))  # to_empty made new parameters
    by_file: Dict[Path, List[str]] = {}
    for hf_name in names:
        by_file.setdefault(found[hf_name][0], []).append(hf_name)
    with torch.no_grad():
        for path, tensor_names in by_file.items():
            copy_tensors_from_file(path, {hf_name: params[names[hf_name]] for hf_name in tensor_names})
        if tied_head:
            head = torch.empty_like(model.tok_embeddings.weight)
            copy_tensors_from_file(found["lm_head.weight"][0], {"lm_head.weight": head})
            if not torch.equal(head, model.tok_embeddings.weight):
                raise ValueError(
                    "config says tie_word_embeddings=true but lm_head.weight differs from model.embed_tokens.weight; "
                    "set tie_word_embeddings to false"
                )
    return model.eval()


def save_checkpoint(model: Transformer, config: LlamaConfig, folder, dtype: torch.dtype = None) -> None:
    """Write config.json and model.safetensors with Hugging Face names (the loader's table reversed)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = dict(model.named_parameters(remove_duplicate=False))
    tensors = {}
    for hf_name, ours in checkpoint_names(config).items():
        t = state[ours].detach()
        tensors[hf_name] = (t.to(dtype) if dtype is not None else t).contiguous().cpu()
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    cfg = config.to_dict()
    if dtype is not None:
        cfg["torch_dtype"] = str(dtype).removeprefix("torch.")
    (folder / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")


def check_layer_count(config: LlamaConfig, found: Dict[str, Tuple[Path, tuple]]) -> None:
    """config.json's num_hidden_layers is not more than the layers the checkpoint's tensor names hold
    (more layers in the checkpoint are reported as unexpected tensors, by name)."""
    layers = {int(n.split(".")[2]) for n in found if n.startswith("model.layers.") and n.split(".")[2].isdigit()}
    held = max(layers) + 1 if layers else 0
    if config.num_hidden_layers > held:
        raise ValueError(
            f"config.json says num_hidden_layers {config.num_hidden_layers} but the checkpoint's tensors hold "
            f"{held} layer(s) (model.layers.0 .. {held - 1}); the config and the weights do not match"
        )
