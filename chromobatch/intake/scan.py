"""Scan a lab's case folder into validated chromosome records, without touching the database.

A case folder holds chromosome crops (`CASE/<cell>/*.png|tif|bmp|jpg`, or flat `CASE/*` for one cell),
DICOM instances (each one chromosome crop; the cell is its SeriesInstanceUID), or whole metaphase images
(`CASE/cellNN.<ext>`, one image per cell, or `CASE/<cell>/metaphase.<ext>`; a DICOM instance may hold one
too), and optionally a `labels.csv` (file,label) and an `input.txt` naming the kind (`crops` or
`metaphase`) when automatic detection (chromobatch.intake.metaphase) should not decide. Metaphases are
read and checked here and cut into chromosomes later (chromobatch.segment.cut), by the service. A bad file
never stops the case: it is recorded with its reason and the rest goes on. Each file goes to the first
reader that accepts it (chromobatch.intake.readers).
"""

from __future__ import annotations

import hashlib
import os
import stat
from collections import Counter
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from chromobatch import validate_case_id
from chromobatch.errors import InputError
from chromobatch.intake.dicom import merge_case_tags
from chromobatch.intake.imaging import (
    MAX_PIXELS,
    ImageRejected,
    Polarity,
    detect_polarity,
    encode_png,
    normalise,
    to_dark_on_light,
)
from chromobatch.intake.metaphase import INPUT_KINDS, check_metaphase, classify_image, image_stats
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
    #: Cut from a whole metaphase (else None): instance number, box, outline and flags in the cell's image.
    instance: int | None = None
    box: list[int] | None = None
    polygon: list[list[int]] | None = None
    flags: dict[str, Any] | None = None
    #: `crop` as the PNG the database stores, encoded where the file was read (in a pool worker for a large
    #: case, so the write transaction does not spend its time encoding); None: encoded when stored.
    png: bytes | None = None


@dataclass
class Metaphase:
    """A whole metaphase image, read and checked, not yet cut into chromosomes."""

    file: str
    cell: str
    sha256: str
    #: The whole image, normalised: greyscale, dark on light (Q-band inverted), not cropped.
    grey: np.ndarray
    polarity: str
    order: tuple[Any, ...] = ()


@dataclass
class CellSource:
    """What a cell cut from a whole metaphase keeps of it (chromobatch.store.db.Cell's metaphase columns)."""

    file: str
    sha256: str
    image_png: bytes
    count: int
    segmentation: dict[str, Any] = field(default_factory=dict)

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
    #: Whole metaphase images, to be cut into `accepted` chromosomes (chromobatch.segment.cut).
    metaphases: list[Metaphase] = field(default_factory=list)
    cell_sources: dict[str, CellSource] = field(default_factory=dict)
    #: auto | crops | metaphase: how images were told apart (setting, or the case's input.txt).
    input_kind: str = "auto"

    def mixed_kinds(self) -> tuple[str, str] | None:
        """(a crop file, a metaphase file) when the folder holds both kinds; None otherwise."""
        crops = [a.file for a in self.accepted if a.instance is None]
        if crops and self.metaphases:
            return crops[0], self.metaphases[0].file
        return None

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


def case_input_kind(case_dir: Path, setting: str = "auto") -> str:
    """The case's own input.txt (crops | metaphase) wins over the setting; a bad value is an InputError."""
    if setting not in INPUT_KINDS:
        raise InputError(f"input = {setting!r} is not one of {', '.join(INPUT_KINDS)}")
    path = case_dir / "input.txt"
    if not path.is_file():
        return setting
    try:
        word = path.read_text(encoding="utf-8", errors="replace").strip().lower()
    except OSError as exc:
        raise InputError(f"{case_dir.name}/input.txt: cannot read ({exc.strerror or exc})") from exc
    if word not in ("crops", "metaphase"):
        raise InputError(f"{case_dir.name}/input.txt: says {word[:40]!r}; expected 'crops' or 'metaphase'",
                         hint="Write one word in it, or remove it to let chromobatch detect the input kind.")
    return word


