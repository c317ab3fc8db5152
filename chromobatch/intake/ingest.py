"""Store a scanned case: cases, cells, chromosomes, rejected files and imported labels, in one transaction.

Ingest is idempotent: a file whose content is already stored for the case is skipped; a file rejected
earlier and accepted now loses its rejection; a reviewer's label is never overridden by a labels.csv.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import insert
from sqlalchemy.orm import Session

from chromobatch.errors import EmptyCase, InputError
from chromobatch.intake.imaging import MAX_PIXELS, encode_png
from chromobatch.intake.scan import ScannedCase, scan_case
from chromobatch.store.db import Case, Cell, Chromosome, Database, Label, RejectedFile, utcnow
from chromobatch.store.queries import newest_labels
from chromobatch.store.states import CaseStatus, LabelSource

log = logging.getLogger(__name__)

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

def content_hash(pairs: list[tuple[str, str]]) -> str:
    h = hashlib.sha256()
    for name, sha in sorted(pairs):
        h.update(f"{name}\0{sha}\n".encode())
    return h.hexdigest()

def store_scanned(database: Database, scanned: ScannedCase, *, status: str = CaseStatus.INGESTED) -> IngestResult:
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

def store_in_session(s: Session, scanned: ScannedCase, *, status: str = CaseStatus.INGESTED) -> IngestResult:
    """Store a scanned case inside the caller's transaction (the pipeline adds predictions to it)."""
    case = s.query(Case).filter_by(case_id=scanned.case_id).one_or_none()
    created = case is None
    if case is None:
        case = Case(case_id=scanned.case_id, source_path=str(scanned.path), status=CaseStatus.RECEIVED,
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
    for name, src in scanned.cell_sources.items():
        target = cells.get(name)
        if target is not None and target.source_sha256 is None:  # a metaphase's cell keeps its first segmentation
            target.source_file, target.source_sha256, target.image_png = src.file, src.sha256, src.image_png
            target.count, target.segmentation = src.count, src.segmentation
    s.flush()
    rows: list[dict[str, Any]] = []
    for a in scanned.accepted:
        if a.sha256 in existing:
            skipped += 1
            continue
        rows.append({"case_pk": case.id, "cell_id": cells[a.cell].id, "source_file": a.file, "sha256": a.sha256,
                     "width": int(a.crop.shape[1]), "height": int(a.crop.shape[0]), "polarity": a.polarity,
                     "crop_png": a.png if a.png is not None else encode_png(a.crop), "instance": a.instance,
                     "box": a.box, "polygon": a.polygon, "flags": a.flags})
    if rows:  # one multi-row INSERT: a case's chromosomes need no unit of work (read back by query)
        s.execute(insert(Chromosome), rows)
    added = len(rows)
    s.flush()
    old_rejects = {r.source_file: r for r in case.rejected}
    accepted_files = {a.file for a in scanned.accepted} | {m.file for m in scanned.metaphases}
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
        case.status = CaseStatus.FAILED
        case.error = "no valid chromosome image in the case"
    elif case.status in (CaseStatus.RECEIVED, CaseStatus.FAILED, CaseStatus.INGESTED):
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
        if current is not None and (current.label == label or current.source == LabelSource.REVIEWED):
            continue  # a reviewer's decision is never overridden by a re-imported labels.csv
        s.add(Label(chromosome_id=chrom.id, label=label, source=LabelSource.IMPORTED, reviewer=None,
                    supersedes_id=current.id if current else None))
        imported += 1
    return imported

def ingest_case(database: Database, case_dir: Path, *, polarity: str = "auto",
                max_pixels: int = MAX_PIXELS) -> IngestResult:
    """Scan a case folder and store it; raises EmptyCase (after recording it) when nothing is usable."""
    scanned = scan_case(Path(case_dir), polarity=polarity, max_pixels=max_pixels)
    if scanned.metaphases:
        raise InputError(f"case {scanned.case_id} holds whole metaphase images (e.g. {scanned.metaphases[0].file}), "
                         "which must be cut into chromosomes first",
                         hint="Use `chromobatch process CASE_DIR`, which segments, classifies and stores them.")
    for file, reason in sorted(scanned.rejected.items()):
        log.warning("case %s: rejected %s: %s", scanned.case_id, file, reason)
    return store_scanned(database, scanned)
