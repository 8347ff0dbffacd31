"""scripts/quantize.py writes a compressed-tensors checkpoint: the config parses, every tensor has
the dtype and shape compressed-tensors gives it, and what it encodes is the per-channel quantization
of the source weights."""
import importlib.util
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from minillama.quantization import module_schemes, parse_quantization_config, quantize_per_channel
from tests.checkpoints import write_checkpoint

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "quantize.py"
SMALL = dict(hidden_size=32, n_layers=2, n_heads=4, n_kv_heads=2, intermediate_size=64, tokenizer="sentencepiece")


@pytest.fixture(scope="module")
def quantize_script():
    spec = importlib.util.spec_from_file_location("quantize_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def read_all(folder):
    tensors = {}
    for path in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(path, framework="pt") as f:
            tensors.update({name: f.get_tensor(name) for name in f.keys()})
    return tensors


@pytest.mark.parametrize("kind,shards,dtype", [("fp8", 1, "bfloat16"), ("int8", 2, "float32")])
def test_writes_a_compressed_tensors_checkpoint(tmp_path, quantize_script, kind, shards, dtype):
    write_checkpoint(tmp_path / "src", shards=shards, dtype=dtype, **SMALL)
    done = []
    qc_dict = quantize_script.quantize_checkpoint(tmp_path / "src", tmp_path / "out", kind, progress=done.append)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["quantization_config"] == qc_dict
    group = qc_dict["config_groups"]["group_0"]
    assert qc_dict["format"] == group["format"] == ("float-quantized" if kind == "fp8" else "int-quantized")
    assert group["input_activations"]["strategy"] == "token" and group["input_activations"]["dynamic"] is True
    assert qc_dict["ignore"] == ["lm_head"]
    schemes = module_schemes(parse_quantization_config(qc_dict), 2, tie_word_embeddings=False)
    assert len(done) == 14

    source = read_all(tmp_path / "src")
    out = read_all(tmp_path / "out")
    expected_names = set(source)
    for module, scheme in schemes.items():
        if scheme is None:
            continue
        w = source[f"{module}.weight"]
        specs = scheme.checkpoint_tensors(module, *w.shape)
        expected_names |= set(specs)
        for name, spec in specs.items():
            spec.check(name, tuple(out[name].shape), out[name].dtype, "out")
        q, scale = quantize_per_channel(w, scheme.weight_dtype)
        assert torch.equal(out[f"{module}.weight"].view(torch.int8), q.view(torch.int8))
        assert torch.equal(out[f"{module}.weight_scale"], scale[:, None])
    assert set(out) == expected_names
    for name in ("model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"):
        assert torch.equal(out[name], source[name]) and out[name].dtype == source[name].dtype
    if shards > 1:
        index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
        assert set(index["weight_map"]) == expected_names
    assert (tmp_path / "out" / "tokenizer.model").exists()


def test_refuses_a_quantized_source_and_an_existing_output(tmp_path, quantize_script):
    write_checkpoint(tmp_path / "src", **SMALL)
    quantize_script.quantize_checkpoint(tmp_path / "src", tmp_path / "out", "int8")
    with pytest.raises(ValueError, match="already quantized"):
        quantize_script.quantize_checkpoint(tmp_path / "out", tmp_path / "again", "fp8")
    with pytest.raises(ValueError, match="exists; choose a new folder"):
        quantize_script.quantize_checkpoint(tmp_path / "src", tmp_path / "out", "fp8")


def run_script(*args):
    import os
    import subprocess
    import sys

    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(SCRIPT.parent.parent))
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=120)


@pytest.mark.parametrize("args, named", [
    (["--kind", "int8", "--device", "cuda"], "device cuda was requested but CUDA is not available"),
    (["--kind", "int8", "--device", "tpu"], "device 'tpu' is not a device name"),
])
def test_a_bad_device_is_a_one_line_error_and_writes_nothing(tmp_path, args, named):
    write_checkpoint(tmp_path / "src", **SMALL)
    proc = run_script(tmp_path / "src", tmp_path / "out", *args)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1 and named in proc.stderr, proc.stderr
    assert not (tmp_path / "out").exists()  # a rerun with a good device is not refused with "out exists"


def test_a_missing_source_is_a_one_line_error(tmp_path):
    proc = run_script(tmp_path / "nothing", tmp_path / "out", "--kind", "fp8")
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1 and "does not exist" in proc.stderr


def test_a_failure_while_writing_removes_the_partial_output(tmp_path, quantize_script, monkeypatch):
    write_checkpoint(tmp_path / "src", **SMALL)

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(quantize_script, "save_file", full_disk)
    with pytest.raises(OSError, match="No space left"):
        quantize_script.quantize_checkpoint(tmp_path / "src", tmp_path / "out", "int8")
    assert not (tmp_path / "out").exists()


def test_lm_head_flag_writes_the_head_that_quantize_lm_head_computes(tmp_path):
    """--lm-head: lm_head is quantized like the projections (``ignore: []``), and the checkpoint
    loads to the model that ``quantize="fp8", quantize_lm_head=True`` makes from the source."""
    from minillama import Llama

    write_checkpoint(tmp_path / "src", **SMALL)
    proc = run_script(tmp_path / "src", tmp_path / "out", "--kind", "fp8", "--lm-head")
    assert proc.returncode == 0, proc.stderr
    assert "15 weights (the projections and lm_head) in fp8" in proc.stderr
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["quantization_config"]["ignore"] == []
    out = read_all(tmp_path / "out")
    q, scale = quantize_per_channel(read_all(tmp_path / "src")["lm_head.weight"], torch.float8_e4m3fn)
    assert torch.equal(out["lm_head.weight"].view(torch.int8), q.view(torch.int8))
    assert torch.equal(out["lm_head.weight_scale"], scale[:, None])
    ids = [1, 17, 300, 42, 9, 250]
    loaded = Llama.from_pretrained(tmp_path / "out", device="cpu").logits(ids)
    at_load = Llama.from_pretrained(tmp_path / "src", device="cpu", quantize="fp8", quantize_lm_head=True).logits(ids)
    assert torch.equal(loaded, at_load)


def test_lm_head_flag_on_a_tied_model_is_a_one_line_error(tmp_path):
    write_checkpoint(tmp_path / "src", tied=True, **SMALL)
    proc = run_script(tmp_path / "src", tmp_path / "out", "--kind", "int8", "--lm-head")
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1, proc.stderr
    assert "lm_head is its embedding table (tie_word_embeddings), which stays in the model dtype; drop --lm-head" \
        in proc.stderr
    assert not (tmp_path / "out").exists()
