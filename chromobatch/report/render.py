"""Karyogram reports, the entry point: `render_case_report` writes one case's PDF (per-cell PNGs on
request, the Encapsulated PDF for DICOM cases) from its view (`report.view`), karyogram layout
(`report.layout`), PDF (`report.pdf`) and DICOM wrapper (`report.dicom`).

Memory stays flat whatever the number of cells: each cell's crops are read and decoded in their own short
query when its page is drawn, its karyogram image is dropped right after, and the PDF is written to a
temporary file in the target folder (then renamed).

Patient identifiers appear in the report and the DICOM file only, never in log messages.
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from chromobatch.files import atomic_write
from chromobatch.report.dicom import write_encapsulated_pdf
from chromobatch.report.layout import Placement, layout_karyogram
from chromobatch.report.overlay import outlined_metaphase
from chromobatch.report.pdf import METAPHASE_SIZE, build_pdf
from chromobatch.report.view import CellView, load_case_view, load_cell_crops
from chromobatch.store.db import Database

log = logging.getLogger(__name__)


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

        def render_metaphase(cell: CellView) -> Path:
            """The outlined metaphase of a cell that came as one, letterboxed to METAPHASE_SIZE."""
            title = f"Case {view.case_id}  ·  cell {cell.number} ({cell.name})  ·  the metaphase, " \
                    f"{cell.metaphase_count} chromosomes counted"
            drawing = outlined_metaphase(database, cell, title=title, max_side=METAPHASE_SIZE[0])
            page = Image.new("RGB", METAPHASE_SIZE, (255, 255, 255))
            if drawing is not None:
                drawing.thumbnail(METAPHASE_SIZE)
                page.paste(drawing, ((METAPHASE_SIZE[0] - drawing.width) // 2, 0))
                drawing.close()
            jpeg = Path(pages_dir) / f"cell{cell.number}_metaphase.jpg"
            page.save(jpeg, format="JPEG", quality=92, subsampling=0)
            return jpeg

        pages = 0

        def write_pdf(tmp: Path) -> None:
            nonlocal pages
            pages = build_pdf(view, tmp, render, render_metaphase)

        atomic_write(pdf_path, write_pdf)
    dicom_path = None
    if view.is_dicom:
        dicom_path = write_encapsulated_pdf(pdf_path.read_bytes(), view, pdf_path.with_suffix(".dcm"),
                                            title=f"Karyogram report {view.case_id}")
    log.info("report for case %s: %d pages, %d cells, %d file(s) not used%s", view.case_id, pages,
             len(view.cells), len(view.rejected), ", Encapsulated PDF written" if dicom_path else "")
    return ReportResult(pdf_path, pngs, dicom_path, pages, placements)
