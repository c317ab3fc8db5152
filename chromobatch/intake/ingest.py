"""Turn a lab's case folder into validated chromosome records.

A case folder holds image files (`CASE/<cell>/*.png|tif|bmp|jpg`, or flat `CASE/*` for one cell) or
DICOM instances (each one chromosome crop; the cell is its SeriesInstanceUID), and optionally a
`labels.csv` (file,label). A bad file never stops the case: it is recorded with its reason and the rest
goes on. Ingest is idempotent: a file whose content is already stored for the case is skipped.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import stat
import warnings
from collections import Counter
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy import func
from sqlalchemy.orm import Session

from chromobatch import normalise_label, validate_case_id
from chromobatch.csvio import HeaderError, read_table
from chromobatch.errors import EmptyCase, InputError
from chromobatch.intake.imaging import MAX_PIXELS, ImageRejected, decode_grey, encode_png, normalise, rescale_to_uint8
from chromobatch.store.db import Case, Cell, Chromosome, Database, Label, RejectedFile, utcnow

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".png", ".tif", ".tiff", ".bmp", ".jpg", ".jpeg"}
#: Files a case folder may carry besides chromosomes; never treated as images.
SIDECAR_NAMES = {"labels.csv", "truth.json", "ready", "ready.txt"}
SIDECAR_SUFFIXES = {".csv", ".json", ".txt", ".md", ".xml", ".log", ".pdf", ".html"}
FLAT_CELL = "root"
#: No chromosome crop is this big; larger files are refused before they are read into memory.
MAX_FILE_BYTES = 64 * 1024 * 1024
#: DICOM tags kept as case metadata (what a report and a PACS need; nothing else is stored).
DICOM_CASE_TAGS = ("PatientID", "PatientName", "PatientBirthDate", "PatientSex", "AccessionNumber",
                   "StudyDate", "StudyTime", "StudyID", "StudyInstanceUID", "StudyDescription",
                   "InstitutionName", "ReferringPhysicianName")


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


@dataclass
class IngestResult:
    case_id: str
    case_pk: int
    created: bool
    added: int
    already_stored: int
    rejected: dict[str, str]
    cells: int
    labels_imported: int
    input_format: str
    label_problems: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------------------------------
# Reading files


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


def _is_sidecar(name: str) -> bool:
    lower = name.lower()
    return lower in SIDECAR_NAMES or Path(lower).suffix in SIDECAR_SUFFIXES


def _looks_dicom(raw: bytes, name: str) -> bool:
    return raw[128:132] == b"DICM" or name.lower().endswith(".dcm")


def read_dicom(raw: bytes, *, max_pixels: int = MAX_PIXELS) -> tuple[np.ndarray, dict[str, Any], str, tuple]:
    """One DICOM instance -> (greyscale uint8 array, case tags, cell UID, cell sort key)."""
    quiet_pydicom()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pydicom's value warnings quote tag values (patient data)
            return _read_dicom(raw, max_pixels)
    except ImageRejected:
        raise
    except Exception as exc:  # noqa: BLE001 - any malformed header is this file's problem, not the case's
        raise ImageRejected(f"unreadable DICOM header: {type(exc).__name__}") from exc


def quiet_pydicom() -> None:
    """pydicom logs and warns with the offending tag values (patient names, dates): keep them out of logs."""
    import pydicom

    pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE
    pydicom.config.settings.writing_validation_mode = pydicom.config.IGNORE
    logging.getLogger("pydicom").setLevel(logging.CRITICAL)


def _read_dicom(raw: bytes, max_pixels: int) -> tuple[np.ndarray, dict[str, Any], str, tuple]:
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        ds = pydicom.dcmread(io.BytesIO(raw), force=raw[128:132] != b"DICM")
    except (InvalidDicomError, EOFError, OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ImageRejected(f"unreadable DICOM: {type(exc).__name__}: {str(exc)[:120]}") from exc
    if "PixelData" not in ds:
        raise ImageRejected("DICOM instance has no pixel data")
    try:
        rows, cols = int(ds.Rows), int(ds.Columns)
        frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
    except (AttributeError, TypeError, ValueError) as exc:
        raise ImageRejected(f"unreadable DICOM image header: {exc}") from exc
    if rows * cols > max_pixels:
        raise ImageRejected(f"image too large ({cols}x{rows} pixels; limit {max_pixels} pixels)")
    if frames != 1:
        raise ImageRejected(f"multi-frame DICOM ({frames} frames); expected one chromosome crop per instance")
    ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    try:
        arr = ds.pixel_array
    except Exception as exc:  # pydicom raises RuntimeError/NotImplementedError/ValueError by handler
        if ts is not None and ts.is_compressed and not _decoder_available(ts):
            raise ImageRejected(
                f"compressed transfer syntax {ts.name} ({ts}) cannot be decoded: no decoder installed "
                "(install pylibjpeg with pylibjpeg-libjpeg/-openjpeg, or python-gdcm)") from exc
        raise ImageRejected(f"DICOM pixel data cannot be decoded (corrupt?): {exc}") from exc
    photometric = str(getattr(ds, "PhotometricInterpretation", "MONOCHROME2")).upper()
    arr = np.asarray(arr)
    if arr.ndim == 3 and arr.shape[-1] in (3, 4):
        rgb = arr[..., :3].astype(np.float64)
        arr = rgb @ np.array([0.299, 0.587, 0.114])
    elif arr.ndim != 2:
        raise ImageRejected(f"unexpected DICOM pixel array shape {arr.shape}")
    bits = int(getattr(ds, "BitsStored", 8) or 8)
    if arr.dtype == np.uint8 and photometric != "MONOCHROME1":
        grey = arr
    elif bits <= 8 and arr.min() >= 0 and arr.max() <= 255:
        grey = arr.astype(np.uint8)
    else:
        grey = rescale_to_uint8(arr)
    if photometric == "MONOCHROME1":
        grey = (255 - grey).astype(np.uint8)
    tags = {}
    for tag in DICOM_CASE_TAGS:
        value = getattr(ds, tag, None)
        if value not in (None, ""):
            tags[tag] = str(value)
    series = str(getattr(ds, "SeriesInstanceUID", "") or "") or "series-unknown"
    order = (int(getattr(ds, "SeriesNumber", 0) or 0), series)
    return grey, tags, series, order


def _decoder_available(ts: Any) -> bool:
    try:
        from pydicom.pixels import get_decoder

        return bool(get_decoder(ts).is_available)
    except (ImportError, NotImplementedError, ValueError):
        return False


def _read_labels(case_dir: Path, scanned: ScannedCase) -> None:
    path = case_dir / "labels.csv"
    if not path.is_file() or path.is_symlink():
        return
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        scanned.label_problems.append(f"labels.csv: unreadable ({exc})")
        return
    try:
        table = read_table(text, [("file", "label")])
    except HeaderError as exc:
        scanned.label_problems.append(f"labels.csv: {exc}")
        return
    scanned.label_problems += [f"labels.csv {p}" for p in table.problems]
    for lineno, row in table.rows:
        name = row.get("file", "").replace("\\", "/")
        if not name or name.startswith("/") or ".." in name.split("/"):
            scanned.label_problems.append(f"labels.csv line {lineno}: bad file name {name[:200]!r}")
            continue
        try:
            scanned.labels[name] = normalise_label(row.get("label", ""))
        except ValueError as exc:
            scanned.label_problems.append(f"labels.csv line {lineno}: {str(exc)[:200]}")


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
            if name.startswith(".") or _is_sidecar(name):
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
    _read_labels(root, scanned)
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
    try:
        if _looks_dicom(raw, full.name):
            grey, tags, cell, order = read_dicom(raw, max_pixels=max_pixels)
            mismatch = _merge_case_tags(scanned.meta, tags)
            if mismatch:
                return mismatch
            kinds["dicom"] += 1
        else:
            if full.suffix.lower() not in IMAGE_SUFFIXES and full.suffix:
                return f"unsupported file type {full.suffix!r} (expected PNG, TIFF, BMP, JPEG or DICOM)"
            grey = decode_grey(raw, max_pixels=max_pixels)
            cell = FLAT_CELL if here == root else here.relative_to(root).parts[0]
            order = (0, cell)
            kinds["image"] += 1
        crop, pol = normalise(grey, polarity)
    except ImageRejected as exc:
        return str(exc)
    seen[sha] = rel
    scanned.accepted.append(Accepted(file=rel, cell=cell, sha256=sha, crop=crop, polarity=pol,
                                     cell_order=order))
    return None


def _merge_case_tags(meta: dict[str, Any], tags: dict[str, Any]) -> str | None:
    """All instances of a case must belong to one patient; a mismatch is a rejection, not a merge."""
    dicom = meta.setdefault("dicom", {})
    for key in ("PatientID", "StudyInstanceUID"):
        if key in tags and key in dicom and tags[key] != dicom[key]:
            return f"{key} differs from the rest of the case"
    for key, value in tags.items():
        dicom.setdefault(key, value)
    return None


# --------------------------------------------------------------------------------------------------
# Storing


def content_hash(pairs: list[tuple[str, str]]) -> str:
    h = hashlib.sha256()
    for name, sha in sorted(pairs):
        h.update(f"{name}\0{sha}\n".encode())
    return h.hexdigest()


def store_scanned(database: Database, scanned: ScannedCase, *, status: str = "ingested") -> IngestResult:
    """Write a scanned case in one transaction; raises EmptyCase (after recording it) when nothing is usable."""
    with database.session() as s:
        result = store_in_session(s, scanned, status=status)
    log.info("case %s: %d chromosomes added, %d already stored, %d rejected, %d labels imported",
             result.case_id, result.added, result.already_stored, len(result.rejected), result.labels_imported)
    raise_if_empty(result, scanned)
    return result


def raise_if_empty(result: IngestResult, scanned: ScannedCase) -> None:
    if result.added + result.already_stored == 0:
        reasons = "; ".join(f"{f}: {r}" for f, r in sorted(scanned.rejected.items())[:10])
        raise EmptyCase(f"case {scanned.case_id} has no valid chromosome image"
                        + (f" (rejected: {reasons})" if reasons else " (the folder is empty)"))


def store_in_session(s: Session, scanned: ScannedCase, *, status: str = "ingested") -> IngestResult:
    """Store a scanned case inside the caller's transaction (the pipeline adds predictions to it)."""
    case = s.query(Case).filter_by(case_id=scanned.case_id).one_or_none()
    created = case is None
    if case is None:
        case = Case(case_id=scanned.case_id, source_path=str(scanned.path), status="received",
                    meta={}, received_at=utcnow())
        s.add(case)
        s.flush()
    case.source_path = str(scanned.path)
    case.input_format = scanned.input_format
    meta = dict(case.meta or {})
    meta.update(scanned.meta)
    meta.pop("label_problems", None)
    cells = {c.name: c for c in case.cells}
    existing = {sha: file for sha, file in
                s.query(Chromosome.sha256, Chromosome.source_file).filter(Chromosome.case_pk == case.id)}
    added = skipped = 0
    for _, name in sorted({(a.cell_order, a.cell) for a in scanned.accepted}):
        if name not in cells:
            cell = Cell(case_pk=case.id, name=name, index=len(cells))
            s.add(cell)
            cells[name] = cell
    s.flush()
    for a in scanned.accepted:
        if a.sha256 in existing:
            skipped += 1
            continue
        s.add(Chromosome(case_pk=case.id, cell_id=cells[a.cell].id, source_file=a.file, sha256=a.sha256,
                         width=int(a.crop.shape[1]), height=int(a.crop.shape[0]), polarity=a.polarity,
                         crop_png=encode_png(a.crop)))
        added += 1
    s.flush()
    old_rejects = {r.source_file: r for r in case.rejected}
    accepted_files = {a.file for a in scanned.accepted}
    for file, r in old_rejects.items():
        if file in accepted_files:
            s.delete(r)
    for file, reason in scanned.rejected.items():
        if file in old_rejects:
            old_rejects[file].reason = reason
        else:
            s.add(RejectedFile(case_pk=case.id, source_file=file, reason=reason))
    imported = _import_labels(s, case, scanned)
    if scanned.label_problems:  # after the import: it adds rows that name no stored chromosome
        meta["label_problems"] = scanned.label_problems[:100]
    case.meta = meta
    pairs = list(existing.items()) + [(a.sha256, a.file) for a in scanned.accepted if a.sha256 not in existing]
    case.content_sha256 = content_hash([(f, sha) for sha, f in pairs])
    if not pairs:
        case.status = "failed"
        case.error = "no valid chromosome image in the case"
    elif case.status in ("received", "failed", "ingested"):
        case.status = status
        case.error = None
    s.flush()
    return IngestResult(case_id=case.case_id, case_pk=case.id, created=created, added=added,
                        already_stored=skipped, rejected=dict(scanned.rejected), cells=len(cells),
                        labels_imported=imported, input_format=scanned.input_format,
                        label_problems=list(scanned.label_problems))


