"""Where the watcher's case folders live and how they move (incoming -> processed/ or failed/).

Relative processed_dir, failed_dir and reports_dir settings are taken relative to the incoming folder's
*parent* (`/data/incoming` -> `/data/processed`), which keeps them out of the watched tree. Folders are never
deleted: a name clash gets a suffix (`CASE.1`, `CASE.2`, ...), and a move across file systems copies under a
hidden name first, so a kill mid-move never leaves half a case where a lab would take it for a whole one.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from chromobatch.config import Settings
from chromobatch.errors import ConfigError, InputError, JobError
from chromobatch.store.db import utcnow

log = logging.getLogger(__name__)

#: Written into (or, for a stray file, beside) what lands in failed/, so the lab sees why without the log.
ERROR_FILE = "chromobatch-error.txt"


@dataclass(frozen=True)
class WatchPaths:
    incoming: Path
    processed: Path
    failed: Path
    reports: Path


def resolve_paths(incoming: str | Path, settings: Settings, reports_dir: str | Path | None = None) -> WatchPaths:
    """Absolute folders; relative settings are taken relative to the incoming folder's parent."""
    inc = Path(incoming).expanduser().resolve()
    if not inc.is_dir():
        raise InputError(f"incoming folder does not exist: {inc}", hint="Create it, or pass an existing folder.")

    def beside(value: str) -> Path:
        p = Path(value).expanduser()
        return (p if p.is_absolute() else inc.parent / p).resolve()

    reports = Path(reports_dir).expanduser().resolve() if reports_dir else beside(settings.reports_dir)
    paths = WatchPaths(inc, beside(settings.processed_dir), beside(settings.failed_dir), reports)
    for name in ("processed", "failed"):
        if getattr(paths, name) == inc:
            raise ConfigError(f"{name}_dir must differ from the incoming folder ({inc})")
    return paths


def move_case(folder: Path, dest_root: Path) -> Path | None:
    """Move a case folder under dest_root, adding `.N` on a name clash; None when the folder is gone."""
    try:
        dest_root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise JobError(f"cannot create {dest_root}: {exc.strerror or exc}") from exc
    for n in range(10_000):
        target = dest_root / (folder.name if n == 0 else f"{folder.name}.{n}")
        if os.path.lexists(target):
            continue
        try:
            os.rename(folder, target)
            return target
        except FileNotFoundError:
            return None
        except OSError as exc:
            if exc.errno in (errno.EEXIST, errno.ENOTEMPTY):
                continue  # another process took this name just now
            if exc.errno != errno.EXDEV:
                raise JobError(f"cannot move {folder} to {target}: {exc.strerror}") from exc
            if not folder.exists():
                return None
            return _move_across_filesystems(folder, target)
    raise JobError(f"cannot move {folder}: 10000 folders named {folder.name}.N already in {dest_root}")


def _move_across_filesystems(folder: Path, target: Path) -> Path:
    """Copy under a hidden name, rename into place, then remove the source: a kill leaves no half folder."""
    tmp = target.with_name(f".{target.name}.partial-{os.getpid()}")
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        if folder.is_dir():
            shutil.copytree(folder, tmp, symlinks=True)
            os.rename(tmp, target)
            shutil.rmtree(folder)
        else:  # a stray file where a case folder was expected
            shutil.copy2(folder, tmp)
            os.rename(tmp, target)
            folder.unlink()
    except (OSError, shutil.Error) as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if tmp.is_file():
            tmp.unlink()
        raise JobError(f"cannot move {folder} to {target}: {exc}") from exc
    return target


def append_reason(file: Path, message: str) -> None:
    """Append one timestamped line to `file`; an OSError is left to the caller, who knows what to say."""
    with file.open("a", encoding="utf-8") as fh:
        fh.write(f"{utcnow().isoformat(timespec='seconds')} {message}\n")


def write_error_file(folder: Path, message: str) -> None:
    """Say why inside a folder moved to failed/; a failure to write is logged, never raised (the move stands)."""
    try:
        append_reason(folder / ERROR_FILE, message)
    except OSError as exc:
        log.warning("cannot write %s into %s: %s", ERROR_FILE, folder, exc)
