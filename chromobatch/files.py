"""Writing files that other processes read (watchers, PACS senders, a later training run).

Reports and Encapsulated PDFs carry patient names, IDs and birth dates: every file is created with the
process umask (0o666 & ~umask, like open() would), never wider. The systemd units set UMask=0027; the
file_mode setting sets the umask for a whole command (chromobatch.cli).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from chromobatch.errors import ModelError


def current_umask() -> int:
    """The process umask, read without changing it where Linux tells it (/proc/self/status, "Umask:").

    Elsewhere (or without /proc) it is read by setting it and setting it back, which is racy only against
    another thread creating a file at that very moment.
    """
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o077)
    os.umask(mask)
    return mask


def umask_for_mode(mode: int) -> int:
    """The umask that creates files with `mode` (& 0o666) and folders with `mode` plus x where r is set."""
    folders = mode | ((mode & 0o444) >> 2)
    return 0o777 & ~folders


def atomic_write(path: Path, data: bytes | str | Callable[[Path], object], *, mode: int = 0o666) -> Path:
    """Write via a temporary file in the same folder, then rename: nobody ever sees half a file.

    `data` is the content, or a function that writes the temporary path it is given. The file gets
    `mode` & ~umask, as if open() had created it (mkstemp would leave 0600).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        if callable(data):
            data(Path(tmp))
        elif isinstance(data, str):
            Path(tmp).write_text(data, encoding="utf-8")
        else:
            Path(tmp).write_bytes(data)
        os.chmod(tmp, mode & 0o777 & ~current_umask())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def sha256_file(path: Path) -> str:
    """A file's checksum, read in 1 MiB chunks (model weights, converted models)."""
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_json_meta(path: Path, *, fmt: str, version: int, what: str) -> dict[str, Any]:
    """A model folder's model.json with its format and version checked: shared by the classifier's folders
    (chromobatch.ml.folders) and the segmenter's (chromobatch.segment.learned), which refuse the same way;
    here, not in ml, so that loading a segmenter does not import timm."""
    if not path.is_file():
        raise ModelError(f"{path}: missing (a {what} folder holds model.safetensors + {path.name})")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelError(f"{path}: not valid JSON: {exc}") from exc
    if not isinstance(meta, dict) or meta.get("format") != fmt:
        raise ModelError(f"{path}: not a chromobatch {what} description (format != {fmt!r})")
    if int(meta.get("format_version", 0)) > version:
        raise ModelError(f"{path}: format version {meta['format_version']} is newer than this chromobatch")
    return meta


def load_weights(folder: Path, what: str) -> dict[str, Any]:
    """model.safetensors of a model folder as CPU tensors (never a pickle); ModelError names the file.
    Shared by the classifier's and the segmenter's folders."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = folder / "model.safetensors"
    if not path.is_file():
        raise ModelError(f"{path}: missing (a {what} folder holds {path.name} + model.json)")
    try:
        return dict(load_file(str(path), device="cpu"))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise ModelError(f"{path}: corrupt or not a safetensors file: {exc}") from exc
