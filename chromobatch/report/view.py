"""The case view: what the report shows, read from the database in one session.

Memory stays flat whatever the number of cells: the view holds no pixel data (a few hundred bytes per
chromosome); `load_cell_crops` reads and decodes one cell's crops in a short query of its own when its
page is drawn.

Files of the case that ingest could not use (`rejected_files`) are part of the view, and a cell that lost
a file is "incomplete input" (`incomplete_note`): its count, e.g. 45,XY,-11, may be missing the very
chromosome whose file was rejected, so a bad file never silently becomes a monosomy.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any

import numpy as np

from chromobatch.errors import CaseNotFound, ConfigError
from chromobatch.intake.imaging import decode_png
from chromobatch.intake.scan import cell_of_rejected
from chromobatch.store.db import (
    Case,
    Cell,
    Chromosome,
    Database,
    Label,
    ModelVersion,
    Prediction,
    RejectedFile,
    SignOff,
    model_stain,
)
from chromobatch.store.states import LabelSource, Stain

NOT_PROVIDED = "not provided"
#: The pipeline's per-cell flag for a cell one of whose files was rejected.
INCOMPLETE_FLAG = "incomplete_input"
#: File names listed in one cell's note / caption; the rest are in "Files not used".
MAX_NAMES_IN_NOTE = 10


@dataclass
class ChromosomeView:
    """One chromosome as the report shows it."""

    chromosome_id: int
    source_file: str
    #: The normalised crop; None in a loaded view (crops are read per cell when its page is drawn).
    crop: np.ndarray | None
    #: Shown class; None = unclassified (no prediction, no label).
    label: str | None
    #: The model's class after karyotype-aware assignment (None when not predicted).
    predicted: str | None = None
    confidence: float | None = None
    flags: tuple[str, ...] = ()
    #: model | reviewed | imported | none: where the shown label comes from.
    label_source: str = "none"
    reviewer: str | None = None

    @property
    def low_confidence(self) -> bool:
        """A label a human set is no longer the model's doubt."""
        return self.label_source == "model" and "low_confidence" in self.flags

    @property
    def changed_by_review(self) -> bool:
        return self.label_source in (LabelSource.REVIEWED, LabelSource.IMPORTED) and self.label != self.predicted


@dataclass
class CellView:
    number: int
    name: str
    chromosomes: list[ChromosomeView]
    summary: dict[str, Any] = field(default_factory=dict)
    #: The database id of the cell (its crops are read with it); None for a view built in memory.
    cell_id: int | None = None
    #: Source files of this cell that ingest rejected (from the rejected_files rows and the summary).
    rejected_files: list[str] = field(default_factory=list)
    #: Came from a whole metaphase (its image and outlines are stored; report.overlay draws them), and the
    #: chromosomes counted in it (clusters by their estimate); None for a cell delivered as crops.
    metaphase_count: int | None = None

    @property
    def from_metaphase(self) -> bool:
        return self.metaphase_count is not None

    def counts(self) -> Counter[str]:
        return Counter(c.label for c in self.chromosomes if c.label is not None)

    @property
    def incomplete(self) -> bool:
        """A file of this cell could not be used: a missing chromosome may be in it."""
        return bool(self.rejected_files) or INCOMPLETE_FLAG in (self.summary.get("flags") or [])


@dataclass(frozen=True)
class RejectedView:
    """A file of the case that was not used, and why; cell None = the cell is not known."""

    source_file: str
    reason: str
    cell: str | None


@dataclass(frozen=True)
class SignOffView:
    """A sign-off (action 'signed': who, when, the final karyotype, the comment) or a reopening."""

    action: str
    user: str
    at: datetime | None
    karyotype: str | None
    comment: str | None


