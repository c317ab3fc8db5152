"""The review loop: a cytogeneticist confirms or corrects chromosome labels; every change is kept.

Labels are never overwritten. Each change adds a Label row (source="reviewed", the reviewer, the time) whose
`supersedes_id` points at the newest row before it, so the audit trail (`history`) shows who changed what,
when, and from which value. The newest row of a chromosome is its current label (`store.queries.newest_labels`).

Addressing a chromosome: the cell is its name or its 1-based number in case order (`Cell.index`, as in the
report; a cell whose name is the given text wins over a number). The chromosome is its 1-based number within
the cell, counted in the order of the source file paths (plain string order, the order `ls` shows and ingest
stores them), or its source file path / file name.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from sqlalchemy import func
from sqlalchemy.orm import Session

from chromobatch import normalise_label
from chromobatch.csvio import HeaderError, read_table
from chromobatch.errors import (
    CaseNotFound,
    CaseSigned,
    CellNotFound,
    ChromosomeNotFound,
    CorrectionsFileError,
    InvalidLabel,
    ReviewError,
)
from chromobatch.store.db import Case, Cell, Chromosome, Database, Label, Prediction, utcnow
from chromobatch.store.queries import newest_labels
from chromobatch.store.states import LabelSource, ReviewState

log = logging.getLogger(__name__)

MAX_REVIEWER = 128


@dataclass(frozen=True)
class LabelChange:
    """One reviewed label written (or not, when it already was the reviewed label)."""

    cell: str
    cell_number: int
    number: int
    source_file: str
    previous: str | None
    previous_source: str | None
    label: str
    changed: bool


@dataclass(frozen=True)
class HistoryEntry:
    """One row of the audit trail."""

    label_id: int
    at: datetime
    cell: str
    cell_number: int
    number: int
    source_file: str
    label: str
    source: str
    reviewer: str | None
    previous: str | None
    supersedes_id: int | None


@dataclass(frozen=True)
class ChromosomeRef:
    """A chromosome as the reviewer sees it: cell number/name and its number within the cell."""

    chromosome_id: int
    cell: str
    cell_number: int
    number: int
    source_file: str


# --------------------------------------------------------------------------------------------------
# Look-ups


def _check_reviewer(reviewer: str) -> str:
    name = (reviewer or "").strip()
    if not name:
        raise ReviewError("a reviewer name is required for every label change", hint="Pass --reviewer NAME.")
    if len(name) > MAX_REVIEWER or any(ord(ch) < 32 for ch in name):
        raise ReviewError(f"reviewer name must be at most {MAX_REVIEWER} printable characters")
    return name


def _label(text: str) -> str:
    try:
        return normalise_label(text)
    except ValueError as exc:
        raise InvalidLabel(str(exc)) from None


def get_case(s: Session, case_id: str, *, lock: bool = False) -> Case:
    """The case row; `lock` holds it (PostgreSQL FOR UPDATE) so two reviewers' changes chain, never fork.

    `lock` is asked for by every label change, so it also refuses a case signed off in the web review: it is
    read-only until reopened, from the CLI as from the browser."""
    q = s.query(Case).filter_by(case_id=case_id)
    case = (q.with_for_update() if lock else q).one_or_none()
    if case is None:
        raise CaseNotFound(f"case {case_id} not found in the database")
    if lock and case.review_state == ReviewState.SIGNED:
        raise CaseSigned(f"case {case_id} is signed off and read-only")
    return case


def metaphase_counts(database: Database, case_id: str) -> list[tuple[int, str, str, int, int]]:
    """For each cell cut from a whole metaphase: (cell number, cell, its file, chromosomes counted, clusters
    flagged for review); a count is a result of its own, shown before the labels are."""
    with database.session() as s:
        case = get_case(s, case_id)
        cells = s.query(Cell).filter(Cell.case_pk == case.id).order_by(Cell.index, Cell.id).all()
        return [(number, c.name, c.source_file or "", int(c.count or 0),
                 len((c.segmentation or {}).get("clusters") or []))
                for number, c in enumerate(cells, start=1) if c.source_sha256 is not None]


def case_chromosomes(s: Session, case: Case) -> list[ChromosomeRef]:
    """Every chromosome of a case with its cell number and its number within the cell (the stable order)."""
    cells = s.query(Cell).filter(Cell.case_pk == case.id).order_by(Cell.index, Cell.id).all()
    rows = (s.query(Chromosome.id, Chromosome.cell_id, Chromosome.source_file, Chromosome.instance)
            .filter(Chromosome.case_pk == case.id).all())
    by_cell: dict[int, list[tuple[int, str, int]]] = {}
    for cid, cell_id, source, instance in rows:
        # crops by file name; chromosomes cut from a metaphase by their instance number (cell01.png#2 before #10)
        by_cell.setdefault(cell_id, []).append((instance or 0, source, cid))
    out: list[ChromosomeRef] = []
    for cell_number, cell in enumerate(cells, start=1):
        for number, (_, source, cid) in enumerate(sorted(by_cell.get(cell.id, [])), start=1):
            out.append(ChromosomeRef(cid, cell.name, cell_number, number, source))
    return out


def _find_cell(refs: list[ChromosomeRef], case: Case, cell: str) -> tuple[str, int]:
    cells = sorted({(r.cell_number, r.cell) for r in refs})
    for number, name in cells:
        if name == cell:
            return name, number
    text = str(cell).strip()
    if text.isdigit():
        n = int(text)
        for number, name in cells:
            if number == n:
                return name, number
        raise CellNotFound(f"case {case.case_id} has no cell number {n} (it has {len(cells)} cells)")
    raise CellNotFound(f"case {case.case_id} has no cell named {cell!r}")


def find_chromosome(refs: list[ChromosomeRef], case: Case, cell: str | None, chromosome: str) -> ChromosomeRef:
    """Resolve (cell, chromosome number or file name); a file path alone needs no cell."""
    text = str(chromosome).strip()
    if cell is None or str(cell).strip() == "":
        hits = [r for r in refs if r.source_file == text]
        if not hits:
            raise ChromosomeNotFound(f"case {case.case_id} has no chromosome file {text!r}"
                                     + ("" if not text.isdigit() else " (a number needs --cell)"))
        return hits[0]
    name, _ = _find_cell(refs, case, str(cell))
    in_cell = [r for r in refs if r.cell == name]
    if text.isdigit():
        n = int(text)
        for r in in_cell:
            if r.number == n:
                return r
        raise ChromosomeNotFound(f"cell {name} of case {case.case_id} has no chromosome number {n} "
                                 f"(it has {len(in_cell)})")
    hits = [r for r in in_cell if r.source_file == text] or [r for r in in_cell if Path(r.source_file).name == text]
    if len(hits) != 1:
        raise ChromosomeNotFound(f"cell {name} of case {case.case_id} has no chromosome file {text!r}")
    return hits[0]


def _newest_labels(s: Session, case: Case) -> dict[int, Label]:
    """The current (newest) label row of every labelled chromosome of a case, in one query."""
    return newest_labels(s, case.id)


def _write(s: Session, ref: ChromosomeRef, label: str, reviewer: str, current: Label | None,
           when: datetime) -> LabelChange:
    unchanged = current is not None and current.source == LabelSource.REVIEWED and current.label == label
    if not unchanged:
        row = Label(chromosome_id=ref.chromosome_id, label=label, source=LabelSource.REVIEWED, reviewer=reviewer,
                    created_at=when, supersedes_id=current.id if current is not None else None)
        s.add(row)
    return LabelChange(cell=ref.cell, cell_number=ref.cell_number, number=ref.number, source_file=ref.source_file,
                       previous=current.label if current is not None else None,
                       previous_source=current.source if current is not None else None,
                       label=label, changed=not unchanged)


# --------------------------------------------------------------------------------------------------
# Operations


def set_label(database: Database, case_id: str, *, cell: str | None, chromosome: str, label: str,
              reviewer: str) -> LabelChange:
    """Record a reviewer's label for one chromosome (a no-op when it already is that reviewed label)."""
    reviewer = _check_reviewer(reviewer)
    new = _label(label)
    with database.session() as s:
        case = get_case(s, case_id, lock=True)
        ref = find_chromosome(case_chromosomes(s, case), case, cell, chromosome)
        current = _newest_labels(s, case).get(ref.chromosome_id)
        change = _write(s, ref, new, reviewer, current, utcnow())
    log.info("case %s cell %d chromosome %d: label %s -> %s (%s)", case_id, change.cell_number, change.number,
             change.previous, change.label, "changed" if change.changed else "unchanged")
    return change


