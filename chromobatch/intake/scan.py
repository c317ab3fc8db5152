"""Scan a lab's case folder into validated chromosome records, without touching the database.

A case folder holds image files (`CASE/<cell>/*.png|tif|bmp|jpg`, or flat `CASE/*` for one cell) or
DICOM instances (each one chromosome crop; the cell is its SeriesInstanceUID), and optionally a
`labels.csv` (file,label). A bad file never stops the case: it is recorded with its reason and the rest
goes on. Each file goes to the first reader that accepts it (chromobatch.intake.readers).
"""

from __future__ import annotations

import hashlib
import os
import stat
from collections import Counter
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from chromobatch import validate_case_id
from chromobatch.errors import InputError
from chromobatch.intake.dicom import merge_case_tags
from chromobatch.intake.imaging import MAX_PIXELS, ImageRejected, normalise
from chromobatch.intake.readers import UNSUPPORTED, reader_for
from chromobatch.intake.sidecars import is_sidecar, read_labels

FLAT_CELL = "root"

#: No chromosome crop is this big; larger files are refused before they are read into memory.
MAX_FILE_BYTES = 64 * 1024 * 1024

def cell_of_rejected(source_file: str, cell_names: Collection[str]) -> str | None:
    """The cell a rejected file belonged to, judged from its path as scan_case names cells.

    `CELL/x.png` belongs to CELL, a flat `x.png` to the flat cell; None when that cell holds no stored
    chromosome (a DICOM instance whose series could not be read, or a cell whose every file was rejected):
    then the file counts against the case, not against one cell.
    """
    name = source_file.split("/", 1)[0] if "/" in source_file else FLAT_CELL
    return name if name in cell_names else None

@dataclass
class Accepted:
    """One usable chromosome, decoded and normalised, not yet stored."""

    file: str
    cell: str
    sha256: str
    crop: np.ndarray
    polarity: str
    cell_order: tuple[Any, ...] = ()

@dataclass
class ScannedCase:
    """Everything read from a case folder; no database involved, so it can run in a worker."""

    case_id: str
    path: Path
    input_format: str = "images"
    accepted: list[Accepted] = field(default_factory=list)
    rejected: dict[str, str] = field(default_factory=dict)
    labels: dict[str, str] = field(default_factory=dict)
    label_problems: list[str] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)

def printable(name: str) -> str:
    """A file name as it can be stored and shown: undecodable bytes become U+FFFD."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "replace")

def _bad_name(name: str) -> str | None:
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return "file name is not valid UTF-8"
    if "\\" in name or "/" in name:
        return "file name contains a path separator"
    if ".." in name:
        return "file name contains '..'"
    if any(ord(ch) < 32 for ch in name):
        return "file name contains control characters"
    return None


def scan_case(case_dir: Path, *, polarity: str = "auto", max_pixels: int = MAX_PIXELS) -> ScannedCase:
    """Read and validate every file of a case folder; never raises for a bad file."""
    case_dir = Path(case_dir)
    if not case_dir.is_dir():
        raise InputError(f"{case_dir}: not a folder", hint="Pass the path of a case folder.")
    scanned = ScannedCase(case_id=validate_case_id(case_dir.name), path=case_dir.resolve())
    root = scanned.path
    seen: dict[str, str] = {}
    kinds: Counter[str] = Counter()
    def unreadable(err: OSError) -> None:
        where = Path(err.filename or root)
        rel = where.relative_to(root).as_posix() if where.is_relative_to(root) else str(where)
        scanned.rejected[rel or "."] = f"cannot read folder: {err.strerror or err}"

    for dirpath, dirnames, filenames in os.walk(root, followlinks=False, onerror=unreadable):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        here = Path(dirpath)
        for d in list(dirnames):
            reason = _bad_name(d)
            if reason is not None:
                dirnames.remove(d)
                scanned.rejected[printable((here / d).relative_to(root).as_posix())] = f"folder skipped: {reason}"
        for d in list(dirnames):
            if (here / d).is_symlink():
                dirnames.remove(d)
                target = (here / d).resolve()
                if not target.is_relative_to(root):
                    scanned.rejected[(here / d).relative_to(root).as_posix()] = \
                        "symlinked folder points outside the case folder"
        for name in sorted(filenames):
            full = here / name
            rel = printable(full.relative_to(root).as_posix())
            if name.startswith(".") or is_sidecar(name):
                continue
            reason = _bad_name(name)
            if reason is None and full.is_symlink():
                target = full.resolve()
                if not target.is_relative_to(root):
                    reason = "symlink points outside the case folder"
                elif not target.is_file():
                    reason = "symlink does not point to a file"
            if reason is None:
                reason = _read_one(full, rel, root, here, scanned, seen, kinds, polarity, max_pixels)
            if reason is not None:
                scanned.rejected[rel] = reason
    if kinds["dicom"] and kinds["image"]:
        scanned.input_format = "mixed"
    elif kinds["dicom"]:
        scanned.input_format = "dicom"
    polarities = Counter(a.polarity for a in scanned.accepted)
    if polarities:
        scanned.meta["polarity"] = polarities.most_common(1)[0][0]
    scanned.labels, problems = read_labels(root)
    scanned.label_problems += problems
    return scanned


def _read_one(full: Path, rel: str, root: Path, here: Path, scanned: ScannedCase, seen: dict[str, str],
              kinds: Counter[str], polarity: str, max_pixels: int) -> str | None:
    """Decode one file into scanned.accepted; return a rejection reason instead of raising."""
    try:
        st = full.stat()
        if not stat.S_ISREG(st.st_mode):
            return "not a regular file (a pipe, device or socket)"
        if st.st_size > MAX_FILE_BYTES:
            return f"file too large ({st.st_size} bytes; limit {MAX_FILE_BYTES})"
        raw = full.read_bytes()
    except OSError as exc:
        return f"cannot read file: {exc.strerror or exc}"
    if not raw:
        return "empty file (0 bytes)"
    sha = hashlib.sha256(raw).hexdigest()
    if sha in seen:
        return f"duplicate of {seen[sha]} (same content)"
    reader = reader_for(raw, full.name)
    if reader is None:
        return UNSUPPORTED.format(suffix=full.suffix)
    try:
        got = reader.read(raw, full.name, FLAT_CELL if here == root else here.relative_to(root).parts[0],
                          max_pixels=max_pixels)
        if got.tags:
            mismatch = merge_case_tags(scanned.meta, got.tags)
            if mismatch:
                return mismatch
        kinds[reader.kind] += 1
        crop, pol = normalise(got.grey, polarity)
    except ImageRejected as exc:
        return str(exc)
    seen[sha] = rel
    scanned.accepted.append(Accepted(file=rel, cell=got.cell, sha256=sha, crop=crop, polarity=pol,
                                     cell_order=got.order))
    return None
