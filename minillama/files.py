"""The files minillama reads and writes, checked before use.

Reading a checkpoint: a file that is absent is ``None`` to the caller, but a directory or a dangling
symlink in its place is an error naming it (a broken download must not read as "no such file"), as
is text that is not UTF-8. The shard index may name only ``.safetensors`` files in the model folder
itself: never a path, never ``..``.

Writing (``/save``): :func:`atomic_write_text` writes a temporary file in the target's folder and
renames it over the target, so a reader sees the old file or the new one, never half of one, and
a failed write leaves the old file as it was.
"""
import json
import os
import tempfile
from pathlib import Path
from typing import Callable, List, Optional


def checkpoint_file(folder, name: str) -> Optional[Path]:
    """``folder / name`` if it is there, None if it is not; a directory or a dangling symlink in
    its place is a ValueError naming it."""
    path = Path(folder) / name
    if path.is_symlink() and not path.exists():
        raise ValueError(
            f"{path} is a dangling symlink (to {os.readlink(path)}): the download is incomplete; download the "
            f"checkpoint again"
        )
    if not path.exists():
        return None
    if path.is_dir():
        raise ValueError(f"{path} is a directory; the checkpoint needs a file of that name there")
    return path


def read_text(path) -> str:
    """A checkpoint's text file as UTF-8; a missing file is a FileNotFoundError, anything else
    unreadable (a directory, a dangling symlink, bytes that are not UTF-8) a ValueError naming it."""
    path = Path(path)
    if checkpoint_file(path.parent, path.name) is None:
        raise FileNotFoundError(f"{path} does not exist")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 text (byte {e.start} is 0x{e.object[e.start]:02x})") from None
    except OSError as e:
        raise ValueError(f"cannot read {path}: {e.strerror or e}") from None


def shard_names(index: dict, path) -> List[str]:
    """The shard files a ``model.safetensors.index.json`` (already parsed) names, sorted.

    Each must be a plain ``.safetensors`` file name: the shards live in the model folder itself.
    """
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise ValueError(
            f"{path} is not a valid safetensors index: it needs a non-empty 'weight_map' object "
            f"{{tensor name: shard file name}}"
        )
    names = set()
    for tensor, name in weight_map.items():
        if not isinstance(name, str):
            raise ValueError(f"{path}: weight_map[{tensor!r}] must be a file name, got {name!r}")
        if (name in ("", ".", "..") or "/" in name or "\\" in name or "\0" in name or os.path.isabs(name)
                or not name.endswith(".safetensors")):
            raise ValueError(
                f"{path}: weight_map[{tensor!r}] names {name!r}, not a .safetensors file in the model folder; "
                f"shards are read only from the folder itself (no paths, no '..')"
            )
        names.add(name)
    return sorted(names)


def atomic_write_text(path, text: str, may_replace: Optional[Callable[[Path], None]] = None) -> None:
    """Write ``text`` (UTF-8) to ``path`` through a temporary file in the same folder and a rename.

    Args:
        may_replace: called with the existing file before anything is written; it raises to
            refuse replacing that file.
    A symlink is followed (the file it points to is replaced, the link stays); a new file gets the
    usual permissions (0666 less the umask), a replaced one keeps its own.
    """
    target = Path(os.path.realpath(path))
    if target.is_dir():
        raise IsADirectoryError(f"{path} is a directory")
    if not target.parent.is_dir():
        raise FileNotFoundError(f"cannot write {path}: the folder {target.parent} does not exist")
    mode = None
    if target.exists():
        if may_replace is not None:
            may_replace(target)
        mode = target.stat().st_mode & 0o7777
    try:
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    except OSError as e:
        raise type(e)(f"cannot write {path}: {e.strerror}") from None
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        if mode is None:
            umask = os.umask(0)
            os.umask(umask)
            mode = 0o666 & ~umask
        os.chmod(tmp, mode)
        os.replace(tmp, target)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def read_json(path) -> dict:
    """A checkpoint's JSON file, which must hold an object; anything else is a ValueError naming the file."""
    path = Path(path)
    try:
        data = json.loads(read_text(path))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} holds a JSON {json_type(data)}; expected an object ({{\"key\": value, ...}})")
    return data


def json_type(value) -> str:
    """The JSON name of a parsed value's type ("object", "array", ...), for error messages."""
    names = {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null",
             int: "number", float: "number"}
    return names.get(type(value), type(value).__name__)