@dataclass(frozen=True)
class Relabel:
    """One label set by chromosome id (the web review): the change, the new row's id, and the row someone else
    wrote after the editor's page was loaded (None when the editor saw the newest label)."""

    change: LabelChange
    label_id: int | None
    conflict: Label | None


def relabel_in_session(s: Session, case: Case, wanted: dict[int, str], *, reviewer: str,
                       seen: dict[int, int | None]) -> list[Relabel]:
    """Set labels by chromosome id inside the caller's transaction (which holds the case: `get_case(lock=True)`).

    Optimistic check: `seen` is the newest label id each chromosome had when the editor's page was loaded. A
    different newest id means another reviewer changed it since; the new row still chains onto that newest row
    (never forks the trail, both rows stay in the history) and the conflict is returned so the editor is told.
    """
    reviewer = _check_reviewer(reviewer)
    labels = {cid: _label(text) for cid, text in wanted.items()}
    refs = {r.chromosome_id: r for r in case_chromosomes(s, case)}
    missing = [cid for cid in labels if cid not in refs]
    if missing:
        raise ChromosomeNotFound(f"case {case.case_id} has no chromosome with id {missing[0]}")
    current = _newest_labels(s, case)
    when = utcnow()
    out = []
    for cid, label in labels.items():
        cur = current.get(cid)
        conflict = cur if cid in seen and (cur.id if cur is not None else None) != seen[cid] else None
        change = _write(s, refs[cid], label, reviewer, cur, when)
        s.flush()
        new_id = s.query(func.max(Label.id)).filter(Label.chromosome_id == cid).scalar() if change.changed else None
        out.append(Relabel(change, new_id, conflict))
    return out