@dataclass
class CaseView:
    case_id: str
    status: str
    input_format: str | None
    meta: dict[str, Any]
    received_at: datetime | None
    processed_at: datetime | None
    summary: dict[str, Any] | None
    karyotype: str | None
    model: dict[str, str] | None
    all_cells: list[CellView]
    #: The cells that get a karyogram page (the first N with --cells).
    cells: list[CellView]
    reviewed: bool
    reviewers: list[str]
    last_review_at: datetime | None
    #: Every rejected file of the case, sorted by path.
    rejected: list[RejectedView] = field(default_factory=list)
    #: Sign-offs and reopenings of the web review, oldest first; the case is signed when the last is 'signed'.
    signoffs: list[SignOffView] = field(default_factory=list)

    @property
    def signed(self) -> SignOffView | None:
        return self.signoffs[-1] if self.signoffs and self.signoffs[-1].action == "signed" else None

    @property
    def dicom(self) -> dict[str, Any]:
        value = (self.meta or {}).get("dicom")
        return value if isinstance(value, dict) else {}

    @property
    def total_cells(self) -> int:
        return len(self.all_cells)

    def reviewed_karyotype(self) -> str | None:
        """The ISCN karyotype the reviewed labels give (same rules as the pipeline's suggestion)."""
        if not self.reviewed:
            return None
        from chromobatch.karyotype.iscn import cell_karyotype, summarise

        cells = [cell_karyotype(c.name, [x.label for x in c.chromosomes if x.label is not None])
                 for c in self.all_cells]
        return summarise(cells).get("karyotype") or None

    @property
    def is_dicom(self) -> bool:
        return self.input_format == "dicom" or "dicom" in (self.meta or {})


def _pick_prediction(preds: list[Any], model_version_id: int | None) -> Any | None:
    """The case's model's prediction when there is one, else the newest (rows with id, model_version_id)."""
    if not preds:
        return None
    if model_version_id is not None:
        for p in sorted(preds, key=lambda p: p.id, reverse=True):
            if p.model_version_id == model_version_id:
                return p
    return max(preds, key=lambda p: p.id)


def _model_info(s: Any, case: Case, chosen: list[Any]) -> dict[str, str] | None:
    mv_id = case.model_version_id
    if mv_id is None and chosen:
        mv_id = Counter(p.model_version_id for p in chosen).most_common(1)[0][0]
    mv = s.get(ModelVersion, mv_id) if mv_id is not None else None
    if mv is not None:
        return {"name": mv.name, "version": mv.version, "sha256": mv.sha256, "stain": model_stain(mv).band}
    model = (case.summary or {}).get("model")
    if isinstance(model, dict) and model:
        info = {k: str(model.get(k) or NOT_PROVIDED) for k in ("name", "version", "sha256")}
        return {**info, "stain": Stain.of(model.get("stain")).band}
    return None