#: Maps a function over chunks of a list in other processes, results in order (`ml.renderpool.RenderPool.map`):
#: `mapper(fn, items)` == `fn(items)`. scan_case reads the files of a large case through it.
Mapper = Callable[[Callable[[list[Any]], list[Any]], list[Any]], list[Any]]


def scan_case(case_dir: Path, *, polarity: str = "auto", max_pixels: int = MAX_PIXELS,
              input_kind: str = "auto", mapper: Mapper | None = None) -> ScannedCase:
    """Read and validate every file of a case folder; never raises for a bad file.

    input_kind: auto (each image is told apart by chromobatch.intake.metaphase), crops or metaphase; the
    case's input.txt overrides it.
    mapper: reads and decodes the files in other processes (a watcher's worker passes its pool); what is
    accepted, rejected and why is the same as in-process, because every decision that depends on another file
    (duplicates, DICOM tags that must agree, one metaphase per cell) is taken afterwards, here, in file order.
    """
    case_dir = Path(case_dir)
    if not case_dir.is_dir():
        raise InputError(f"{case_dir}: not a folder", hint="Pass the path of a case folder.")
    scanned = ScannedCase(case_id=validate_case_id(case_dir.name), path=case_dir.resolve())
    scanned.input_kind = case_input_kind(case_dir, input_kind)
    root = scanned.path
    jobs: list[_Job] = []

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
            if reason is not None:
                scanned.rejected[rel] = reason
                continue
            folder_cell = FLAT_CELL if here == root else here.relative_to(root).parts[0]
            jobs.append(_Job(full, rel, folder_cell, scanned.input_kind, polarity, max_pixels))
    reads = mapper(read_files, jobs) if mapper is not None and len(jobs) >= MIN_FOR_MAPPER else read_files(jobs)
    seen: dict[str, str] = {}
    kinds: Counter[str] = Counter()
    for job, got in zip(jobs, reads, strict=True):
        reason = _take(scanned, job, got, seen, kinds)
        if reason is not None:
            scanned.rejected[job.rel] = reason
    if scanned.metaphases:
        scanned.input_format = "metaphase"
    elif kinds["dicom"] and kinds["image"]:
        scanned.input_format = "mixed"
    elif kinds["dicom"]:
        scanned.input_format = "dicom"
    polarities = Counter([a.polarity for a in scanned.accepted] + [m.polarity for m in scanned.metaphases])
    if polarities:
        scanned.meta["polarity"] = polarities.most_common(1)[0][0]
    scanned.labels, problems = read_labels(root)
    scanned.label_problems += problems
    return scanned


#: Fewer files than this are read in-process even with a mapper: a round trip to a worker costs more.
MIN_FOR_MAPPER = 64


@dataclass
class _Job:
    """One file to read (picklable: it may go to another process)."""

    full: Path
    rel: str
    folder_cell: str  # the cell its folder names (FLAT_CELL for a file at the case's top)
    input_kind: str
    polarity: str
    max_pixels: int


@dataclass
class _Read:
    """What reading one file on its own gave; `_take` then decides against the rest of the case.

    `early` is a rejection of the file itself before any case-level check (unreadable, empty, not an image,
    undecodable); `late` one after decoding (not a usable crop or metaphase), which happens after the file's
    DICOM tags were checked against the case's, as in the in-process order."""

    early: str | None = None
    late: str | None = None
    sha256: str = ""
    unsupported: bool = False
    kind: str = ""
    tags: dict[str, Any] = field(default_factory=dict)
    cell: str = ""
    order: tuple[Any, ...] = ()
    metaphase: bool = False
    image: np.ndarray | None = None  # the normalised crop, or the whole metaphase dark-on-light
    polarity: str = ""
    png: bytes | None = None  # the normalised crop as stored