def _import_labels(s: Any, case: Case, scanned: ScannedCase) -> int:
    if not scanned.labels:
        return 0
    chroms = {c.source_file: c for c in s.query(Chromosome).filter(Chromosome.case_pk == case.id)}
    newest = newest_labels(s, case.id)
    imported = 0
    for file, label in scanned.labels.items():
        chrom = chroms.get(file)
        if chrom is None:
            if file not in scanned.rejected:
                scanned.label_problems.append(f"labels.csv: {file} is not a stored chromosome of the case")
            continue
        current = newest.get(chrom.id)
        if current is not None and (current.label == label or current.source == "reviewed"):
            continue  # a reviewer's decision is never overridden by a re-imported labels.csv
        s.add(Label(chromosome_id=chrom.id, label=label, source="imported", reviewer=None,
                    supersedes_id=current.id if current else None))
        imported += 1
    return imported


def newest_labels(s: Session, case_pk: int) -> dict[int, Label]:
    """The current label of every labelled chromosome of a case (the newest row; rows are never
    overwritten), in one query."""
    newest = (s.query(func.max(Label.id)).join(Chromosome, Chromosome.id == Label.chromosome_id)
              .filter(Chromosome.case_pk == case_pk).group_by(Label.chromosome_id))
    return {lab.chromosome_id: lab for lab in s.query(Label).filter(Label.id.in_(newest.scalar_subquery()))}


def ingest_case(database: Database, case_dir: Path, *, polarity: str = "auto",
                max_pixels: int = MAX_PIXELS) -> IngestResult:
    """Scan a case folder and store it; raises EmptyCase (after recording it) when nothing is usable."""
    scanned = scan_case(Path(case_dir), polarity=polarity, max_pixels=max_pixels)
    for file, reason in sorted(scanned.rejected.items()):
        log.warning("case %s: rejected %s: %s", scanned.case_id, file, reason)
    return store_scanned(database, scanned)
