"""Finding a checkpoint: a local folder, or a Hugging Face hub repo id fetched with huggingface_hub."""
import os
import re
from pathlib import Path

# Only what minillama reads: never the .bin / .pth / original/ copies of the weights.
CHECKPOINT_FILES = [
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "model.safetensors.index.json",
    "model-*.safetensors",
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
]
# The small trained model that ships inside the package: what runs when no model is named.
DEMO_MODEL_DIR = Path(__file__).parent / "demo_model"
REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class ModelNotFoundError(FileNotFoundError):
    """A path or repo id that cannot be turned into a checkpoint folder; the message says what to do."""


def resolve_checkpoint(path_or_repo_id) -> Path:
    """A local folder holding the checkpoint: the path itself, or a snapshot of the hub repo."""
    path = Path(os.path.expanduser(str(path_or_repo_id)))
    if path.exists():
        if not path.is_dir():
            raise ModelNotFoundError(f"{path} is a file; pass the folder that holds config.json and the weights")
        if not (path / "config.json").exists():
            raise ModelNotFoundError(f"{path} holds no config.json: it is not a Hugging Face model folder")
        return path
    text = str(path_or_repo_id)
    if not REPO_ID.match(text) or text.startswith((".", "/", "~")):
        raise ModelNotFoundError(
            f"{text} does not exist; pass a local model folder or a hub repo id like meta-llama/Llama-3.1-8B-Instruct"
        )
    return _download(text)


def _download(repo_id: str) -> Path:
    import huggingface_hub
    from huggingface_hub import errors

    try:
        folder = huggingface_hub.snapshot_download(repo_id, allow_patterns=CHECKPOINT_FILES)
    except errors.GatedRepoError:
        raise ModelNotFoundError(
            f"{repo_id} is gated: accept its license on huggingface.co, then log in with `hf auth login` "
            f"or set HF_TOKEN"
        ) from None
    except errors.RepositoryNotFoundError:
        raise ModelNotFoundError(
            f"{repo_id} was not found on the hub (or is private: set HF_TOKEN); check the spelling"
        ) from None
    except errors.LocalEntryNotFoundError:
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
        why = "HF_HUB_OFFLINE is set" if offline else "the hub cannot be reached"
        raise ModelNotFoundError(
            f"{repo_id} is not in the local Hugging Face cache and {why}; connect to the network once "
            f"(or pass a local folder)"
        ) from None
    except errors.HfHubHTTPError as e:
        raise ModelNotFoundError(f"downloading {repo_id} failed: {e}") from None
    folder = Path(folder)
    if not (folder / "config.json").exists():
        raise ModelNotFoundError(f"{repo_id} has no config.json: it is not a Hugging Face model repo")
    return folder
