"""Writing files that other processes read (watchers, PACS senders, a later training run)."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path


def atomic_write(path: Path, data: bytes | str | Callable[[Path], object], *, mode: int = 0o644) -> Path:
    """Write via a temporary file in the same folder, then rename: nobody ever sees half a file.

    `data` is the content, or a function that writes the temporary path it is given.
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
        os.chmod(tmp, mode)  # mkstemp makes 0600; these files are meant to be read by others
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path