def load_case_view(database: Database, case_id: str, *, cells: int | None = None) -> CaseView:
    """Everything the report needs but the pixels, read in one transaction (bulk queries, not one per
    chromosome). Crops are not read here (`load_cell_crops` reads one cell's when its page is drawn), nor
    the predictions' probability vectors: the view's size is a few hundred bytes per chromosome."""
    if cells is not None and cells < 1:
        raise ConfigError(f"cells must be at least 1, got {cells}")
    with database.session() as s:
        case = s.query(Case).filter_by(case_id=case_id).one_or_none()
        if case is None:
            raise CaseNotFound(f"case {case_id!r} not found")
        all_cells: list[Cell] = list(case.cells)
        chroms: dict[int, list[tuple[int, str]]] = defaultdict(list)
        for chrom_id, cell_id, source_file in (
                s.query(Chromosome.id, Chromosome.cell_id, Chromosome.source_file)
                .filter(Chromosome.case_pk == case.id, Chromosome.not_chromosome.is_(False))
                .order_by(Chromosome.id)):  # an object a reviewer marked "not a chromosome" is left out
            chroms[cell_id].append((chrom_id, source_file))
        preds: dict[int, list[Any]] = defaultdict(list)
        for pred in (s.query(Prediction.id, Prediction.chromosome_id, Prediction.model_version_id, Prediction.label,
                             Prediction.assigned_label, Prediction.confidence, Prediction.flags)
                     .join(Chromosome, Prediction.chromosome_id == Chromosome.id)
                     .filter(Chromosome.case_pk == case.id)):
            preds[pred.chromosome_id].append(pred)
        labels: dict[int, Label] = {}
        reviewed_rows: list[Label] = []
        for lab in (s.query(Label).join(Chromosome, Label.chromosome_id == Chromosome.id)
                    .filter(Chromosome.case_pk == case.id).order_by(Label.id)):
            labels[lab.chromosome_id] = lab  # ascending id: the newest row per chromosome wins
            if lab.source == LabelSource.REVIEWED:
                reviewed_rows.append(lab)
        reviewed = bool(reviewed_rows)

        summary = case.summary if isinstance(case.summary, dict) else None
        cell_summaries = {str(c.get("cell")): c for c in (summary or {}).get("cells", []) if isinstance(c, dict)}
        names = {cell.name for cell in all_cells}
        rejected = [RejectedView(r.source_file, r.reason or "", cell_of_rejected(r.source_file, names))
                    for r in s.query(RejectedFile.source_file, RejectedFile.reason)
                    .filter(RejectedFile.case_pk == case.id).order_by(RejectedFile.source_file)]
        rejected_by_cell: dict[str, list[str]] = defaultdict(list)
        for r in rejected:
            if r.cell is not None:
                rejected_by_cell[r.cell].append(r.source_file)
        chosen: list[Any] = []
        views: list[CellView] = []
        for number, cell in enumerate(all_cells, start=1):
            items = []
            for chrom_id, source_file in chroms.get(cell.id, []):
                pred = _pick_prediction(preds.get(chrom_id, []), case.model_version_id)
                view = ChromosomeView(chromosome_id=chrom_id, source_file=source_file, crop=None, label=None)
                if pred is not None:
                    chosen.append(pred)
                    view.flags = tuple(str(f) for f in (pred.flags or []))
                    # A cluster of a whole metaphase takes no class until a reviewer gives it one.
                    view.predicted = pred.assigned_label or (None if "cluster" in view.flags else pred.label)
                    view.confidence = float(pred.confidence)
                    view.label, view.label_source = view.predicted, "model"
                current = labels.get(chrom_id) if reviewed else None
                if current is not None:
                    view.label, view.label_source, view.reviewer = current.label, current.source, current.reviewer
                items.append(view)
            cell_summary = cell_summaries.get(cell.name, {})
            from_summary = cell_summary.get("rejected_files")
            files = set(rejected_by_cell.get(cell.name, []))
            if isinstance(from_summary, list):
                files.update(str(f) for f in from_summary)
            views.append(CellView(number, cell.name, items, cell_summary, cell_id=cell.id,
                                  rejected_files=sorted(files),
                                  metaphase_count=cell.count if cell.source_sha256 is not None else None))
        return CaseView(
            case_id=case.case_id, status=case.status, input_format=case.input_format, meta=dict(case.meta or {}),
            received_at=case.received_at, processed_at=case.processed_at, summary=summary,
            karyotype=case.karyotype or (summary or {}).get("karyotype"), model=_model_info(s, case, chosen),
            all_cells=views, cells=views[:cells] if cells is not None else views, reviewed=reviewed,
            reviewers=sorted({r.reviewer or "unnamed reviewer" for r in reviewed_rows}),
            last_review_at=max((r.created_at for r in reviewed_rows), default=None),
            rejected=rejected,
            signoffs=[SignOffView(r.action, r.user_name, r.at, r.karyotype, r.comment)
                      for r in s.query(SignOff).filter(SignOff.case_pk == case.id).order_by(SignOff.id)],
        )


def load_cell_crops(database: Database, cell: CellView) -> CellView:
    """The cell with its crops decoded, read in one short query of its own (the view holds none)."""
    if cell.cell_id is None or all(c.crop is not None for c in cell.chromosomes):
        return cell
    with database.session() as s:
        pngs = dict(s.query(Chromosome.id, Chromosome.crop_png).filter(Chromosome.cell_id == cell.cell_id))
    chromosomes = [c if c.crop is not None else replace(c, crop=decode_png(pngs[c.chromosome_id]))
                   for c in cell.chromosomes]
    del pngs
    return replace(cell, chromosomes=chromosomes)


def incomplete_note(cell: CellView) -> str | None:
    """'incomplete input: N file(s) not used (names)' for a cell that lost a file; None when it lost none."""
    files = cell.rejected_files
    counted = cell.summary.get("files_not_used")
    if not files and not (isinstance(counted, int) and counted > 0) and not cell.incomplete:
        return None
    if not files:
        n = counted if isinstance(counted, int) and counted > 0 else None
        return f"incomplete input: {n} file(s) not used" if n else "incomplete input"
    shown = files[:MAX_NAMES_IN_NOTE]
    more = f", and {len(files) - len(shown)} more (see Files not used)" if len(files) > len(shown) else ""
    return f"incomplete input: {len(files)} file(s) not used ({', '.join(shown)}{more})"
