"""Finding checkpoints: local folders, the HF cache in offline mode, and one-line hub errors.

No test touches the network: every test runs with huggingface_hub in offline mode and a private
cache folder, and the hub-error tests replace the download functions.
"""
import json

import huggingface_hub
import pytest
from huggingface_hub import constants, errors
from huggingface_hub.utils import filter_repo_objects

from minillama import Llama
from minillama.hub import ModelNotFoundError, resolve_checkpoint
from tests.checkpoints import write_checkpoint

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(autouse=True)
def offline_cache(tmp_path, monkeypatch):
    """An empty HF cache and HF_HUB_OFFLINE=1 (huggingface_hub reads both at import: patch its constants)."""
    cache = tmp_path / "hf_cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    return cache


def cached_snapshot(cache, repo_id):
    """The folder of ``repo_id``'s snapshot in the HF cache layout (refs/main -> snapshots/<commit>)."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)
    snapshot = repo / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    return snapshot


def test_local_folder(tmp_path):
    write_checkpoint(tmp_path / "m", tokenizer="sentencepiece")
    assert resolve_checkpoint(tmp_path / "m") == tmp_path / "m"
    assert resolve_checkpoint(str(tmp_path / "m")) == tmp_path / "m"
    with pytest.raises(ModelNotFoundError, match="is a file"):
        resolve_checkpoint(tmp_path / "m" / "config.json")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelNotFoundError, match="holds no config.json"):
        resolve_checkpoint(tmp_path / "empty")
    with pytest.raises(ModelNotFoundError, match="does not exist; pass a local model folder or a hub repo id"):
        resolve_checkpoint(tmp_path / "missing")
    for empty in ("", " "):  # Path("") would be the current folder
        with pytest.raises(ModelNotFoundError, match="the model is '"):
            resolve_checkpoint(empty)


def test_offline_cache_hit_loads(offline_cache):
    snapshot = cached_snapshot(offline_cache, "tiny-org/tiny-llama")
    write_checkpoint(snapshot, tokenizer="sentencepiece", seed=2)
    assert resolve_checkpoint("tiny-org/tiny-llama") == snapshot
    llm = Llama.from_pretrained("tiny-org/tiny-llama", device="cpu")
    assert llm.folder == snapshot


def test_offline_cache_miss_says_what_to_do():
    with pytest.raises(ModelNotFoundError) as e:
        resolve_checkpoint("meta-llama/Llama-3.1-8B-Instruct")
    assert str(e.value) == (
        "meta-llama/Llama-3.1-8B-Instruct is not in the local Hugging Face cache and HF_HUB_OFFLINE is set; "
        "download it once with network access (unset HF_HUB_OFFLINE), or pass a local folder"
    )


def test_not_a_llama_is_refused_before_the_weights(offline_cache, monkeypatch):
    snapshot = cached_snapshot(offline_cache, "someone/mistral")
    (snapshot / "config.json").write_text(json.dumps({"model_type": "mistral"}))

    def no_weights(*args, **kwargs):
        raise AssertionError("weights were requested for a model that is not a LLaMA")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", no_weights)
    with pytest.raises(ModelNotFoundError, match="is a 'mistral' model, not a LLaMA checkpoint"):
        resolve_checkpoint("someone/mistral")


def _error(cls):
    """An instance of a huggingface_hub exception without an HTTP response (constructors vary by version)."""
    err = cls.__new__(cls)
    Exception.__init__(err, "from the test")
    return err


@pytest.mark.parametrize("cls, message", [
    (errors.GatedRepoError, "meta-llama/Llama-3.1-8B-Instruct is gated: accept its license on "
                            "huggingface.co/meta-llama/Llama-3.1-8B-Instruct, then log in with `hf auth login` "
                            "or set HF_TOKEN"),
    (errors.RepositoryNotFoundError, "meta-llama/Llama-3.1-8B-Instruct was not found on the hub (if it is "
                                     "private, set HF_TOKEN); check the spelling"),
])
def test_hub_errors_are_one_line(monkeypatch, cls, message):
    def fail(*args, **kwargs):
        raise _error(cls)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fail)
    with pytest.raises(ModelNotFoundError) as e:
        resolve_checkpoint("meta-llama/Llama-3.1-8B-Instruct")
    assert str(e.value) == message


def test_no_network(monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)

    def fail(*args, **kwargs):
        raise _error(errors.LocalEntryNotFoundError)  # what huggingface_hub raises when it cannot connect

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fail)
    with pytest.raises(ModelNotFoundError, match="not in the local Hugging Face cache and the hub cannot be reached"):
        resolve_checkpoint("meta-llama/Llama-3.1-8B-Instruct")


def fake_hub(monkeypatch, snapshot, repo_files: dict):
    """snapshot_download over a repo holding ``repo_files`` (name -> text): it writes the files the
    allow_patterns select into ``snapshot``, as huggingface_hub does; returns the names fetched."""
    fetched = []

    def snapshot_download(repo_id, allow_patterns=None, **kwargs):
        for name in filter_repo_objects(list(repo_files), allow_patterns=allow_patterns):
            (snapshot / name).parent.mkdir(parents=True, exist_ok=True)
            (snapshot / name).write_text(repo_files[name])
            fetched.append(name)
        return str(snapshot)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    return fetched


def test_only_needed_files_are_downloaded(offline_cache, monkeypatch):
    """The shards the index names, the small top-level files and the named chat templates: not
    model.safetensors as well, not a file in a subfolder that matches a pattern, not the original/ weights."""
    snapshot = cached_snapshot(offline_cache, "meta-llama/Llama-3.1-8B-Instruct")
    (snapshot / "config.json").write_text(json.dumps({"model_type": "llama"}))
    index = {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}
    repo = {name: "" for name in [  # meta-llama/Llama-3.1-8B-Instruct's files, and some traps
        ".gitattributes", "LICENSE", "README.md", "USE_POLICY.md", "config.json", "generation_config.json",
        "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
        "original/consolidated.00.pth", "original/params.json", "original/tokenizer.model",
        "special_tokens_map.json", "tokenizer.json", "tokenizer_config.json",
        "model.safetensors", "model-extra/model-00001-of-00002.safetensors", "sub/config.json", "pytorch_model.bin",
        "chat_template.jinja", "additional_chat_templates/tool_use.jinja", "templates/chat_template.jinja",
    ]}
    repo["model.safetensors.index.json"] = json.dumps(index)
    fetched = fake_hub(monkeypatch, snapshot, repo)
    assert resolve_checkpoint("meta-llama/Llama-3.1-8B-Instruct") == snapshot
    assert sorted(fetched) == [
        "additional_chat_templates/tool_use.jinja", "chat_template.jinja",
        "config.json", "generation_config.json", "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors", "model.safetensors.index.json", "special_tokens_map.json",
        "tokenizer.json", "tokenizer_config.json",
    ]


def test_a_single_file_checkpoint_downloads_model_safetensors(offline_cache, monkeypatch):
    snapshot = cached_snapshot(offline_cache, "tiny/single")
    (snapshot / "config.json").write_text(json.dumps({"model_type": "llama"}))
    repo = {name: "" for name in ["config.json", "tokenizer.model", "model.safetensors", "model-1.safetensors",
                                   "model-00001-of-00002.safetensors", "checkpoints/model.safetensors"]}
    fetched = fake_hub(monkeypatch, snapshot, repo)
    assert resolve_checkpoint("tiny/single") == snapshot
    assert sorted(fetched) == ["config.json", "model.safetensors", "tokenizer.model"]


@pytest.mark.parametrize("shard", ["../model-00001-of-00001.safetensors", "/etc/model.safetensors",
                                   "sub/model-00001.safetensors", "model.bin"])
def test_an_index_naming_files_outside_the_folder_is_refused_before_any_weight(offline_cache, monkeypatch, shard):
    snapshot = cached_snapshot(offline_cache, "evil/index")
    (snapshot / "config.json").write_text(json.dumps({"model_type": "llama"}))
    repo = {"config.json": "", "model.safetensors.index.json": json.dumps({"weight_map": {"w": shard}})}
    fetched = fake_hub(monkeypatch, snapshot, repo)
    with pytest.raises(ValueError, match="not a .safetensors file in the model folder"):
        resolve_checkpoint("evil/index")
    assert sorted(fetched) == ["config.json", "model.safetensors.index.json"]


def test_an_index_naming_missing_shards(offline_cache, monkeypatch):
    snapshot = cached_snapshot(offline_cache, "half/uploaded")
    (snapshot / "config.json").write_text(json.dumps({"model_type": "llama"}))
    index = {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}
    repo = {"config.json": "", "model.safetensors.index.json": json.dumps(index),
            "model-00001-of-00002.safetensors": ""}
    fake_hub(monkeypatch, snapshot, repo)
    with pytest.raises(ModelNotFoundError, match=r"names shard\(s\) \['model-00002-of-00002.safetensors'\] that the "
                                                 r"repo does not hold"):
        resolve_checkpoint("half/uploaded")


def test_repo_without_safetensors(offline_cache, monkeypatch):
    snapshot = cached_snapshot(offline_cache, "old/llama-bin")
    (snapshot / "config.json").write_text(json.dumps({"model_type": "llama"}))
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda repo_id, **kw: str(snapshot))
    with pytest.raises(ModelNotFoundError, match="has no .safetensors weights"):
        resolve_checkpoint("old/llama-bin")
