"""The PDF: a portrait summary page per case, a landscape karyogram page per analysed cell.

Why: the lab signs out a case from a printed/PACS report, so the report must show what the software
suggested (and what a reviewer changed). The files of the case that ingest could not use are listed on
the summary pages with their reasons, and a cell that lost a file is marked "incomplete input".

Each cell's karyogram is drawn only when its page is (one image in memory at a time), and the PDF is not
kept in memory as a whole beyond what reportlab holds until it saves (about the size of the output file).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape

from chromobatch import CLASSES, __version__
from chromobatch.report.layout import KARYOGRAM_SIZE, abnormal_classes, font_path
from chromobatch.report.view import INCOMPLETE_FLAG, NOT_PROVIDED, CaseView, CellView, incomplete_note
from chromobatch.store.db import aware
from chromobatch.store.states import LabelSource

log = logging.getLogger(__name__)

#: DICOM tags shown in the header; the first seven are always listed ("not provided" when absent).
HEADER_TAGS: tuple[tuple[str, str], ...] = (
    ("PatientID", "Patient ID"), ("PatientName", "Patient name"), ("PatientBirthDate", "Birth date"),
    ("PatientSex", "Sex"), ("AccessionNumber", "Accession number"), ("StudyDate", "Study date"),
    ("StudyInstanceUID", "Study instance UID"), ("StudyID", "Study ID"), ("StudyDescription", "Study"),
    ("InstitutionName", "Institution"), ("ReferringPhysicianName", "Referring physician"),
)
ALWAYS_SHOWN = 7
NOT_PROCESSED = "not processed"
REVIEW_STATEMENT = ("Computer-assisted suggestion. Results require review and confirmation by a qualified "
                    "cytogeneticist before clinical use.")
CELL_UNKNOWN = "cell unknown"


@functools.lru_cache(maxsize=1)
def _pdf_fonts() -> tuple[str, str]:
    """Register DejaVu Sans when available (non-Latin-1 patient names); else the PDF base fonts."""
    regular, bold = font_path(False), font_path(True)
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
    return aware(value).astimezone(UTC).strftime("%Y-%m-%d %H:%M UTC")


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
    if view.signed is not None:
        return f"signed off by {view.signed.user} ({_fmt_time(view.signed.at)})"
    if not view.reviewed:
        return "unreviewed"
    return f"reviewed by {', '.join(view.reviewers)} (last change {_fmt_time(view.last_review_at)})"



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

    def __init__(self, view: CaseView, render: Callable[[CellView], Path],
                 render_metaphase: Callable[[CellView], Path] | None = None) -> None:
        """render: writes a cell's karyogram as a JPEG file and returns its path; called when the cell's
        page is drawn (one image in memory at a time), the file is deleted once it is in the PDF.
        render_metaphase: the same for the outlined metaphase of a cell that came as one (METAPHASE_SIZE)."""
        from reportlab.lib.styles import ParagraphStyle

        self.view = view
        self.render = render
        self.render_metaphase = render_metaphase
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
                    ("Cells read by this model", f"all {v.total_cells} (a {model['stain']} model)"
                     if "stain" in model else NOT_PROCESSED),
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
        out += self._sign_off()
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
            if cell.from_metaphase and self.render_metaphase is not None:
                out += self._metaphase_page(cell, frame_w, frame_h)
        return out

    def _metaphase_page(self, cell: CellView, frame_w: float, frame_h: float) -> list[Any]:
        """The metaphase the cell came from, each chromosome outlined and numbered by its class."""
        from reportlab.lib.units import mm
        from reportlab.platypus import PageBreak

        assert self.render_metaphase is not None
        mw, mh = METAPHASE_SIZE
        scale = min(frame_w / mw, (frame_h - 20 * mm) / mh)
        clusters = sum(1 for c in cell.chromosomes if "cluster" in c.flags and c.label is None)
        text = (f"<b>Cell {cell.number} of {self.view.total_cells} ({escape(cell.name)}), the metaphase</b>: "
                f"{cell.metaphase_count} chromosomes counted"
                + (f", {clusters} cluster(s) kept whole for review (red, ~N?: about N chromosomes, not classified)"
                   if clusters else "")
                + ". Outlines: blue, classified; red, low confidence or a class with an abnormal count; "
                  "orange, not classified.")
        return [PageBreak(), _karyogram_flowable()(cell, self.render_metaphase, mw * scale, mh * scale),
                self._p(text, "body")]

    def _sign_off(self) -> list[Any]:
        """Who signed the case, when, with which karyotype; reopenings; every label review changed."""
        from reportlab.lib import colors
        from reportlab.lib.units import mm
        from reportlab.platypus import Table, TableStyle

        v = self.view
        if not v.signoffs:
            return []
        out: list[Any] = [self._p("Sign-off", "h2")]
        signed = v.signed
        if signed is not None:
            rows = [("Signed by", signed.user), ("Signed at", _fmt_time(signed.at)),
                    ("Final karyotype (ISCN)", signed.karyotype or "-"), ("Comment", signed.comment or "-")]
        else:
            rows = [("State", "reopened after sign-off, not signed again")]
        for r in v.signoffs[:-1] if signed is not None else v.signoffs:
            what = "signed" if r.action == "signed" else "reopened"
            rows.append((f"Earlier: {what}", f"{_fmt_time(r.at)} by {r.user}"
                         + (f": {r.karyotype}" if r.karyotype else "") + (f" ({r.comment})" if r.comment else "")))
        out.append(self._kv_table(rows))
        changed = [(cell, c) for cell in v.all_cells for c in cell.chromosomes
                   if c.changed_by_review and c.label_source == LabelSource.REVIEWED]  # not imported labels
        out.append(self._p(f"Labels changed by review: {len(changed)}", "body"))
        if changed:
            data: list[list[Any]] = [[self._p(f"<b>{h}</b>", "cell") for h in
                                      ("Cell", "File", "Model", "Reviewed", "By")]]
            for cell, c in changed:
                data.append([self._p(str(cell.number), "cell"), self._p(escape(c.source_file), "cell"),
                             self._p(escape(c.predicted or "unclassified"), "cell"),
                             self._p(escape(str(c.label)), "cell"),
                             self._p(escape(c.reviewer or c.label_source), "cell")])
            table = Table(data, colWidths=[12 * mm, 78 * mm, 25 * mm, 25 * mm, 40 * mm], hAlign="LEFT", repeatRows=1)
            table.setStyle(TableStyle([("VALIGN", (0, 0), (-1, -1), "TOP"),
                                       ("LINEBELOW", (0, 0), (-1, 0), 0.6, colors.black),
                                       ("LINEBELOW", (0, 1), (-1, -1), 0.25, colors.lightgrey)]))
            out.append(table)
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
                            if c.label_source == LabelSource.REVIEWED})
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


#: The outlined metaphase page's image size (pixels); report.render letterboxes the drawing into it.
METAPHASE_SIZE = (1600, 1250)


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
    if view.signed is not None:
        return f"signed off by {view.signed.user}"
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


def build_pdf(view: CaseView, out: Path | Any, render: Callable[[CellView], Path],
              render_metaphase: Callable[[CellView], Path] | None = None) -> int:
    """Write the report to `out` (a path or a binary file object) and return its page count: portrait
    summary, landscape karyogram pages. render(cell) writes a cell's karyogram as a JPEG file (see _Report)."""
    from reportlab.lib.units import mm
    from reportlab.platypus import BaseDocTemplate, Frame, PageTemplate

    report = _Report(view, render, render_metaphase)
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
