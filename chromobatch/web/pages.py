"""What each page of the web review shows, read from the database: the case list (one page of rows at a time,
so 10,000 cases list as fast as 100), a case, a cell's karyogram, thumbnails and the outlined metaphase.

The cell view is built by report.layout, the code that draws the PDF's karyogram pages: the same rows
(groups A-G, X with C, Y with G), the same single scale per cell, the same marks (low confidence, changed
by review, abnormal count). The page places each chromosome's own thumbnail where the layout put it, so it
can be dragged to another class.
"""

from __future__ import annotations

import hashlib
import io
import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import numpy as np
from PIL import Image
from sqlalchemy import String, cast, func, select

from chromobatch import CLASSES
from chromobatch.errors import CaseNotFound, CellNotFound, ChromosomeNotFound
from chromobatch.intake.imaging import decode_png
from chromobatch.ml.geometry import upright
from chromobatch.report.layout import KARYOGRAM_ROWS, UNCLASSIFIED, abnormal_classes, layout_karyogram
from chromobatch.report.view import CaseView, CellView, load_case_view, load_cell_crops
from chromobatch.store.db import (
    Case,
    Cell,
    Chromosome,
    Database,
    Job,
    Prediction,
    ReviewEvent,
    SignOff,
)
from chromobatch.store.queries import newest_labels
from chromobatch.store.states import JobState, ReviewState
from chromobatch.web.edits import review_version

log = logging.getLogger(__name__)

PAGE_SIZE = 100
#: Pixels of the page's karyogram per pixel of the layout's 1920-wide image.
PAGE_SCALE = 0.62
FLAG_NAMES = {"count_anomaly": "abnormal count", "cluster": "clusters", "incomplete_input": "incomplete input"}


# --------------------------------------------------------------------------------------------------
# The case list


@dataclass
class CaseRow:
    pk: int
    case_id: str
    status: str
    received_at: datetime | None
    processed_at: datetime | None
    suggested: str | None
    reviewed: str | None
    review_state: str
    flags: list[str]
    error: str | None


@dataclass
class CaseList:
    rows: list[CaseRow]
    total: int
    page: int
    pages: int
    queue: dict[str, int]
    failed_jobs: list[dict[str, Any]]


