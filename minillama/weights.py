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
from typing import Callable, Dict, List, NamedTuple, Optional, Tuple

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from minillama.config import LlamaConfig
from minillama.files import checkpoint_file, read_json, shard_names
from minillama.model import Transformer, rope_inv_freq
from minillama.quantization import TensorSpec, load_plan

# safetensors dtypes a checkpoint without quantization may store (each is cast to the model dtype)
FLOAT_DTYPES = ("F32", "F16", "BF16", "F64")
QUANTIZED_DTYPES = ("F8_E4M3", "I8")  # + what a compressed-tensors checkpoint stores its 8-bit weights in

# The one table from checkpoint names (HF) to ours: (parameter, row block). q/k/v fill the three row
# blocks of the fused ``wqkv`` and gate/up the two of ``w13`` (``Linear.parts``); None: the whole
# parameter. "{i}" is the layer index.
LAYER_NAMES = {
    "model.layers.{i}.input_layernorm.weight": ("layers.{i}.attention_norm.weight", None),
    "model.layers.{i}.self_attn.q_proj.weight": ("layers.{i}.attention.wqkv.weight", 0),
    "model.layers.{i}.self_attn.k_proj.weight": ("layers.{i}.attention.wqkv.weight", 1),
    "model.layers.{i}.self_attn.v_proj.weight": ("layers.{i}.attention.wqkv.weight", 2),
    "model.layers.{i}.self_attn.o_proj.weight": ("layers.{i}.attention.wo.weight", None),
    "model.layers.{i}.post_attention_layernorm.weight": ("layers.{i}.ffn_norm.weight", None),
    "model.layers.{i}.mlp.gate_proj.weight": ("layers.{i}.feed_forward.w13.weight", 0),
    "model.layers.{i}.mlp.up_proj.weight": ("layers.{i}.feed_forward.w13.weight", 1),
    "model.layers.{i}.mlp.down_proj.weight": ("layers.{i}.feed_forward.w2.weight", None),
}
ATTENTION_BIAS_NAMES = {
    "model.layers.{i}.self_attn.q_proj.bias": ("layers.{i}.attention.wqkv.bias", 0),
    "model.layers.{i}.self_attn.k_proj.bias": ("layers.{i}.attention.wqkv.bias", 1),
    "model.layers.{i}.self_attn.v_proj.bias": ("layers.{i}.attention.wqkv.bias", 2),
    "model.layers.{i}.self_attn.o_proj.bias": ("layers.{i}.attention.wo.bias", None),
}
MLP_BIAS_NAMES = {
    "model.layers.{i}.mlp.gate_proj.bias": ("layers.{i}.feed_forward.w13.bias", 0),
    "model.layers.{i}.mlp.up_proj.bias": ("layers.{i}.feed_forward.w13.bias", 1),
    "model.layers.{i}.mlp.down_proj.bias": ("layers.{i}.feed_forward.w2.bias", None),
}
TOP_NAMES = {
    "model.embed_tokens.weight": ("tok_embeddings.weight", None),
    "model.norm.weight": ("norm.weight", None),
    "lm_head.weight": ("output.weight", None),
}


def checkpoint_names(config: LlamaConfig) -> Dict[str, Tuple[str, Optional[int]]]:
    """Checkpoint tensor name -> (model parameter name, row block or None), for exactly the tensors
    a checkpoint must hold."""
    per_layer = dict(LAYER_NAMES)
    if config.attention_bias:
        per_layer.update(ATTENTION_BIAS_NAMES)
    if config.mlp_bias:
        per_layer.update(MLP_BIAS_NAMES)
    names = dict(TOP_NAMES)
    if config.tie_word_embeddings:
        del names["lm_head.weight"]
    for i in range(config.num_hidden_layers):
        names.update({hf.format(i=i): (ours.format(i=i), part) for hf, (ours, part) in per_layer.items()})
    return names


def parameter_block(model: Transformer, name: str, part: Optional[int], tensors: Dict[str, torch.Tensor]):
    """The tensor a checkpoint tensor fills: parameter ``name`` itself, or its row block ``part``."""
    param = tensors[name]
    if part is None:
        return param
    linear = model.get_submodule(name.rsplit(".", 1)[0])
    start = sum(linear.parts[:part])
    return param.narrow(0, start, linear.parts[part])


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


def read_headers(files: List[Path], dtypes: Tuple[str, ...] = FLOAT_DTYPES) -> Dict[str, Tuple[Path, tuple, str]]:
    """tensor name -> (file, shape, safetensors dtype name), reading only the headers. Corrupt or
    truncated files fail here, and so does a tensor whose dtype is not one of ``dtypes`` (no silent cast)."""
    found: Dict[str, Tuple[Path, tuple, str]] = {}
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
                    found[name] = (path, tuple(tensor.get_shape()), tensor.get_dtype())
        except (SafetensorError, OSError) as e:
            raise ValueError(f"{path} is not a readable safetensors file (truncated or corrupt?): {e}") from None
    return found


