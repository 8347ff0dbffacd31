"""Finding a checkpoint: a local folder, or a Hugging Face hub repo id fetched with huggingface_hub.

A download fetches only the top-level files minillama reads, in two steps: the small files first
(config, tokenizer, the shard index), then the weights: the shards the index names, or
``model.safetensors`` when there is no index. Never a file in a subfolder, never the ``.bin`` /
``.pth`` / ``original/`` copies, never both a single file and shards.
"""
import glob
import json
import os
import re
from contextlib import contextmanager
from pathlib import Path
from typing import List

from minillama.files import checkpoint_file, read_json, read_text, shard_names

# The small files minillama reads, by exact name at the top of the repo, and the named chat templates
# (the weights: _weight_files).
CHECKPOINT_FILES = [
    "config.json",
    "generation_config.json",
    "model.safetensors.index.json",
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "chat_template.jinja",
    "additional_chat_templates/*.jinja",
    "special_tokens_map.json",
]
# The small trained model that ships inside the package: what runs when no model is named.
DEMO_MODEL_DIR = Path(__file__).parent / "demo_model"
REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class ModelNotFoundError(FileNotFoundError):
    """A path or repo id that cannot be turned into a checkpoint folder; the message says what to do."""


def resolve_checkpoint(path_or_repo_id) -> Path:
    """A local folder holding the checkpoint: the path itself, or a snapshot of the hub repo."""
    if not str(path_or_repo_id).strip():  # Path("") is the current folder: never what was meant
        raise ModelNotFoundError(f"the model is {str(path_or_repo_id)!r}; pass a local model folder or a hub repo id "
                                 f"like meta-llama/Llama-3.1-8B-Instruct")
    path = Path(os.path.expanduser(str(path_or_repo_id)))
    if path.exists():
        if not path.is_dir():
            raise ModelNotFoundError(f"{path} is a file; pass the folder that holds config.json and the weights")
        if checkpoint_file(path, "config.json") is None:
            raise ModelNotFoundError(f"{path} holds no config.json: it is not a Hugging Face model folder")
        return path
    text = str(path_or_repo_id)
    if not REPO_ID.match(text) or text.startswith((".", "/", "~")):
        raise ModelNotFoundError(
            f"{text} does not exist; pass a local model folder or a hub repo id like meta-llama/Llama-3.1-8B-Instruct"
        )
    return _download(text)


def _download(repo_id: str) -> Path:
    """Snapshot of the repo's needed files in the HF cache (config.json first: no weights for a non-LLaMA)."""
    import huggingface_hub

    with _hub_errors(repo_id):
        config = Path(huggingface_hub.hf_hub_download(repo_id, "config.json"))
    _check_llama(config, repo_id)
    with _hub_errors(repo_id):
        folder = Path(huggingface_hub.snapshot_download(repo_id, allow_patterns=CHECKPOINT_FILES))
        weights = _weight_files(folder)
        # exact names: glob.escape keeps a "[" in a file name from being read as a pattern
        folder = Path(huggingface_hub.snapshot_download(repo_id, allow_patterns=[glob.escape(w) for w in weights]))
    missing = [w for w in weights if checkpoint_file(folder, w) is None]
    if missing:
        from huggingface_hub import constants

        offline = " (or HF_HUB_OFFLINE is set and they were never downloaded)" if constants.HF_HUB_OFFLINE else ""
        if missing == ["model.safetensors"]:
            raise ModelNotFoundError(
                f"{repo_id} has no .safetensors weights{offline}; minillama reads only safetensors (convert the "
                f"checkpoint first)"
            )
        raise ModelNotFoundError(
            f"{repo_id}'s model.safetensors.index.json names shard(s) {missing[:3]} that the repo does not "
            f"hold{offline}"
        )
    return folder


def _weight_files(folder: Path) -> List[str]:
    """The weight files of a snapshot that holds the small files: the index's shards, or model.safetensors."""
    index = checkpoint_file(folder, "model.safetensors.index.json")
    if index is None:
        return ["model.safetensors"]
    return shard_names(read_json(index), index)


def _check_llama(config: Path, repo_id: str) -> None:
    try:
        model_type = json.loads(read_text(config)).get("model_type")
    except (json.JSONDecodeError, AttributeError):
        raise ModelNotFoundError(f"{repo_id}'s config.json is not a JSON object: not a Hugging Face model repo") from None
    if model_type != "llama":
        raise ModelNotFoundError(
            f"{repo_id} is a {model_type!r} model, not a LLaMA checkpoint; minillama runs model_type 'llama' "
            f"(e.g. meta-llama/Llama-3.1-8B-Instruct)"
        )


@contextmanager
def _hub_errors(repo_id: str):
    """huggingface_hub's exceptions as one-line ModelNotFoundErrors that say what to do."""
    from huggingface_hub import constants, errors

    try:
        yield
    except errors.GatedRepoError:
        raise ModelNotFoundError(
            f"{repo_id} is gated: accept its license on huggingface.co/{repo_id}, then log in with "
            f"`hf auth login` or set HF_TOKEN"
        ) from None
    except errors.RepositoryNotFoundError:
        raise ModelNotFoundError(
            f"{repo_id} was not found on the hub (if it is private, set HF_TOKEN); check the spelling"
        ) from None
    except errors.LocalEntryNotFoundError:
        why = "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else "the hub cannot be reached"
        raise ModelNotFoundError(
            f"{repo_id} is not in the local Hugging Face cache and {why}; download it once with network "
            f"access (unset HF_HUB_OFFLINE), or pass a local folder"
        ) from None
    except errors.EntryNotFoundError:
        raise ModelNotFoundError(f"{repo_id} has no config.json: it is not a Hugging Face model repo") from None
    except errors.HfHubHTTPError as e:
        first_line = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ModelNotFoundError(f"downloading {repo_id} failed: {first_line}") from None
