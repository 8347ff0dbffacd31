"""Bad checkpoints and bad requests: each is a clear error, raised before any work is done."""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from minillama import Llama
from minillama.config import LlamaConfig
from minillama.hub import ModelNotFoundError
from tests.checkpoints import checkpoint_factory, write_checkpoint  # noqa: F401  (fixture)

SMALL = dict(hidden_size=32, n_layers=2, n_heads=4, n_kv_heads=2, intermediate_size=64, tokenizer="sentencepiece")


@pytest.fixture
def folder(tmp_path):
    write_checkpoint(tmp_path / "ckpt", **SMALL)
    return tmp_path / "ckpt"


def edit_config(folder, **changes):
    path = folder / "config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


def test_loads_and_generates(folder):
    llm = Llama.from_pretrained(folder, device="cpu")
    assert llm.dtype == torch.float32 and llm.device.type == "cpu"
    assert llm.stop_ids == [2]
    out = llm.generate(["hello world"], max_new_tokens=5)
    assert len(out[0].token_ids) <= 5 and out[0].finish_reason in ("stop", "length")


def test_missing_path(tmp_path):
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        Llama.from_pretrained(tmp_path / "nope", device="cpu")


def test_folder_without_model(tmp_path):
    with pytest.raises(ModelNotFoundError, match="no config.json"):
        Llama.from_pretrained(tmp_path, device="cpu")


def test_folder_without_weights(folder):
    (folder / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        Llama.from_pretrained(folder, device="cpu")


def test_unsupported_model_type(folder):
    edit_config(folder, model_type="mistral")
    with pytest.raises(ValueError, match="model_type 'mistral' is not supported"):
        Llama.from_pretrained(folder, device="cpu")


def test_unsupported_rope_type(folder):
    edit_config(folder, rope_scaling={"rope_type": "yarn", "factor": 4.0})
    with pytest.raises(NotImplementedError, match="'yarn'"):
        Llama.from_pretrained(folder, device="cpu")


def test_quantization_config_is_an_error_before_any_tensor(folder, monkeypatch):
    edit_config(folder, quantization_config={"quant_method": "gptq", "bits": 4})
    import minillama.weights

    monkeypatch.setattr(minillama.weights, "read_headers", lambda files: pytest.fail("tensors were read"))
    with pytest.raises(NotImplementedError, match="quantization_config \\(quant_method 'gptq'\\)"):
        Llama.from_pretrained(folder, device="cpu")


def test_llama3_rope_missing_key():
    d = dict(model_type="llama", hidden_size=32, intermediate_size=64, num_hidden_layers=1,
             num_attention_heads=4, vocab_size=100, rope_scaling={"rope_type": "llama3", "factor": 8.0})
    with pytest.raises(ValueError, match="low_freq_factor"):
        LlamaConfig.from_dict(d)


def test_heads_not_divisible():
    d = dict(model_type="llama", hidden_size=32, intermediate_size=64, num_hidden_layers=1,
             num_attention_heads=4, num_key_value_heads=3, vocab_size=100)
    with pytest.raises(ValueError, match="num_attention_heads 4 is not a multiple of num_key_value_heads 3"):
        LlamaConfig.from_dict(d)


def test_missing_shard(tmp_path):
    folder = tmp_path / "sharded"
    write_checkpoint(folder, shards=3, **SMALL)
    (folder / "model-00002-of-00003.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model-00002-of-00003.safetensors"):
        Llama.from_pretrained(folder, device="cpu")


def test_truncated_safetensors(folder):
    path = folder / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        Llama.from_pretrained(folder, device="cpu")


def test_corrupt_safetensors_header(folder):
    path = folder / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[8:16] = b"\x00garbage"
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="truncated or corrupt"):
        Llama.from_pretrained(folder, device="cpu")


def test_shape_disagrees_with_config(folder):
    edit_config(folder, intermediate_size=72)
    with pytest.raises(ValueError, match=r"gate_proj.weight in model.safetensors has shape \(64, 32\), "
                                         r"the config expects \(72, 32\)"):
        Llama.from_pretrained(folder, device="cpu")


def test_missing_tensor_named(folder):
    state = load_file(str(folder / "model.safetensors"))
    del state["model.layers.1.mlp.up_proj.weight"]
    save_file(state, str(folder / "model.safetensors"))
    with pytest.raises(ValueError, match=r"model.layers.1.mlp.up_proj.weight"):
        Llama.from_pretrained(folder, device="cpu")


