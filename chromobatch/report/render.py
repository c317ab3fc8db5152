"""Karyogram PDF reports: one summary page per case, one karyogram page per analysed cell.

Why: the lab signs out a case from a printed/PACS report, so the report must show what the software
suggested (and what a reviewer changed) in the layout cytogeneticists read: chromosomes upright, at one
scale per cell (a 1 must look bigger than a 21), homologs side by side above their class number, doubtful
chromosomes and abnormal counts marked. For DICOM cases the PDF is also wrapped as an Encapsulated PDF
instance of the patient's study so it can be sent to the PACS.

Files of the case that ingest could not use (`rejected_files`) are listed on the summary pages with their
reasons, and a cell that lost a file is marked "incomplete input" (its count, e.g. 45,XY,-11, may be
missing the very chromosome whose file was rejected), so a bad file never silently becomes a monosomy.

Memory stays flat whatever the number of cells: the view holds no pixel data; each cell's crops are read
and decoded in their own short query when its page is drawn, its karyogram image is dropped right after,
and the PDF is written to a temporary file in the target folder (then renamed), not kept in memory as a
whole beyond what reportlab holds until it saves (about the size of the output file).

Patient identifiers appear in the report and the DICOM file only, never in log messages.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import tempfile
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from chromobatch import CLASSES, __version__
from chromobatch.errors import CaseNotFound, ConfigError
from chromobatch.files import atomic_write
from chromobatch.intake.imaging import decode_png
from chromobatch.intake.ingest import cell_of_rejected
from chromobatch.ml.geometry import background_level, upright
from chromobatch.store.db import Case, Cell, Chromosome, Database, Label, ModelVersion, Prediction, RejectedFile

log = logging.getLogger(__name__)

#: The standard karyogram rows (ISCN): groups A-B, C + X, D-E, F-G + Y.
KARYOGRAM_ROWS: tuple[tuple[str, ...], ...] = (
    ("1", "2", "3", "4", "5"),
    ("6", "7", "8", "9", "10", "11", "12", "X"),
    ("13", "14", "15", "16", "17", "18"),
    ("19", "20", "21", "22", "Y"),
)
UNCLASSIFIED = "unclassified"
#: DICOM tags shown in the header; the first seven are always listed ("not provided" when absent).
HEADER_TAGS: tuple[tuple[str, str], ...] = (
    ("PatientID", "Patient ID"), ("PatientName", "Patient name"), ("PatientBirthDate", "Birth date"),
    ("PatientSex", "Sex"), ("AccessionNumber", "Accession number"), ("StudyDate", "Study date"),
    ("StudyInstanceUID", "Study instance UID"), ("StudyID", "Study ID"), ("StudyDescription", "Study"),
    ("InstitutionName", "Institution"), ("ReferringPhysicianName", "Referring physician"),
)
ALWAYS_SHOWN = 7
NOT_PROVIDED = "not provided"
NOT_PROCESSED = "not processed"
REVIEW_STATEMENT = ("Computer-assisted suggestion. Results require review and confirmation by a qualified "
                    "cytogeneticist before clinical use.")
ENCAPSULATED_PDF_STORAGE = "1.2.840.10008.5.1.4.1.1.104.1"
#: The pipeline's per-cell flag for a cell one of whose files was rejected.
INCOMPLETE_FLAG = "incomplete_input"
CELL_UNKNOWN = "cell unknown"
#: File names listed in one cell's note / caption; the rest are in "Files not used".
MAX_NAMES_IN_NOTE = 10
#: Karyogram image size in pixels: a landscape A4 page at ~180 dpi, the layout karyograms are read in.
KARYOGRAM_SIZE = (1920, 1100)
MAX_SCALE = 4.0

RED = (210, 20, 20)
BLUE = (20, 90, 220)
GREY = (110, 110, 110)
BLACK = (0, 0, 0)


# --------------------------------------------------------------------------------------------------
# What the report shows, read from the database in one session


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
        return self.label_source in ("reviewed", "imported") and self.label != self.predicted


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
        return {"name": mv.name, "version": mv.version, "sha256": mv.sha256}
    model = (case.summary or {}).get("model")
    if isinstance(model, dict) and model:
        return {k: str(model.get(k) or NOT_PROVIDED) for k in ("name", "version", "sha256")}
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
                .filter(Chromosome.case_pk == case.id).order_by(Chromosome.id)):
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
            if lab.source == "reviewed":
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
                    view.predicted = pred.assigned_label or pred.label
                    view.confidence = float(pred.confidence)
                    view.flags = tuple(str(f) for f in (pred.flags or []))
                    view.label, view.label_source = view.predicted, "model"
                lab = labels.get(chrom_id) if reviewed else None
                if lab is not None:
                    view.label, view.label_source, view.reviewer = lab.label, lab.source, lab.reviewer
                items.append(view)
            cell_summary = cell_summaries.get(cell.name, {})
            from_summary = cell_summary.get("rejected_files")
            files = set(rejected_by_cell.get(cell.name, []))
            if isinstance(from_summary, list):
                files.update(str(f) for f in from_summary)
            views.append(CellView(number, cell.name, items, cell_summary, cell_id=cell.id,
                                  rejected_files=sorted(files)))
        return CaseView(
            case_id=case.case_id, status=case.status, input_format=case.input_format, meta=dict(case.meta or {}),
            received_at=case.received_at, processed_at=case.processed_at, summary=summary,
            karyotype=case.karyotype or (summary or {}).get("karyotype"), model=_model_info(s, case, chosen),
            all_cells=views, cells=views[:cells] if cells is not None else views, reviewed=reviewed,
            reviewers=sorted({r.reviewer or "unnamed reviewer" for r in reviewed_rows}),
            last_review_at=max((r.created_at for r in reviewed_rows), default=None),
            rejected=rejected,
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


# --------------------------------------------------------------------------------------------------
# Karyogram image


@dataclass(frozen=True)
class Placement:
    """Where one chromosome went in the karyogram image (pixels), and how it was marked."""

    chromosome_id: int
    slot: str  # class name, or "unclassified"
    x: int
    y: int
    width: int
    height: int
    angle: float
    scale: float
    marks: tuple[str, ...] = ()


@dataclass
class Karyogram:
    image: Image.Image
    placements: list[Placement]
    scale: float
    abnormal: set[str]


def abnormal_classes(counts: Counter[str]) -> set[str]:
    """Classes whose count is not the normal one: autosomes != 2; sex chromosomes other than XX or XY."""
    if not counts:
        return set()
    out = {c for c in CLASSES[:22] if counts.get(c, 0) != 2}
    x, y = counts.get("X", 0), counts.get("Y", 0)
    if y > 1:
        out.add("Y")
    if x != (2 if y == 0 else 1):
        out.add("X")
    return out


@functools.lru_cache(maxsize=4)
def _font_path(bold: bool = False) -> str | None:
    """DejaVu Sans from matplotlib (a dependency): Unicode names, same face in PNG and PDF."""
    spec = importlib.util.find_spec("matplotlib")
    if spec is None or not spec.submodule_search_locations:
        return None
    name = "DejaVuSans-Bold.ttf" if bold else "DejaVuSans.ttf"
    path = Path(list(spec.submodule_search_locations)[0]) / "mpl-data" / "fonts" / "ttf" / name
    return str(path) if path.is_file() else None


@functools.lru_cache(maxsize=16)
def _pil_font(size: int, bold: bool = False) -> Any:
    path = _font_path(bold)
    if path:
        return ImageFont.truetype(path, size)
    return ImageFont.load_default(size=size)


_GAP = 8  # between homologs
_SLOT_GAP = 14
_MARGIN = 24
_LABEL_H = 40  # class number under a slot
_ROW_GAP = 22
_TITLE_H = 64
_LEGEND_H = 56
_MIN_SLOT = 56


@dataclass
class _Row:
    slots: list[tuple[str, list[tuple[ChromosomeView, np.ndarray, float]]]]
    wrap: bool = False  # the unclassified row wraps onto several lines


def _rows_for(cell: CellView) -> list[_Row]:
    by_class: dict[str, list[tuple[ChromosomeView, np.ndarray, float]]] = defaultdict(list)
    loose: list[tuple[ChromosomeView, np.ndarray, float]] = []
    for chrom in cell.chromosomes:
        arr, angle = upright(chrom.crop)
        if chrom.label in CLASSES:
            by_class[chrom.label].append((chrom, arr, angle))
        else:
            loose.append((chrom, arr, angle))
    rows = [_Row([(c, by_class.get(c, [])) for c in row]) for row in KARYOGRAM_ROWS]
    if loose:
        loose.sort(key=lambda t: (-t[1].shape[0], t[0].chromosome_id))
        rows.append(_Row([(UNCLASSIFIED, loose)], wrap=True))
    return rows


def _content_w(items: list[tuple[ChromosomeView, np.ndarray, float]], s: float) -> int:
    return sum(max(1, round(a.shape[1] * s)) for _, a, _ in items) + _GAP * max(len(items) - 1, 0)


def _wrap_lines(items: list[tuple[ChromosomeView, np.ndarray, float]], s: float, avail: int
                ) -> list[list[tuple[ChromosomeView, np.ndarray, float]]]:
    lines: list[list[tuple[ChromosomeView, np.ndarray, float]]] = [[]]
    used = 0
    for item in items:
        w = max(1, round(item[1].shape[1] * s))
        if lines[-1] and used + _GAP + w > avail:
            lines.append([])
            used = 0
        used += (w if not lines[-1] else _GAP + w)
        lines[-1].append(item)
    return lines


def _fits(rows: list[_Row], s: float, width: int, height: int) -> bool:
    avail = width - 2 * _MARGIN
    total = _TITLE_H + _LEGEND_H
    for row in rows:
        if row.wrap:
            items = row.slots[0][1]
            if any(round(a.shape[1] * s) > avail for _, a, _ in items):
                return False
            for line in _wrap_lines(items, s, avail):
                total += max(round(a.shape[0] * s) for _, a, _ in line) + _GAP
            total += _LABEL_H + _ROW_GAP
            continue
        need = sum(max(_content_w(items, s), _MIN_SLOT) for _, items in row.slots)
        if need + _SLOT_GAP * (len(row.slots) - 1) > avail:
            return False
        tallest = max((round(a.shape[0] * s) for _, items in row.slots for _, a, _ in items), default=0)
        total += max(tallest, 24) + _LABEL_H + _ROW_GAP
    return total <= height


def _scale_for(rows: list[_Row], width: int, height: int) -> float:
    """The largest single scale at which every row fits (never a per-chromosome stretch)."""
    s = MAX_SCALE
    while s > 0.05 and not _fits(rows, s, width, height):
        s *= 0.97
    return s


def _paste(canvas: np.ndarray, arr: np.ndarray, x: int, y: int, w: int, h: int) -> None:
    """Darken-composite the crop; background and its noise map to white, so no box edges show."""
    bg, noise = background_level(arr)
    white = max(bg - 2.5 * noise, 1.0)
    img = Image.fromarray(arr)
    if (w, h) != img.size:
        img = img.resize((w, h), Image.Resampling.BICUBIC)
    grey = np.clip(np.asarray(img, dtype=np.float32) * (255.0 / white), 0, 255).astype(np.uint8)
    region = canvas[y:y + h, x:x + w]  # clipped at the canvas edge (only when nothing fits at any scale)
    np.minimum(region, grey[:region.shape[0], :region.shape[1], None], out=region)


def layout_karyogram(cell: CellView, *, title: str = "", size: tuple[int, int] = KARYOGRAM_SIZE) -> Karyogram:
    """Draw one cell's karyogram; every chromosome of the cell is placed exactly once (see placements)."""
    width, height = size
    rows = _rows_for(cell)
    s = _scale_for(rows, width, height)
    abnormal = abnormal_classes(cell.counts())
    canvas = np.full((height, width, 3), 255, dtype=np.uint8)
    placements: list[Placement] = []
    boxes: list[tuple[tuple[int, int, int, int], tuple[int, int, int]]] = []
    numbers: list[tuple[int, int, str, tuple[int, int, int]]] = []
    rules: list[tuple[int, int, int]] = []
    avail = width - 2 * _MARGIN

    def place(item: tuple[ChromosomeView, np.ndarray, float], slot: str, x: int, base: int) -> int:
        chrom, arr, angle = item
        w, h = max(1, round(arr.shape[1] * s)), max(1, round(arr.shape[0] * s))
        y = base - h
        _paste(canvas, arr, x, y, w, h)
        marks = []
        if chrom.low_confidence:
            marks.append("low_confidence")
            boxes.append(((x - 4, y - 4, x + w + 3, y + h + 3), RED))
        if chrom.changed_by_review:
            marks.append("changed_by_review")
            boxes.append(((x - 7, y - 7, x + w + 6, y + h + 6), BLUE))
        if slot in abnormal:
            marks.append("abnormal_count")
        placements.append(Placement(chrom.chromosome_id, slot, x, y, w, h, round(angle, 2), s, tuple(marks)))
        return w

    y = _TITLE_H
    for row in rows:
        if row.wrap:
            lines = _wrap_lines(row.slots[0][1], s, avail)
            for line in lines:
                tallest = max(round(a.shape[0] * s) for _, a, _ in line)
                base = y + tallest
                x = _MARGIN
                for item in line:
                    x += place(item, UNCLASSIFIED, x, base) + _GAP
                y = base + _GAP
            numbers.append((width // 2, y, "unclassified (no prediction)", GREY))
            y += _LABEL_H + _ROW_GAP
            continue
        needs = [max(_content_w(items, s), _MIN_SLOT) for _, items in row.slots]
        n = len(row.slots)
        room = avail - _SLOT_GAP * (n - 1)
        if max(needs) * n <= room:
            widths = [room // n] * n
        else:
            extra = (room - sum(needs)) // n
            widths = [need + extra for need in needs]
        tallest = max((round(a.shape[0] * s) for _, items in row.slots for _, a, _ in items), default=0)
        base = y + max(tallest, 24)
        x0 = _MARGIN
        for (name, items), slot_w in zip(row.slots, widths, strict=True):
            x = x0 + (slot_w - _content_w(items, s)) // 2 if items else x0
            for item in items:
                x += place(item, name, x, base) + _GAP
            colour = RED if name in abnormal else BLACK
            rules.append((x0 + 6, x0 + slot_w - 6, base + 4))
            numbers.append((x0 + slot_w // 2, base + 8, name, colour))
            x0 += slot_w + _SLOT_GAP
        y = base + _LABEL_H + _ROW_GAP

    img = Image.fromarray(canvas, "RGB")
    draw = ImageDraw.Draw(img)
    for x_a, x_b, y_r in rules:
        draw.line([(x_a, y_r), (x_b, y_r)], fill=GREY, width=2)
    for cx, ty, text, colour in numbers:
        font = _pil_font(26 if len(text) <= 2 else 20, bold=colour == RED)
        draw.text((cx, ty), text, fill=colour, font=font, anchor="ma")
    for box, colour in boxes:
        draw.rectangle(box, outline=colour, width=3)
    if title:
        draw.text((_MARGIN, 16), title, fill=BLACK, font=_pil_font(26, bold=True))
    _draw_legend(draw, height - _LEGEND_H + 14, s)
    return Karyogram(img, placements, s, abnormal)


def _draw_legend(draw: ImageDraw.ImageDraw, y: int, s: float) -> None:
    font = _pil_font(20)
    x = _MARGIN
    draw.rectangle((x, y, x + 26, y + 24), outline=RED, width=3)
    x += 36
    draw.text((x, y), "low confidence", fill=BLACK, font=font)
    x += 190
    draw.rectangle((x, y, x + 26, y + 24), outline=BLUE, width=3)
    x += 36
    draw.text((x, y), "label changed by reviewer", fill=BLACK, font=font)
    x += 300
    draw.text((x, y), "21", fill=RED, font=_pil_font(22, bold=True))
    x += 36
    draw.text((x, y), "abnormal count", fill=BLACK, font=font)
    x += 200
    draw.text((x, y), f"scale {s:.2f}x native (one scale for the whole cell)", fill=GREY, font=font)


# --------------------------------------------------------------------------------------------------
# PDF


@functools.lru_cache(maxsize=1)
def _pdf_fonts() -> tuple[str, str]:
    """Register DejaVu Sans when available (non-Latin-1 patient names); else the PDF base fonts."""
    regular, bold = _font_path(False), _font_path(True)
    if regular and bold:
        from reportlab.pdfbase import pdfmetrics
        from reportlab.pdfbase.ttfonts import TTFont

        try:
            pdfmetrics.registerFont(TTFont("CB-Sans", regular))
            pdfmetrics.registerFont(TTFont("CB-Sans-Bold", bold))
            return "CB-Sans", "CB-Sans-Bold"
        except Exception:  # a broken font file must not stop a report
            log.warning("could not register DejaVu Sans; falling back to Helvetica", exc_info=True)
    return "Helvetica", "Helvetica-Bold"


def _fmt_time(value: datetime | None) -> str:
    if value is None:
        return NOT_PROCESSED
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M UTC")


def _fmt_tag(key: str, value: Any) -> str:
    text = str(value).strip()
    if not text:
        return NOT_PROVIDED
    if key.endswith("Date") and len(text) == 8 and text.isdigit():
        return f"{text[:4]}-{text[4:6]}-{text[6:]}"
    if key.endswith("Name") and "^" in text:
        family, _, rest = text.partition("^")
        rest = " ".join(p for p in rest.split("^") if p)
        return f"{family}, {rest}" if rest else family
    return text


def _review_status(view: CaseView) -> str:
    if not view.reviewed:
        return "unreviewed"
    return f"reviewed by {', '.join(view.reviewers)} (last change {_fmt_time(view.last_review_at)})"


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


def _cell_line(view: CaseView, cell: CellView) -> str:
    counts = cell.counts()
    total = len(cell.chromosomes)
    kt = cell.summary.get("karyotype") or (NOT_PROCESSED if view.summary is None else "n/a")
    low = sum(c.low_confidence for c in cell.chromosomes)
    unclassified = sum(c.label is None for c in cell.chromosomes)
    parts = [f"{total} chromosomes", f"suggested karyotype: {kt}"]
    note = incomplete_note(cell)
    if note:
        parts.append(note)
    flags = [str(f) for f in cell.summary.get("flags") or [] if f != INCOMPLETE_FLAG]
    if flags:
        parts.append("flags: " + ", ".join(flags))
    abnormal = sorted(abnormal_classes(counts), key=CLASSES.index)
    if abnormal:
        parts.append("abnormal count: " + ", ".join(f"{c} (x{counts.get(c, 0)})" for c in abnormal))
    parts.append(f"{low} low-confidence")
    if unclassified:
        parts.append(f"{unclassified} unclassified")
    return "; ".join(parts)


class _Report:
    """Builds the platypus story; page furniture (header, footer, page X of Y) is drawn per page."""

    def __init__(self, view: CaseView, render: Callable[[CellView], Path]) -> None:
        """render: writes a cell's karyogram as a JPEG file and returns its path; called when the cell's
        page is drawn (one image in memory at a time), the file is deleted once it is in the PDF."""
        from reportlab.lib.styles import ParagraphStyle

        self.view = view
        self.render = render
        self.font, self.bold = _pdf_fonts()
        self.generated = datetime.now(UTC)
        self.styles = {
            "h1": ParagraphStyle("h1", fontName=self.bold, fontSize=15, leading=19, spaceAfter=6),
            "h2": ParagraphStyle("h2", fontName=self.bold, fontSize=11, leading=14, spaceBefore=8, spaceAfter=3),
            "body": ParagraphStyle("body", fontName=self.font, fontSize=8.5, leading=11),
            "small": ParagraphStyle("small", fontName=self.font, fontSize=7.5, leading=9.5),
            "cell": ParagraphStyle("cell", fontName=self.font, fontSize=8, leading=10),
        }

    def _p(self, text: str, style: str = "body") -> Any:
        from reportlab.platypus import Paragraph

        return Paragraph(text, self.styles[style])

    def _kv_table(self, rows: list[tuple[str, str]]) -> Any:
        from reportlab.lib import colors
        from reportlab.lib.units import mm
        from reportlab.platypus import Table, TableStyle

        data = [[self._p(f"<b>{escape(k)}</b>", "cell"), self._p(escape(v), "cell")] for k, v in rows]
        table = Table(data, colWidths=[45 * mm, 135 * mm], hAlign="LEFT")
        table.setStyle(TableStyle([("VALIGN", (0, 0), (-1, -1), "TOP"),
                                   ("LINEBELOW", (0, 0), (-1, -1), 0.25, colors.lightgrey),
                                   ("TOPPADDING", (0, 0), (-1, -1), 1.5),
                                   ("BOTTOMPADDING", (0, 0), (-1, -1), 1.5)]))
        return table

    def story(self) -> list[Any]:
        from reportlab.lib import colors
        from reportlab.lib.units import mm
        from reportlab.platypus import NextPageTemplate, PageBreak, Table, TableStyle

        v = self.view
        dicom = v.dicom
        out: list[Any] = [self._p(f"Karyogram report: case {escape(v.case_id)}", "h1")]
        specimen = [("Case ID", v.case_id)]
        for i, (key, name) in enumerate(HEADER_TAGS):
            if key in dicom or i < ALWAYS_SHOWN:
                specimen.append((name, _fmt_tag(key, dicom.get(key, ""))))
        specimen += [("Input", v.input_format or "images"), ("Received", _fmt_time(v.received_at)),
                     ("Processed", _fmt_time(v.processed_at))]
        out += [self._p("Specimen", "h2"), self._kv_table(specimen)]

        model = v.model or {}
        analysis = [("Model", model.get("name", NOT_PROCESSED)), ("Model version", model.get("version", NOT_PROCESSED)),
                    ("Model checksum (SHA-256)", model.get("sha256", NOT_PROCESSED)),
                    ("Software", f"chromobatch {__version__}"), ("Report generated", _fmt_time(self.generated))]
        out += [self._p("Analysis", "h2"), self._kv_table(analysis)]

        summary = v.summary
        counts = [len(c.chromosomes) for c in v.all_cells]
        if summary is not None and summary.get("modal_number") is not None:
            modal = str(summary["modal_number"])
        else:
            modal = NOT_PROCESSED
        findings = [str(f) for f in (summary or {}).get("findings", [])]
        flagged_low = sum(c.low_confidence for cell in v.all_cells for c in cell.chromosomes)
        shown = f"{v.total_cells}" if len(v.cells) == v.total_cells else \
            f"{v.total_cells} (karyograms of the first {len(v.cells)} below)"
        case_rows = [("Cells analysed", shown),
                     ("Chromosomes per cell", ", ".join(str(n) for n in counts) or "none"),
                     ("Modal number", modal),
                     ("Suggested karyotype (ISCN)", v.karyotype or NOT_PROCESSED),
                     ("Flagged findings", "; ".join(findings) if findings else
                      (NOT_PROCESSED if summary is None else "none")),
                     ("Low-confidence chromosomes", str(flagged_low)),
                     ("Review status", _review_status(v))]
        reviewed_kt = v.reviewed_karyotype()
        if reviewed_kt:
            case_rows.insert(4, ("Karyotype from reviewed labels", reviewed_kt))
        out += [self._p("Case summary", "h2"), self._kv_table(case_rows)]
        out += self._files_not_used()

        header = ["#", "Cell", "Count", "Karyotype", "Notes"]
        data: list[list[Any]] = [[self._p(f"<b>{h}</b>", "cell") for h in header]]
        for cell in v.all_cells:
            kt = cell.summary.get("karyotype") or (NOT_PROCESSED if summary is None else "n/a")
            notes = [str(f) for f in cell.summary.get("flags") or [] if f != INCOMPLETE_FLAG]
            note = incomplete_note(cell)
            if note:
                notes.insert(0, note)
            changed = sum(c.changed_by_review for c in cell.chromosomes)
            if changed:
                notes.append(f"{changed} label(s) changed in review")
            data.append([self._p(str(cell.number), "cell"), self._p(escape(cell.name), "cell"),
                         self._p(str(len(cell.chromosomes)), "cell"), self._p(escape(str(kt)), "cell"),
                         self._p(escape("; ".join(notes)), "cell")])
        table = Table(data, colWidths=[10 * mm, 50 * mm, 15 * mm, 40 * mm, 65 * mm], hAlign="LEFT", repeatRows=1)
        table.setStyle(TableStyle([("VALIGN", (0, 0), (-1, -1), "TOP"),
                                   ("LINEBELOW", (0, 0), (-1, 0), 0.6, colors.black),
                                   ("LINEBELOW", (0, 1), (-1, -1), 0.25, colors.lightgrey)]))
        out += [self._p("Cells", "h2"), table]

        frame_w, frame_h = _frame_size(landscape=True)
        iw, ih = KARYOGRAM_SIZE
        scale = min(frame_w / iw, (frame_h - 20 * mm) / ih)
        for cell in v.cells:
            out += [NextPageTemplate("karyogram"), PageBreak()]
            out.append(_karyogram_flowable()(cell, self.render, iw * scale, ih * scale))
            out.append(self._p(f"<b>Cell {cell.number} of {v.total_cells} ({escape(cell.name)})</b>: "
                               f"{escape(_cell_line(v, cell))}", "body"))
            out.append(self._p(self._review_note(cell), "small"))
        return out

    def _files_not_used(self) -> list[Any]:
        """Every rejected file of the case with its reason (the table may run over several pages)."""
        from reportlab.lib import colors
        from reportlab.lib.units import mm
        from reportlab.platypus import Table, TableStyle

        rejected = self.view.rejected
        out: list[Any] = [self._p("Files not used", "h2")]
        if not rejected:
            return out + [self._p("none", "body")]
        out.append(self._p(f"{len(rejected)} file(s) of the case could not be used; a chromosome missing from "
                           "a cell may be in one of them.", "body"))
        data: list[list[Any]] = [[self._p(f"<b>{h}</b>", "cell") for h in ("File", "Cell", "Reason")]]
        for r in rejected:
            data.append([self._p(escape(r.source_file), "cell"), self._p(escape(r.cell or CELL_UNKNOWN), "cell"),
                         self._p(escape(r.reason), "cell")])
        table = Table(data, colWidths=[60 * mm, 30 * mm, 90 * mm], hAlign="LEFT", repeatRows=1)
        table.setStyle(TableStyle([("VALIGN", (0, 0), (-1, -1), "TOP"),
                                   ("LINEBELOW", (0, 0), (-1, 0), 0.6, colors.black),
                                   ("LINEBELOW", (0, 1), (-1, -1), 0.25, colors.lightgrey)]))
        return out + [table]

    def _review_note(self, cell: CellView) -> str:
        if not self.view.reviewed:
            return "Labels: model suggestion (unreviewed). Red box: low confidence; red class number: abnormal count."
        reviewers = sorted({c.reviewer or "unnamed reviewer" for c in cell.chromosomes
                            if c.label_source == "reviewed"})
        changes = [f"{c.source_file}: {c.predicted or 'unclassified'} to {c.label}"
                   for c in cell.chromosomes if c.changed_by_review]
        text = "Labels: reviewed" + (f" by {', '.join(reviewers)}" if reviewers else "") + "."
        if changes:
            more = f" ... and {len(changes) - 40} more" if len(changes) > 40 else ""
            text += " Changed in review: " + "; ".join(changes[:40]) + more + "."
        return escape(text)

    def decorate(self, canvas: Any, doc: Any) -> None:
        from reportlab.lib.units import mm
        from reportlab.pdfbase.pdfmetrics import stringWidth

        w, h = canvas._pagesize
        canvas.saveState()
        left = f"chromobatch karyogram report  |  case {self.view.case_id}"
        canvas.setFont(self.bold, 9)
        canvas.drawString(15 * mm, h - 12 * mm, left)
        right = f"suggested karyotype: {self.view.karyotype or NOT_PROCESSED}  |  {_review_status_short(self.view)}"
        room = w - 30 * mm - stringWidth(left, self.bold, 9) - 12
        size = 8.0
        while size > 5.5 and stringWidth(right, self.font, size) > room:
            size -= 0.5
        while len(right) > 10 and stringWidth(right, self.font, size) > room:
            right = right[:-2] + "\u2026" if right.endswith("\u2026") else right[:-1] + "\u2026"
        canvas.setFont(self.font, size)
        canvas.drawRightString(w - 15 * mm, h - 12 * mm, right)
        canvas.setLineWidth(0.5)
        canvas.line(15 * mm, h - 14 * mm, w - 15 * mm, h - 14 * mm)
        canvas.line(15 * mm, 16 * mm, w - 15 * mm, 16 * mm)
        canvas.setFont(self.font, 7)
        canvas.drawString(15 * mm, 12 * mm, REVIEW_STATEMENT)
        canvas.restoreState()


@functools.cache
def _karyogram_flowable() -> type:
    """A flowable that renders its cell's karyogram only when it is drawn (reportlab is imported lazily)."""
    from reportlab.platypus import Flowable

    class KaryogramFlowable(Flowable):
        def __init__(self, cell: CellView, render: Callable[[CellView], Path], width: float,
                     height: float) -> None:
            super().__init__()
            self.cell, self.render, self.width, self.height = cell, render, width, height
            self.hAlign = "CENTER"  # as platypus' Image

        def wrap(self, avail_width: float, avail_height: float) -> tuple[float, float]:
            return self.width, self.height

        def draw(self) -> None:
            path = self.render(self.cell)
            try:
                # A file name: reportlab embeds the JPEG as is (an ImageReader would be decoded to RGB again).
                self.canv.drawImage(str(path), 0, 0, width=self.width, height=self.height)
            finally:
                Path(path).unlink(missing_ok=True)

    return KaryogramFlowable


def _review_status_short(view: CaseView) -> str:
    return "unreviewed" if not view.reviewed else f"reviewed by {', '.join(view.reviewers)}"


_PAGE_MARGINS_MM = (15.0, 15.0, 18.0, 19.0)  # left, right, top, bottom


def _page_size(*, landscape: bool) -> tuple[float, float]:
    from reportlab.lib.pagesizes import A4
    from reportlab.lib.pagesizes import landscape as turn

    return turn(A4) if landscape else A4


def _frame_size(*, landscape: bool) -> tuple[float, float]:
    from reportlab.lib.units import mm

    w, h = _page_size(landscape=landscape)
    left, right, top, bottom = _PAGE_MARGINS_MM
    return w - (left + right) * mm, h - (top + bottom) * mm


def _numbered_canvas(font: str) -> Any:
    """A canvas that knows the total page count when it saves, for 'page X of Y'."""
    from reportlab.lib.units import mm
    from reportlab.pdfgen.canvas import Canvas

    class NumberedCanvas(Canvas):
        # Each page's state is kept until save, for the total: its drawing operators and graphics state only.
        # Images are XObjects of the document (referenced by name from a page), never part of a page state.
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self._pages: list[dict[str, Any]] = []

        def showPage(self) -> None:  # noqa: N802 (reportlab API)
            self._pages.append(dict(self.__dict__))
            self._startPage()

        def save(self) -> None:
            total = len(self._pages)
            for state in self._pages:
                self.__dict__.update(state)
                self.setFont(font, 8)
                self.drawRightString(self._pagesize[0] - 15 * mm, 8 * mm, f"page {self._pageNumber} of {total}")
                super().showPage()
            super().save()

    return NumberedCanvas


def build_pdf(view: CaseView, out: Path | Any, render: Callable[[CellView], Path]) -> int:
    """Write the report to `out` (a path or a binary file object) and return its page count: portrait
    summary, landscape karyogram pages. render(cell) writes a cell's karyogram as a JPEG file (see _Report)."""
    from reportlab.lib.units import mm
    from reportlab.platypus import BaseDocTemplate, Frame, PageTemplate

    report = _Report(view, render)
    left, _, _, bottom = (m * mm for m in _PAGE_MARGINS_MM)
    templates = []
    for name, turned in (("summary", False), ("karyogram", True)):
        fw, fh = _frame_size(landscape=turned)
        frame = Frame(left, bottom, fw, fh, leftPadding=0, rightPadding=0, topPadding=0, bottomPadding=0,
                      id=name)
        templates.append(PageTemplate(id=name, frames=[frame], onPage=report.decorate,
                                      pagesize=_page_size(landscape=turned)))
    doc = BaseDocTemplate(str(out) if isinstance(out, Path) else out, pagesize=_page_size(landscape=False),
                          pageTemplates=templates,
                          title=f"Karyogram report {view.case_id}", author=f"chromobatch {__version__}",
                          subject="karyogram report", creator="chromobatch")
    from reportlab import rl_config

    # ASCII85 streams are pure Python in reportlab (1/3 of the time for 20 cells) and 25% larger: binary.
    a85, rl_config.useA85 = rl_config.useA85, 0
    try:
        doc.build(report.story(), canvasmaker=_numbered_canvas(report.font))
    finally:
        rl_config.useA85 = a85
    return int(doc.page)


# --------------------------------------------------------------------------------------------------
# DICOM Encapsulated PDF


def write_encapsulated_pdf(pdf: bytes, view: CaseView, path: Path, *, title: str = "Karyogram report") -> Path:
    """Wrap the PDF as an Encapsulated PDF instance in the case's study (new series), ready for a PACS."""
    import pydicom
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    tags = view.dicom
    now = datetime.now(UTC)
    sop_uid = generate_uid()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ENCAPSULATED_PDF_STORAGE
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.SOPClassUID = ENCAPSULATED_PDF_STORAGE
    ds.SOPInstanceUID = sop_uid
    # Patient and study: copied from the case (type 2 attributes are present even when empty).
    for key in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyInstanceUID", "StudyDate",
                "StudyTime", "AccessionNumber", "ReferringPhysicianName", "StudyID"):
        setattr(ds, key, str(tags.get(key, "")))
    if not ds.StudyInstanceUID:
        log.warning("case has no StudyInstanceUID; the Encapsulated PDF starts a new study")
        ds.StudyInstanceUID = generate_uid()
    if tags.get("StudyDescription"):
        ds.StudyDescription = str(tags["StudyDescription"])
    if tags.get("InstitutionName"):
        ds.InstitutionName = str(tags["InstitutionName"])
    # Encapsulated Document Series + equipment.
    ds.Modality = "DOC"
    ds.SeriesInstanceUID = generate_uid()
    ds.SeriesNumber = 9901
    ds.SeriesDescription = title
    ds.Manufacturer = "chromobatch"
    ds.SoftwareVersions = __version__
    ds.ConversionType = "SD"
    # Encapsulated Document module.
    ds.InstanceNumber = 1
    ds.ContentDate = now.strftime("%Y%m%d")
    ds.ContentTime = now.strftime("%H%M%S")
    ds.AcquisitionDateTime = now.strftime("%Y%m%d%H%M%S")
    ds.BurnedInAnnotation = "YES"
    ds.DocumentTitle = title
    ds.ConceptNameCodeSequence = []
    ds.MIMETypeOfEncapsulatedDocument = "application/pdf"
    ds.EncapsulatedDocumentLength = len(pdf)
    ds.EncapsulatedDocument = pdf + (b"\0" if len(pdf) % 2 else b"")
    # Straight to the temporary file: no second in-memory copy of the whole instance.
    atomic_write(path, lambda tmp: pydicom.dcmwrite(tmp, ds, enforce_file_format=True))
    return path


# --------------------------------------------------------------------------------------------------
# Entry point


@dataclass
class ReportResult:
    pdf: Path
    pngs: list[Path]
    dicom: Path | None
    pages: int
    #: Cell number -> where each chromosome went (for checks; not part of the files).
    placements: dict[int, list[Placement]] = field(default_factory=dict, repr=False)


def render_case_report(
    database: Database,
    case_id: str,
    out: Path | None = None,
    *,
    cells: int | None = None,
    png_dir: Path | None = None,
    reports_dir: Path = Path("reports"),
) -> ReportResult:
    """Render a case's karyogram report (PDF; per-cell PNGs with png_dir; Encapsulated PDF for DICOM cases).

    ``out`` defaults to ``<reports_dir>/<case_id>.pdf``; PNGs are ``<png_dir>/<out stem>_cell<N>.png`` and
    the DICOM file ``<out stem>.dcm`` next to the PDF. Raises CaseNotFound for an unknown case ID.
    """
    view = load_case_view(database, case_id, cells=cells)
    pdf_path = Path(out) if out is not None else Path(reports_dir) / f"{view.case_id}.pdf"
    pdf_path.parent.mkdir(parents=True, exist_ok=True)
    placements: dict[int, list[Placement]] = {}
    pngs: list[Path] = []
    with tempfile.TemporaryDirectory(prefix=f".{pdf_path.stem}.pages.", dir=pdf_path.parent) as pages_dir:

        def render(cell: CellView) -> Path:
            """One cell's karyogram, drawn when its page is: crops read and the image dropped right after."""
            title = f"Case {view.case_id}  ·  cell {cell.number} of {view.total_cells} ({cell.name})  ·  " \
                    f"{len(cell.chromosomes)} chromosomes"
            kg = layout_karyogram(load_cell_crops(database, cell), title=title)
            placements[cell.number] = kg.placements
            # JPEG goes into the PDF as is (no re-compression): fast and a few hundred kB per page.
            jpeg = Path(pages_dir) / f"cell{cell.number}.jpg"
            kg.image.save(jpeg, format="JPEG", quality=92, subsampling=0)
            if png_dir is not None:
                target = Path(png_dir) / f"{pdf_path.stem}_cell{cell.number}.png"
                atomic_write(target, lambda tmp: kg.image.save(tmp, format="PNG", compress_level=3))
                pngs.append(target)
            kg.image.close()
            return jpeg

        pages = 0

        def write_pdf(tmp: Path) -> None:
            nonlocal pages
            pages = build_pdf(view, tmp, render)

        atomic_write(pdf_path, write_pdf)
    dicom_path = None
    if view.is_dicom:
        dicom_path = write_encapsulated_pdf(pdf_path.read_bytes(), view, pdf_path.with_suffix(".dcm"),
                                            title=f"Karyogram report {view.case_id}")
    log.info("report for case %s: %d pages, %d cells, %d file(s) not used%s", view.case_id, pages,
             len(view.cells), len(view.rejected), ", Encapsulated PDF written" if dicom_path else "")
    return ReportResult(pdf_path, pngs, dicom_path, pages, placements)