def _read_corrections(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    try:
        text = Path(path).read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise CorrectionsFileError(f"{path}: cannot read: {exc}") from exc
    try:
        table = read_table(text, [("file", "label"), ("cell", "chromosome", "label")])
    except HeaderError as exc:
        raise CorrectionsFileError(f"{path}: {exc}") from None
    if table.problems:
        raise CorrectionsFileError(f"{path}: {table.problems[0]}; nothing was changed")
    return table.header, [row for _, row in table.rows]


def import_corrections(database: Database, case_id: str, path: Path, *, reviewer: str) -> list[LabelChange]:
    """Apply a corrections CSV in one transaction: any bad row rejects the whole file (with its line number)."""
    reviewer = _check_reviewer(reviewer)
    header, rows = _read_corrections(path)
    by_file = "file" in header
    with database.session() as s:
        case = get_case(s, case_id, lock=True)
        refs = case_chromosomes(s, case)
        wanted: dict[int, tuple[ChromosomeRef, str]] = {}
        for lineno, row in enumerate(rows, start=2):
            if not any(row.values()):
                continue
            try:
                if by_file:
                    ref = find_chromosome(refs, case, row.get("cell") or None, row.get("file", ""))
                else:
                    ref = find_chromosome(refs, case, row.get("cell", ""), row.get("chromosome", ""))
                label = _label(row.get("label", ""))
            except ReviewError as exc:
                raise type(exc)(f"{path} line {lineno}: {exc}; nothing was changed") from None
            if ref.chromosome_id in wanted and wanted[ref.chromosome_id][1] != label:
                raise CorrectionsFileError(f"{path} line {lineno}: {ref.source_file} is listed twice with "
                                           "different labels")
            wanted[ref.chromosome_id] = (ref, label)
        if not wanted:
            raise CorrectionsFileError(f"{path}: no corrections in the file")
        current = _newest_labels(s, case)
        when = utcnow()
        changes = [_write(s, ref, label, reviewer, current.get(cid), when) for cid, (ref, label) in wanted.items()]
    log.info("case %s: %d corrections imported, %d changed", case_id, len(changes),
             sum(c.changed for c in changes))
    return changes


def accept_predictions(database: Database, case_id: str, *, reviewer: str) -> list[LabelChange]:
    """Confirm the case's current predictions (assigned label) for every chromosome not reviewed yet.

    "Current" = the predictions of the model that processed the case last (Case.model_version_id), else the
    newest prediction of each chromosome. Chromosomes whose newest label is a reviewed one are left alone.
    """
    reviewer = _check_reviewer(reviewer)
    with database.session() as s:
        case = get_case(s, case_id, lock=True)
        refs = case_chromosomes(s, case)
        preds: dict[int, Prediction] = {}
        q = s.query(Prediction).join(Chromosome).filter(Chromosome.case_pk == case.id).order_by(Prediction.id)
        for p in q:
            keep = preds.get(p.chromosome_id)
            if keep is None or keep.model_version_id != case.model_version_id:
                preds[p.chromosome_id] = p
        if not preds:
            raise ReviewError(f"case {case_id} has no predictions to accept",
                              hint="Process the case first: `chromobatch process` or the watcher.")
        current = _newest_labels(s, case)
        when = utcnow()
        changes = []
        for ref in refs:
            lab = current.get(ref.chromosome_id)
            pred = preds.get(ref.chromosome_id)
            if pred is None or (lab is not None and lab.source == LabelSource.REVIEWED):
                continue
            changes.append(_write(s, ref, pred.assigned_label or pred.label, reviewer, lab, when))
    log.info("case %s: accepted %d predictions as reviewed labels", case_id, len(changes))
    return changes


def history(database: Database, case_id: str) -> list[HistoryEntry]:
    """The audit trail of a case: every label row, oldest first, with the value it replaced."""
    with database.session() as s:
        case = get_case(s, case_id)
        refs = {r.chromosome_id: r for r in case_chromosomes(s, case)}
        rows = (s.query(Label).join(Chromosome, Chromosome.id == Label.chromosome_id)
                .filter(Chromosome.case_pk == case.id).order_by(Label.id).all())
        by_id = {r.id: r for r in rows}
        out = []
        for r in rows:
            ref = refs[r.chromosome_id]
            prev = by_id.get(r.supersedes_id) if r.supersedes_id is not None else None
            out.append(HistoryEntry(label_id=r.id, at=r.created_at, cell=ref.cell, cell_number=ref.cell_number,
                                    number=ref.number, source_file=ref.source_file, label=r.label,
                                    source=r.source, reviewer=r.reviewer, previous=prev.label if prev else None,
                                    supersedes_id=r.supersedes_id))
    return out


def chromosome_overview(database: Database, case_id: str) -> list[tuple[ChromosomeRef, str | None, str | None]]:
    """(chromosome, current label, its source) for every chromosome of a case, in review order."""
    with database.session() as s:
        case = get_case(s, case_id)
        current = _newest_labels(s, case)
        return [(ref, current[ref.chromosome_id].label if ref.chromosome_id in current else None,
                 current[ref.chromosome_id].source if ref.chromosome_id in current else None)
                for ref in case_chromosomes(s, case)]


def files_not_used(database: Database, case_id: str) -> list[tuple[str, str]]:
    """(file, reason) for every file of a case that could not be used: a reviewer must know what is missing."""
    with database.session() as s:
        case = get_case(s, case_id)
        return sorted((r.source_file, r.reason) for r in case.rejected)
