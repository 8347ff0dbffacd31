"""Corrupt and lying checkpoints: every one is an error that names the file and the key (or the
tensor), raised while loading, never garbage later.

Classes (issue 14): config values that make the math non-finite; JSON files of the wrong shape or
value types; a directory, a dangling symlink or bytes that are not UTF-8 where a file belongs;
tensors of a dtype the config does not allow; a vocabulary smaller than the tokenizer's; a shard
index that points outside the model folder.
"""
import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from minillama import Llama
from minillama.config import LlamaConfig
from tests.checkpoints import checkpoint_factory, llama3_rope_scaling, llama3_tokenizer_json  # noqa: F401  (fixture)

SMALL = dict(hidden_size=32, n_layers=1, n_heads=4, n_kv_heads=2, intermediate_size=64, tokenizer="sentencepiece")


@pytest.fixture
def folder(checkpoint_factory, tmp_path):  # noqa: F811
    """A fresh copy of a tiny checkpoint, to break."""
    source = checkpoint_factory(**SMALL)[0]
    shutil.copytree(source, tmp_path / "ckpt")
    return tmp_path / "ckpt"


def edit_json(path, **changes):
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def load_error(folder, cls=ValueError) -> str:
    with pytest.raises(cls) as e:
        Llama.from_pretrained(folder, device="cpu")
    return str(e.value)


# -- config values that would make the math non-finite -----------------------------------------

def llama3(**changes):
    return dict(llama3_rope_scaling(), **changes)


@pytest.mark.parametrize("changes, named", [
    (dict(rms_norm_eps=0), "rms_norm_eps must be a finite number > 0, got 0"),
    (dict(rms_norm_eps=-1e-5), "rms_norm_eps must be a finite number > 0, got -1e-05"),
    (dict(rms_norm_eps=float("nan")), "rms_norm_eps must be a finite number > 0, got nan"),
    (dict(rms_norm_eps=1e39), "rms_norm_eps must be a finite number > 0, got 1e+39"),  # inf in float32
    (dict(rope_theta=0), "rope_theta must be a finite number > 0, got 0"),
    (dict(rope_theta=-10000.0), "rope_theta must be a finite number > 0, got -10000.0"),
    (dict(rope_theta=float("inf")), "rope_theta must be a finite number > 0, got inf"),
    (dict(rope_scaling=llama3(factor=0)), "rope_scaling.factor must be a finite number > 0, got 0"),
    (dict(rope_scaling=llama3(low_freq_factor=0.0)), "rope_scaling.low_freq_factor must be a finite number > 0"),
    (dict(rope_scaling=llama3(high_freq_factor=1.0)),
     "rope_scaling.high_freq_factor (1.0) must be greater than low_freq_factor (1.0)"),
    (dict(rope_scaling=llama3(original_max_position_embeddings=0)),
     "rope_scaling.original_max_position_embeddings must be a positive integer, got 0"),
    (dict(head_dim=7, hidden_size=28), "head_dim must be even"),
])
def test_config_values_that_break_the_math_are_named(folder, changes, named):
    edit_json(folder / "config.json", **changes)
    message = load_error(folder)
    assert message.startswith(f"{folder / 'config.json'}: ") and named in message


def test_json_nan_and_infinity_literals_are_caught(folder):
    """Python's json accepts NaN and Infinity: they must not slip through as numbers."""
    text = (folder / "config.json").read_text().replace('"rms_norm_eps": 1e-05', '"rms_norm_eps": NaN')
    (folder / "config.json").write_text(text)
    assert "rms_norm_eps must be a finite number > 0, got nan" in load_error(folder)


# -- JSON of the wrong shape ---------------------------------------------------------------------

@pytest.mark.parametrize("changes, named", [
    (dict(hidden_size="32"), "hidden_size must be a positive integer, got '32'"),
    (dict(hidden_size=32.0), "hidden_size must be a positive integer, got 32.0"),
    (dict(num_hidden_layers=True), "num_hidden_layers must be a positive integer, got True"),
    (dict(num_key_value_heads=0), "num_key_value_heads must be a positive integer, got 0"),
    (dict(rms_norm_eps="1e-5"), "rms_norm_eps must be a finite number > 0, got '1e-5'"),
    (dict(tie_word_embeddings="false"), "tie_word_embeddings must be true or false, got 'false'"),
    (dict(attention_bias=1), "attention_bias must be true or false, got 1"),
    (dict(rope_scaling="llama3"), "rope_scaling must be an object or null, got 'llama3'"),
    (dict(rope_scaling=[1, 2]), "rope_scaling must be an object or null, got [1, 2]"),
    (dict(torch_dtype=["bfloat16"]), "torch_dtype ['bfloat16'] is not supported"),
    (dict(eos_token_id="2"), "eos_token_id must be a token id (an integer >= 0) or a list of them, got '2'"),
    (dict(eos_token_id=[2, None]), "eos_token_id must be a token id"),
    (dict(eos_token_id=10 ** 6), "eos_token_id [1000000] is outside the vocabulary"),
    (dict(bos_token_id=-1), "bos_token_id must be a token id (an integer >= 0) or null, got -1"),
])
def test_config_values_of_the_wrong_type_are_named(folder, changes, named):
    edit_json(folder / "config.json", **changes)
    message = load_error(folder)
    assert message.startswith(f"{folder / 'config.json'}: ") and named in message