def read_files(jobs: list[_Job]) -> list[_Read]:
    """Read, decode and normalise each file on its own, in order (what each pool worker runs on its share)."""
    return [_read_file(j) for j in jobs]


def _read_file(job: _Job) -> _Read:
    try:
        st = job.full.stat()
        if not stat.S_ISREG(st.st_mode):
            return _Read(early="not a regular file (a pipe, device or socket)")
        if st.st_size > MAX_FILE_BYTES:
            return _Read(early=f"file too large ({st.st_size} bytes; limit {MAX_FILE_BYTES})")
        raw = job.full.read_bytes()
    except OSError as exc:
        return _Read(early=f"cannot read file: {exc.strerror or exc}")
    if not raw:
        return _Read(early="empty file (0 bytes)")
    out = _Read(sha256=hashlib.sha256(raw).hexdigest())
    reader = reader_for(raw, job.full.name)
    if reader is None:
        out.unsupported = True
        return out
    try:
        got = reader.read(raw, job.full.name, job.folder_cell, max_pixels=job.max_pixels)
    except ImageRejected as exc:
        out.early = str(exc)
        return out
    out.kind, out.tags, out.cell, out.order = reader.kind, dict(got.tags), got.cell, got.order
    try:
        if _is_metaphase(got.grey, job.input_kind):
            out.metaphase = True
            grey = got.grey
            if grey.ndim != 2 or min(grey.shape) < 32:
                out.late = f"not a metaphase: image too small ({grey.shape[-1]}x{grey.shape[0]} pixels)"
                return out
            pol: Polarity = detect_polarity(grey) if job.polarity == "auto" else job.polarity  # type: ignore[assignment]
            dol = to_dark_on_light(grey, pol)
            check_metaphase(dol, image_stats(dol))
            out.image, out.polarity = np.ascontiguousarray(dol), pol
        else:
            out.image, out.polarity = normalise(got.grey, job.polarity)
            out.png = encode_png(out.image)
    except ImageRejected as exc:
        out.late = str(exc)
    return out


def _take(scanned: ScannedCase, job: _Job, got: _Read, seen: dict[str, str], kinds: Counter[str]) -> str | None:
    """Add one read file to the case, or return why not: the checks that depend on the files before it."""
    if got.early is not None and not got.sha256:
        return got.early
    if got.sha256 in seen:
        return f"duplicate of {seen[got.sha256]} (same content)"
    if got.unsupported:
        return UNSUPPORTED.format(suffix=job.full.suffix)
    if got.early is not None:
        return got.early
    if got.tags:
        mismatch = merge_case_tags(scanned.meta, got.tags)
        if mismatch:
            return mismatch
    kinds[got.kind] += 1
    if got.late is not None:
        return got.late
    assert got.image is not None
    if got.metaphase:
        cell = printable(job.full.stem) if job.folder_cell == FLAT_CELL else job.folder_cell
        taken = next((m.file for m in scanned.metaphases if m.cell == cell), None)
        if taken is not None:
            return f"cell {cell} already has a metaphase image ({taken}); deliver one metaphase per cell"
        seen[got.sha256] = job.rel
        scanned.metaphases.append(Metaphase(file=job.rel, cell=cell, sha256=got.sha256, grey=got.image,
                                            polarity=got.polarity, order=(0, cell)))
        return None
    seen[got.sha256] = job.rel
    scanned.accepted.append(Accepted(file=job.rel, cell=got.cell, sha256=got.sha256, crop=got.image,
                                     polarity=got.polarity, cell_order=got.order, png=got.png))
    return None


def _is_metaphase(grey: np.ndarray, input_kind: str) -> bool:
    if input_kind != "auto":
        return input_kind == "metaphase"
    if grey.ndim != 2 or min(grey.shape) < 4:
        return False
    return classify_image(to_dark_on_light(grey, detect_polarity(grey))) == "metaphase"