class Slice(NamedTuple):
    """Where one checkpoint tensor goes: ``target`` takes rows/columns [start, stop) along ``dim``
    of it, one of ``ranks`` equal slices (dim None: the whole tensor)."""

    target: torch.Tensor
    dim: Optional[int] = None
    start: int = 0
    stop: int = 0
    ranks: int = 1

    @property
    def full_shape(self) -> tuple:
        """The checkpoint tensor's shape."""
        shape = list(self.target.shape)
        if self.dim is not None:
            shape[self.dim] *= self.ranks
        return tuple(shape)


def tensor_slice(model: Transformer, name: str, part: Optional[int], params: Dict[str, torch.Tensor]) -> Slice:
    """This rank's slice of the checkpoint tensor that fills parameter ``name`` (row block ``part``)."""
    target = parameter_block(model, name, part, params)
    module_name, _, kind = name.rpartition(".")
    module = model.get_submodule(module_name)
    dim = getattr(module, "shard_dim", None)
    if dim is None or (kind == "bias" and dim == 1):  # a row-parallel bias is added once, after the sum
        return Slice(target)
    rank, size = model.tp.rank, target.shape[dim]
    return Slice(target, dim, rank * size, (rank + 1) * size, model.tp.world_size)


def copy_tensors_from_file(path: Path, targets: Dict[str, Slice], on_copy: Callable[[int], None] = None) -> None:
    """Copy each named tensor of one file (or this rank's slice of it, read alone) into its target
    (any device and dtype); ``on_copy(bytes)`` after each."""
    with safe_open(path, framework="pt", device="cpu") as f:
        for name, piece in targets.items():
            if piece.dim is None:
                piece.target.copy_(f.get_tensor(name))
            elif piece.dim == 0:
                piece.target.copy_(f.get_slice(name)[piece.start:piece.stop])
            else:
                piece.target.copy_(f.get_slice(name)[:, piece.start:piece.stop])
            if on_copy is not None:
                on_copy(piece.target.numel() * piece.target.element_size())


def load_model(folder, config: LlamaConfig, device: torch.device, dtype: torch.dtype, backend=None, tp=None,
               progress: Optional[Callable[[int, int], None]] = None, quantize: Optional[str] = None,
               quantize_lm_head: bool = False) -> Transformer:
    """Build the model on the meta device and fill it from the folder's safetensors, strictly.

    Args:
        backend: the model's kernel backend (``minillama.backend``); default plain PyTorch.
        tp: this process's place in a tensor-parallel group (``minillama.parallel``): only this
            rank's slice of each sharded tensor is read, straight to ``device``.
        progress: called as ``progress(bytes_loaded, bytes_total)`` after each tensor (this rank's).
        quantize: None, "int8" or "fp8": quantize each projection per output channel as it is read
            (``minillama.quantization``). A checkpoint with a quantization_config loads its 8-bit
            tensors and scales as they are.
        quantize_lm_head: with ``quantize``, lm_head too (an untied one); else it stays in ``dtype``.
    """
    folder = Path(folder)
    files = safetensors_files(folder)
    found = read_headers(files, FLOAT_DTYPES + QUANTIZED_DTYPES if config.quantization else FLOAT_DTYPES)
    check_layer_count(config, found)  # before the name table: a config of 10**9 layers must fail, not hang
    names = checkpoint_names(config)
    with torch.device("meta"):
        model = Transformer(config, backend, tp).to(dtype)
    meta = dict(model.named_parameters(remove_duplicate=False))
    plan = load_plan(config, quantize, names, model,  # swaps in the 8-bit Linear modules
                     lambda ours, part: tensor_slice(model, ours, part, meta).full_shape, quantize_lm_head)
    if plan is not None:
        names = {**names, **plan.names}  # + their scales

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
    zero_points = [n for n in extra if plan is not None and n in plan.zero_points]  # checked below, never loaded
    extra = [n for n in extra if n not in zero_points]
    if extra:
        path = found[extra[0]][0].name
        raise ValueError(f"unexpected tensor(s) {extra[:3]} in {path}: they do not belong to this config's model")
    meta = dict(model.named_parameters(remove_duplicate=False))  # the swapped modules' parameters too
    for hf_name, (ours, part) in names.items():
        path, shape, stored = found[hf_name]
        if plan is not None and hf_name in plan.specs:
            plan.specs[hf_name].check(hf_name, shape, stored, path.name)
            continue
        expected = tensor_slice(model, ours, part, meta).full_shape
        if shape != expected:
            raise ValueError(f"tensor {hf_name} in {path.name} has shape {shape}, the config expects {expected}")
        if stored not in FLOAT_DTYPES:  # an 8-bit tensor of a module the quantization_config does not cover
            raise ValueError(f"tensor {hf_name} in {path.name} has dtype {stored}, but the quantization_config "
                             f"does not quantize it; expected one of {', '.join(FLOAT_DTYPES)}")
    if zero_points:
        check_zero_points(found, {n: plan.zero_points[n] for n in zero_points})

    model.to_empty(device=device)
    model.tie_weights()
    model.inv_freq = rope_inv_freq(config).to(device)
    params = dict(model.named_parameters(remove_duplicate=False))  # to_empty made new parameters
    by_file: Dict[Path, List[str]] = {}
    for hf_name in names:
        by_file.setdefault(found[hf_name][0], []).append(hf_name)

    def piece(hf_name: str) -> Slice:
        ours, part = names[hf_name]
        if plan is not None and plan.handles(hf_name):  # 8-bit weights and scales: the plan says, from the weight's slice
            return plan.piece(model, hf_name, names, tensor_slice(model, ours.rpartition(".")[0] + ".weight", part, params))
        return tensor_slice(model, ours, part, params)

    pieces = {hf_name: piece(hf_name) for hf_name in names}
    total = sum(p.target.numel() * p.target.element_size() for p in pieces.values())
    loaded = 0

    def on_copy(nbytes: int) -> None:
        nonlocal loaded
        loaded += nbytes
        if progress is not None:
            progress(loaded, total)

    with torch.no_grad():
        for path, tensor_names in by_file.items():
            copy_tensors_from_file(path, {hf_name: pieces[hf_name] for hf_name in tensor_names}, on_copy)
        if tied_head:
            head = torch.empty_like(model.output.weight)  # this rank's rows of the stored head
            copy_tensors_from_file(found["lm_head.weight"][0],
                                   {"lm_head.weight": tensor_slice(model, "output.weight", None, {"output.weight": head})})
            if not torch.equal(head, model.output.weight):
                raise ValueError(
                    "config says tie_word_embeddings=true but lm_head.weight differs from model.embed_tokens.weight; "
                    "set tie_word_embeddings to false"
                )
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