def test_eos_0_is_kept_not_dropped():
    d = dict(model_type="llama", hidden_size=32, intermediate_size=64, num_hidden_layers=1,
             num_attention_heads=4, vocab_size=100, eos_token_id=0)
    assert LlamaConfig.from_dict(d).eos_token_id == [0]


@pytest.mark.parametrize("name", ["config.json", "generation_config.json", "tokenizer_config.json"])
@pytest.mark.parametrize("text, shape", [("[1, 2]", "array"), ('"llama"', "string"), ("3", "number"),
                                         ("null", "null")])
def test_json_files_that_are_not_objects(folder, name, text, shape):
    (folder / name).write_text(text)
    message = load_error(folder)
    assert message == f"{folder / name} holds a JSON {shape}; expected an object ({{\"key\": value, ...}})"


@pytest.mark.parametrize("changes, named", [
    (dict(eos_token_id="2"), "eos_token_id must be a token id (an integer >= 0) or a list of them, got '2'"),
    (dict(eos_token_id=[[2]]), "eos_token_id must be a token id"),
    (dict(eos_token_id=2.0), "eos_token_id must be a token id"),
    (dict(bos_token_id="1"), "bos_token_id must be a token id (an integer >= 0) or null, got '1'"),
])
def test_generation_config_values_of_the_wrong_type(folder, changes, named):
    edit_json(folder / "generation_config.json", **changes)
    message = load_error(folder)
    assert message.startswith(f"{folder / 'generation_config.json'}: ") and named in message


def test_generation_config_stop_id_outside_the_vocabulary(folder):
    edit_json(folder / "generation_config.json", eos_token_id=[2, 128009])
    assert "generation_config.json names token id(s) [128009]" in load_error(folder)


@pytest.mark.parametrize("changes, named", [
    (dict(bos_token=5), "bos_token must be a string"),
    (dict(eos_token={"content": 2}), "eos_token must be a string"),
    (dict(add_bos_token="yes"), "add_bos_token must be true, false or null, got 'yes'"),
    (dict(chat_template=5), "chat_template must be a string or a list"),
    (dict(chat_template=[{"name": "default"}]), "chat_template must be a string or a list"),
    (dict(added_tokens_decoder=[1]), "added_tokens_decoder must be an object"),
])
def test_tokenizer_config_values_of_the_wrong_type(folder, changes, named):
    edit_json(folder / "tokenizer_config.json", **changes)
    message = load_error(folder)
    assert message.startswith(f"{folder / 'tokenizer_config.json'}: ") and named in message


def test_shard_index_of_the_wrong_shape(checkpoint_factory, tmp_path):  # noqa: F811
    shutil.copytree(checkpoint_factory(shards=2, **SMALL)[0], tmp_path / "s")
    index = tmp_path / "s" / "model.safetensors.index.json"
    for text, named in [("[]", "holds a JSON array"), ('{"weight_map": []}', "needs a non-empty 'weight_map' object"),
                        ('{"metadata": {}}', "needs a non-empty 'weight_map' object"),
                        ('{"weight_map": {"a": 3}}', "weight_map['a'] must be a file name, got 3")]:
        index.write_text(text)
        assert named in load_error(tmp_path / "s")


# -- a directory, a dangling symlink, bytes that are not UTF-8 -----------------------------------

@pytest.mark.parametrize("name", ["config.json", "generation_config.json", "tokenizer_config.json",
                                  "tokenizer.model", "model.safetensors", "chat_template.jinja"])
def test_a_directory_where_a_file_belongs(folder, name):
    if (folder / name).exists():
        (folder / name).unlink()
    (folder / name).mkdir()
    assert load_error(folder) == f"{folder / name} is a directory; the checkpoint needs a file of that name there"


@pytest.mark.parametrize("name", ["config.json", "generation_config.json", "tokenizer_config.json",
                                  "tokenizer.model", "model.safetensors"])
def test_a_dangling_symlink_is_a_broken_download(folder, tmp_path, name):
    (folder / name).unlink()
    os.symlink(tmp_path / "blobs" / "gone", folder / name)  # as in the HF cache, after the blob is gone
    assert load_error(folder) == (f"{folder / name} is a dangling symlink (to {tmp_path / 'blobs' / 'gone'}): "
                                  f"the download is incomplete; download the checkpoint again")


@pytest.mark.parametrize("name", ["config.json", "generation_config.json", "tokenizer_config.json",
                                  "chat_template.jinja"])