def case_list(database: Database, *, search: str = "", state: str = "", status: str = "", page: int = 1,
              low_confidence_flag: str = "low_confidence") -> CaseList:
    """One page of cases, newest first, filtered by review state, processing status and a case ID search."""
    page = max(1, page)
    conds: list[Any] = []
    if search.strip():
        text = search.strip().replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
        conds.append(Case.case_id.ilike(f"%{text}%", escape="\\"))
    if state in tuple(ReviewState):
        conds.append(Case.review_state == state)
    if status:
        conds.append(Case.status == status)
    with database.session() as s:
        total = int(s.execute(select(func.count()).select_from(Case).where(*conds)).scalar_one())
        q = (select(Case.id, Case.case_id, Case.status, Case.received_at, Case.processed_at, Case.karyotype,
                    Case.reviewed_karyotype, Case.review_state, Case.summary, Case.error)
             .where(*conds).order_by(Case.received_at.desc(), Case.id.desc())
             .limit(PAGE_SIZE).offset((page - 1) * PAGE_SIZE))
        rows = []
        for pk, cid, st, rec, proc, kt, rkt, rstate, summary, error in s.execute(q):
            flags: set[str] = set()
            for cell in (summary or {}).get("cells", []) if isinstance(summary, dict) else []:
                for f in cell.get("flags") or [] if isinstance(cell, dict) else []:
                    flags.add(FLAG_NAMES.get(str(f), str(f)))
            rows.append(CaseRow(pk, cid, st, rec, proc, kt, rkt, rstate, sorted(flags), error))
        pks = [r.pk for r in rows]
        if pks:
            low = dict(s.execute(
                select(Chromosome.case_pk, func.count())
                .join(Prediction, Prediction.chromosome_id == Chromosome.id)
                .where(Chromosome.case_pk.in_(pks), cast(Prediction.flags, String).like(f"%{low_confidence_flag}%"))
                .group_by(Chromosome.case_pk)).all())
            for r in rows:
                if low.get(r.pk):
                    r.flags.append(f"{low[r.pk]} low confidence")
        queue = {str(st): 0 for st in JobState}
        for st, n in s.execute(select(Job.state, func.count()).group_by(Job.state)):
            queue[str(st)] = int(n)
        failed = [{"case_pk": pk, "case_id": cid, "error": err, "finished_at": fin}
                  for pk, cid, err, fin in s.execute(
                      select(Case.id, Case.case_id, Job.error, Job.finished_at).join(Case, Case.id == Job.case_pk)
                      .where(Job.state == JobState.FAILED).order_by(Job.id.desc()).limit(20))]
    return CaseList(rows, total, page, max(1, -(-total // PAGE_SIZE)), queue, failed)


# --------------------------------------------------------------------------------------------------
# A case


@dataclass
class CasePage:
    pk: int
    view: CaseView
    review_state: str
    reviewed_karyotype: str | None
    cells: list[dict[str, Any]]
    signoffs: list[SignOff]
    events: list[ReviewEvent]
    report_path: str | None
    #: edits.review_version when the page was read: the sign-off form sends it back.
    version: str


def _case_id(database: Database, case_pk: int) -> str:
    with database.session() as s:
        cid = s.execute(select(Case.case_id).where(Case.id == case_pk)).scalar_one_or_none()
    if cid is None:
        raise CaseNotFound(f"no case with key {case_pk}")
    return cid


def case_page(database: Database, case_pk: int) -> CasePage:
    with database.session() as s:  # read before what the page shows: a change in between makes it stale
        version = review_version(s, case_pk)
    view = load_case_view(database, _case_id(database, case_pk))
    with database.session() as s:
        case = s.get(Case, case_pk)
        if case is None:
            raise CaseNotFound(f"no case with key {case_pk}")
        roles = {c.id: (c.role, c.reviewed_karyotype, c.count) for c in
                 s.execute(select(Cell.id, Cell.role, Cell.reviewed_karyotype, Cell.count)
                           .where(Cell.case_pk == case_pk))}
        signoffs = list(s.execute(select(SignOff).where(SignOff.case_pk == case_pk).order_by(SignOff.id)).scalars())
        events = list(s.execute(select(ReviewEvent).where(ReviewEvent.case_pk == case_pk)
                                .order_by(ReviewEvent.id.desc()).limit(50)).scalars())
        state, rkt, report = case.review_state, case.reviewed_karyotype, case.report_path
    cells = []
    for cell in view.all_cells:
        role, ckt, counted = roles.get(cell.cell_id or -1, (None, None, None))
        counts = cell.counts()
        cells.append({"pk": cell.cell_id, "number": cell.number, "name": cell.name, "n": len(cell.chromosomes),
                      "counted": counted, "suggested": cell.summary.get("karyotype"), "reviewed": ckt, "role": role,
                      "abnormal": sorted(abnormal_classes(counts), key=CLASSES.index),
                      "low": sum(c.low_confidence for c in cell.chromosomes),
                      "changed": sum(c.changed_by_review for c in cell.chromosomes),
                      "flags": [FLAG_NAMES.get(str(f), str(f)) for f in cell.summary.get("flags") or []]})
    return CasePage(case_pk, view, state, rkt, cells, signoffs, events, report, version)


# --------------------------------------------------------------------------------------------------
# A cell: the karyogram


@dataclass
class Thumb:
    pk: int
    label: str | None
    predicted: str | None
    confidence: float | None
    width: int
    height: int
    marks: tuple[str, ...]
    label_id: int | None
    source_file: str


@dataclass
class Slot:
    name: str
    abnormal: bool
    thumbs: list[Thumb] = field(default_factory=list)


@dataclass
class CellPage:
    case_pk: int
    case_id: str
    review_state: str
    cell: CellView
    cell_pk: int
    role: str | None
    reviewed_karyotype: str | None
    rows: list[list[Slot]]
    loose: list[Thumb]
    not_chromosomes: list[Thumb]
    has_metaphase: bool
    cells: list[tuple[int, int]]  # (number, pk) of every cell of the case, for navigation
    scale: float


def cell_page(database: Database, cell_pk: int) -> CellPage:
    """The karyogram of one cell, laid out by report.layout (the PDF's code), with the newest label id of
    every chromosome (the optimistic check of a label change)."""
    with database.session() as s:
        row = s.execute(select(Cell.case_pk, Cell.role, Cell.reviewed_karyotype, Cell.image_png.isnot(None))
                        .where(Cell.id == cell_pk)).one_or_none()
        if row is None:
            raise CellNotFound(f"no cell with key {cell_pk}")
        case_pk, role, rkt, has_image = row
        case = s.get(Case, case_pk)
        assert case is not None
        case_id, state = case.case_id, case.review_state
        label_ids = {cid: lab.id for cid, lab in newest_labels(s, case_pk).items()}
        excluded = list(s.execute(select(Chromosome.id, Chromosome.source_file, Chromosome.width, Chromosome.height)
                                  .where(Chromosome.cell_id == cell_pk, Chromosome.not_chromosome.is_(True))
                                  .order_by(Chromosome.source_file)))
        has_polygons = s.execute(select(func.count()).select_from(Chromosome)
                                 .where(Chromosome.cell_id == cell_pk, Chromosome.polygon.isnot(None))).scalar_one()
    view = load_case_view(database, case_id)
    cell = next((c for c in view.all_cells if c.cell_id == cell_pk), None)
    if cell is None:
        raise CellNotFound(f"no cell with key {cell_pk}")
    kg = layout_karyogram(load_cell_crops(database, cell), paint=False, turn=cached_upright)
    by_id = {c.chromosome_id: c for c in cell.chromosomes}
    slots: dict[str, Slot] = {name: Slot(name, name in kg.abnormal) for row in KARYOGRAM_ROWS for name in row}
    loose: list[Thumb] = []
    for p in sorted(kg.placements, key=lambda p: (p.y, p.x)):
        c = by_id[p.chromosome_id]
        thumb = Thumb(p.chromosome_id, c.label, c.predicted, c.confidence, max(4, round(p.width * PAGE_SCALE)),
                      max(4, round(p.height * PAGE_SCALE)), p.marks, label_ids.get(p.chromosome_id), c.source_file)
        if p.slot == UNCLASSIFIED:
            loose.append(thumb)
        else:
            slots[p.slot].thumbs.append(thumb)
    nc = [Thumb(cid, None, None, None, max(4, round(min(w, 200) * kg.scale * PAGE_SCALE)),
                max(4, round(min(h, 400) * kg.scale * PAGE_SCALE)), (), label_ids.get(cid), src)
          for cid, src, w, h in excluded]
    rows = [[slots[name] for name in row] for row in KARYOGRAM_ROWS]
    return CellPage(case_pk, case_id, state, cell, cell_pk, role, rkt, rows, loose, nc,
                    bool(has_image) and bool(has_polygons), [(c.number, c.cell_id or 0) for c in view.all_cells],
                    kg.scale)


_UPRIGHT: OrderedDict[bytes, tuple[np.ndarray, float]] = OrderedDict()
_UPRIGHT_MAX = 4096  # crops of about 90 cells; a few tens of MB at most
_UPRIGHT_LOCK = threading.Lock()


def cached_upright(crop: np.ndarray) -> tuple[np.ndarray, float]:
    """ml.geometry.upright, remembered by the crop's content: a reviewer opens the same cell again after every
    change, and the thumbnails need the same turn."""
    key = hashlib.blake2b(crop.tobytes(), digest_size=16, person=str(crop.shape).encode()[:16]).digest()
    with _UPRIGHT_LOCK:
        hit = _UPRIGHT.get(key)
        if hit is not None:
            _UPRIGHT.move_to_end(key)
            return hit
    value = upright(crop)
    with _UPRIGHT_LOCK:
        _UPRIGHT[key] = value
        while len(_UPRIGHT) > _UPRIGHT_MAX:
            _UPRIGHT.popitem(last=False)
    return value


def _png(arr: np.ndarray | Image.Image) -> bytes:
    img = arr if isinstance(arr, Image.Image) else Image.fromarray(arr)
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def thumbnail(database: Database, chromosome_pk: int) -> tuple[bytes, str]:
    """A chromosome turned upright (as the karyogram places it), as PNG, and its content hash (the ETag)."""
    with database.session() as s:
        row = s.execute(select(Chromosome.crop_png, Chromosome.sha256).where(Chromosome.id == chromosome_pk)).first()
    if row is None:
        raise ChromosomeNotFound(f"no chromosome with key {chromosome_pk}")
    arr, _ = cached_upright(decode_png(row[0]))
    return _png(arr), row[1]


def metaphase_png(database: Database, cell_pk: int) -> bytes:
    """The cell's whole metaphase with each chromosome outlined and numbered: report.overlay's drawing, the
    one the PDF uses (blue: classified; red: low confidence, abnormal count or a cluster; orange: no class)."""
    from chromobatch.report.overlay import outlined_metaphase

    view = load_case_view(database, _case_id(database, cell_page_case(database, cell_pk)))
    cell = next((c for c in view.all_cells if c.cell_id == cell_pk), None)
    img = outlined_metaphase(database, cell, max_side=1200) if cell is not None else None
    if img is None:
        raise CellNotFound(f"cell key {cell_pk} has no metaphase image")
    return _png(img)


def cell_page_case(database: Database, cell_pk: int) -> int:
    """The case key of a cell (404 when there is no such cell)."""
    with database.session() as s:
        pk = s.execute(select(Cell.case_pk).where(Cell.id == cell_pk)).scalar_one_or_none()
    if pk is None:
        raise CellNotFound(f"no cell with key {cell_pk}")
    return int(pk)


def report_path(database: Database, case_pk: int) -> str | None:
    """Where the case's newest PDF report was written (None: not rendered yet); 404 for an unknown case."""
    with database.session() as s:
        row = s.execute(select(Case.report_path).where(Case.id == case_pk)).one_or_none()
    if row is None:
        raise CaseNotFound(f"no case with key {case_pk}")
    return row[0]