def save_checkpoint(model: Transformer, config: LlamaConfig, folder, dtype: torch.dtype = None) -> None:
    """Write config.json and model.safetensors with Hugging Face names (the loader's table reversed)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = dict(model.named_parameters(remove_duplicate=False))
    tensors = {}
    for hf_name, (ours, part) in checkpoint_names(config).items():
        t = parameter_block(model, ours, part, state).detach()
        tensors[hf_name] = (t.to(dtype) if dtype is not None else t).contiguous().cpu()
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    cfg = config.to_dict()
    if dtype is not None:
        cfg["torch_dtype"] = str(dtype).removeprefix("torch.")
    (folder / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")


def check_zero_points(found: Dict[str, Tuple[Path, tuple, str]], specs: Dict[str, TensorSpec]) -> None:
    """A compressed checkpoint's zero points (``specs``: name -> TensorSpec) have their shape and dtype
    and are all zeros: symmetric quantization, the math minillama does without them."""
    by_file: Dict[Path, List[str]] = {}
    for name in specs:
        by_file.setdefault(found[name][0], []).append(name)
    for path, names in by_file.items():
        with safe_open(path, framework="pt", device="cpu") as f:
            for name in names:
                specs[name].check(name, found[name][1], found[name][2], path.name)
                nonzero = int(f.get_tensor(name).float().count_nonzero())  # a NaN counts
                if nonzero:
                    raise NotImplementedError(
                        f"tensor {name} in {path.name} holds {nonzero} non-zero value(s): asymmetric quantization "
                        f"(non-zero zero points) is not supported; minillama reads symmetric compressed-tensors "
                        f"checkpoints, whose zero points are absent or all zeros")


def check_layer_count(config: LlamaConfig, found: Dict[str, Tuple[Path, tuple, str]]) -> None:
    """config.json's num_hidden_layers is not more than the layers the checkpoint's tensor names hold
    (more layers in the checkpoint are reported as unexpected tensors, by name)."""
    layers = {int(n.split(".")[2]) for n in found if n.startswith("model.layers.") and n.split(".")[2].isdigit()}
    held = max(layers) + 1 if layers else 0
    if config.num_hidden_layers > held:
        raise ValueError(
            f"config.json says num_hidden_layers {config.num_hidden_layers} but the checkpoint's tensors hold "
            f"{held} layer(s){f' (model.layers.0 .. {held - 1})' if held else ''}; the config and the weights "
            f"do not match"
        )