def test_unexpected_tensor_named(folder):
    state = load_file(str(folder / "model.safetensors"))
    state["model.layers.7.mlp.up_proj.weight"] = torch.zeros(2)
    save_file(state, str(folder / "model.safetensors"))
    with pytest.raises(ValueError, match=r"unexpected tensor.*model.layers.7.mlp.up_proj.weight.*model.safetensors"):
        Llama.from_pretrained(folder, device="cpu")


def test_tied_checkpoint_has_no_head(tmp_path):
    folder = tmp_path / "tied"
    write_checkpoint(folder, tied=True, **SMALL)
    assert "lm_head.weight" not in load_file(str(folder / "model.safetensors"))
    llm = Llama.from_pretrained(folder, device="cpu")
    assert llm.model.output.weight is llm.model.tok_embeddings.weight


def test_tied_config_with_a_different_head_is_an_error(folder):
    edit_config(folder, tie_word_embeddings=True)
    with pytest.raises(ValueError, match="lm_head.weight differs"):
        Llama.from_pretrained(folder, device="cpu")


def test_untied_config_without_head_is_an_error(tmp_path):
    folder = tmp_path / "tied"
    write_checkpoint(folder, tied=True, **SMALL)
    edit_config(folder, tie_word_embeddings=False)
    with pytest.raises(ValueError, match="lm_head.weight"):
        Llama.from_pretrained(folder, device="cpu")


def test_no_tokenizer(folder):
    (folder / "tokenizer.model").unlink()
    with pytest.raises(FileNotFoundError, match="no tokenizer.json or tokenizer.model"):
        Llama.from_pretrained(folder, device="cpu")


def test_bf16_checkpoint_defaults_to_float32_on_cpu(tmp_path):
    folder = tmp_path / "bf16"
    write_checkpoint(folder, dtype="bfloat16", **SMALL)
    assert Llama.from_pretrained(folder, device="cpu").dtype == torch.float32
    assert Llama.from_pretrained(folder, device="cpu", dtype="bfloat16").dtype == torch.bfloat16


def test_bad_dtype(folder):
    with pytest.raises(ValueError, match="dtype 'float8' is not supported"):
        Llama.from_pretrained(folder, device="cpu", dtype="float8")


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    folder = tmp_path_factory.mktemp("short")
    write_checkpoint(folder, max_position_embeddings=64, **SMALL)
    return Llama.from_pretrained(folder, device="cpu")


def test_prompt_longer_than_context(llm):
    with pytest.raises(ValueError, match="prompt has 70 tokens, more than the model's context of 64"):
        llm.generate([[5] * 70], max_new_tokens=1)
    with pytest.raises(ValueError, match="70 tokens, more than the model's context of 64"):
        llm.logits([5] * 70)


def test_request_past_context(llm):
    with pytest.raises(ValueError, match=r"60 tokens \+ max_new_tokens 10 = 70 exceeds the model's context of 64"):
        llm.generate([[5] * 60], max_new_tokens=10)


def test_empty_prompt_list(llm):
    with pytest.raises(ValueError, match="prompts is empty"):
        llm.generate([], max_new_tokens=3)


def test_negative_max_new_tokens(llm):
    with pytest.raises(ValueError, match="max_new_tokens must be an integer >= 0, got -1"):
        llm.generate(["hi"], max_new_tokens=-1)


def test_token_ids_outside_vocab(llm):
    with pytest.raises(ValueError, match=r"outside the vocabulary"):
        llm.generate([[1, 10**6]], max_new_tokens=1)


def test_zero_new_tokens(llm):
    (out,) = llm.generate(["hi"], max_new_tokens=0)
    assert out.token_ids == [] and out.finish_reason == "length"


def test_transformers5_rope_parameters(tmp_path):
    """transformers >= 5 writes rope_theta and rope_scaling as one rope_parameters object (as
    llm-compressor's FP8 checkpoints made with it do): read, not ignored."""
    write_checkpoint(tmp_path / "old", rope_scaling="llama3", **{**SMALL, "n_layers": 1})
    config = json.loads((tmp_path / "old" / "config.json").read_text())
    new = {k: v for k, v in config.items() if k not in ("rope_theta", "rope_scaling")}
    new["rope_parameters"] = {"rope_theta": config["rope_theta"], **config["rope_scaling"]}
    parsed = LlamaConfig.from_dict(new)
    assert parsed.rope_theta == 500000.0 and parsed.rope_scaling == LlamaConfig.from_dict(config).rope_scaling
    assert LlamaConfig.from_dict({**new, "rope_parameters": {"rope_theta": 1e4, "rope_type": "default"}}).rope_scaling is None
    with pytest.raises(ValueError, match="rope_theta 10000.0 and rope_parameters.rope_theta 500000.0 disagree"):
        LlamaConfig.from_dict({**new, "rope_theta": 10000.0})