def test_a_file_that_is_not_utf8(folder, name):
    path = folder / name
    data = path.read_bytes() if path.exists() else b"{{ messages }}"
    path.write_bytes(data[:1] + b"\xe9t\xe9" + data[1:])  # latin-1 "été"
    assert load_error(folder) == f"{path} is not UTF-8 text (byte 1 is 0xe9)"


# -- tensor dtypes -------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype, name", [(torch.int8, "I8"), (torch.bool, "BOOL"), (torch.int64, "I64"),
                                         (torch.uint8, "U8"), (torch.float8_e4m3fn, "F8_E4M3")])
def test_a_tensor_of_a_non_float_dtype_is_refused(folder, dtype, name):
    state = load_file(str(folder / "model.safetensors"))
    state["model.layers.0.mlp.up_proj.weight"] = state["model.layers.0.mlp.up_proj.weight"].to(dtype)
    save_file(state, str(folder / "model.safetensors"))
    assert load_error(folder) == (f"tensor model.layers.0.mlp.up_proj.weight in model.safetensors has dtype {name}; "
                                  f"this checkpoint's weights must be one of F32, F16, BF16, F64")


def test_float_dtypes_other_than_the_configs_load(folder):
    """A float16 norm in a float32 checkpoint is cast, as transformers does: it is floating point."""
    state = load_file(str(folder / "model.safetensors"))
    state["model.norm.weight"] = state["model.norm.weight"].half()
    save_file(state, str(folder / "model.safetensors"))
    llm = Llama.from_pretrained(folder, device="cpu")
    assert torch.equal(llm.model.norm.weight, state["model.norm.weight"].float())


# -- vocabulary ----------------------------------------------------------------------------------

def test_vocab_smaller_than_the_tokenizer_is_an_error(folder):
    edit_json(folder / "config.json", vocab_size=300)
    state = load_file(str(folder / "model.safetensors"))
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        state[name] = state[name][:300].contiguous()
    save_file(state, str(folder / "model.safetensors"))
    message = load_error(folder)
    assert message.startswith("config.json vocab_size 300 is smaller than the tokenizer's ")
    assert "ids 300.." in message


@pytest.mark.parametrize("change, named", [
    ("holes", "'<|begin_of_text|>' has id 128000 in the file, but the tokenizers library gives it 127997"),
    ("gap", "'<|extra|>' has id 128300 in the file, but the tokenizers library gives it 128256"),
])
def test_added_token_ids_the_tokenizers_library_would_shift_are_an_error(checkpoint_factory, tmp_path, change,  # noqa: F811
                                                                         named):
    """tokenizers numbers an added token that model.vocab lacks from len(model.vocab) on, whatever id
    tokenizer.json gives it: holes in the vocabulary moved BOS and every chat marker, silently."""
    folder = tmp_path / "ckpt"
    shutil.copytree(checkpoint_factory(tokenizer="llama3", n_layers=1, seed=6)[0], folder)
    spec = json.loads(llama3_tokenizer_json())
    if change == "holes":
        spec["model"]["vocab"] = {t: i for t, i in spec["model"]["vocab"].items() if i not in (1000, 1001, 5000)}
    else:
        spec["added_tokens"].append(dict(spec["added_tokens"][-1], id=128300, content="<|extra|>"))
    (folder / "tokenizer.json").write_text(json.dumps(spec, ensure_ascii=False), encoding="utf-8")
    message = load_error(folder)
    assert message.startswith(f"{folder / 'tokenizer.json'}: added token ") and named in message


# -- a shard index pointing outside the folder ---------------------------------------------------

@pytest.mark.parametrize("shard", ["../outside.safetensors", "{abs}", "sub/model-00001-of-00002.safetensors",
                                   "..", "model-00001-of-00002.bin"])
def test_a_shard_index_cannot_reach_outside_the_folder(checkpoint_factory, tmp_path, shard):  # noqa: F811
    folder = tmp_path / "s"
    shutil.copytree(checkpoint_factory(shards=2, **SMALL)[0], folder)
    outside = tmp_path / "outside.safetensors"
    shutil.copy(folder / "model-00001-of-00002.safetensors", outside)  # a real file there, to be sure
    index = folder / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    first = next(iter(data["weight_map"]))
    data["weight_map"][first] = shard.format(abs=outside)
    index.write_text(json.dumps(data))
    assert load_error(folder) == (
        f"{index}: weight_map[{first!r}] names {shard.format(abs=outside)!r}, not a .safetensors file in the model "
        f"folder; shards are read only from the folder itself (no paths, no '..')"
    )


def test_a_config_with_more_layers_than_the_weights_fails_at_once(folder):
    edit_json(folder / "config.json", num_hidden_layers=10 ** 9)  # building its name table would never end
    assert load_error(folder) == ("config.json says num_hidden_layers 1000000000 but the checkpoint's tensors hold "
                                  "1 layer(s) (model.layers.0 .. 0); the config and the weights do not match")
