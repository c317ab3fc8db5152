"""A whole metaphase with every chromosome outlined and numbered by its class: how a cytogeneticist checks
that the count and the cut are right before trusting the karyogram beside it.

Shared by the PDF report and the web review (one drawing, as `layout` is for the karyogram). Colours follow
the karyogram: blue outline for a classified chromosome, red for a low-confidence one or a class with an
abnormal count, and a thick red outline with "~N?" for a cluster kept whole for review.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from chromobatch.intake.imaging import decode_png
from chromobatch.report.layout import BLUE, RED, _pil_font, abnormal_classes
from chromobatch.report.view import CellView
from chromobatch.store.db import Cell, Chromosome, Database

ORANGE = (230, 120, 0)


@dataclass(frozen=True)
class Outline:
    chromosome_id: int
    instance: int | None
    polygon: list[list[int]]
    box: list[int]
    cluster: int


def load_metaphase(database: Database, cell: CellView) -> tuple[np.ndarray, list[Outline]] | None:
    """The cell's metaphase image and every chromosome's outline; None for a cell delivered as crops."""
    if cell.cell_id is None:
        return None
    with database.session() as s:
        png = s.query(Cell.image_png).filter(Cell.id == cell.cell_id).scalar()
        if png is None:
            return None
        rows = s.query(Chromosome.id, Chromosome.instance, Chromosome.polygon, Chromosome.box,
                       Chromosome.flags).filter(Chromosome.cell_id == cell.cell_id, Chromosome.polygon.is_not(None))
        outlines = [Outline(cid, inst, list(poly or []), list(box or []), int((flags or {}).get("cluster", 0)))
                    for cid, inst, poly, box, flags in rows]
    return decode_png(png), outlines


def draw_metaphase(grey: np.ndarray, outlines: list[Outline], cell: CellView, *, title: str = "",
                   max_side: int = 1600) -> Image.Image:
    """The metaphase (as delivered, dark on light) in colour with outlines and class numbers."""
    scale = max(1.0, min(3.0, max_side / max(grey.shape)))
    base = Image.fromarray(grey).convert("RGB")
    if scale != 1.0:
        base = base.resize((round(grey.shape[1] * scale), round(grey.shape[0] * scale)), Image.Resampling.BICUBIC)
    top = 48 if title else 0
    canvas = Image.new("RGB", (base.width, base.height + top), (255, 255, 255))
    canvas.paste(base, (0, top))
    draw = ImageDraw.Draw(canvas)
    font = _pil_font(max(12, round(11 * scale)), bold=True)
    if title:
        draw.text((8, 10), title, fill=(0, 0, 0), font=_pil_font(26, bold=True))
    shown = {c.chromosome_id: c for c in cell.chromosomes}
    abnormal = abnormal_classes(Counter(c.label for c in cell.chromosomes if c.label is not None))
    for o in outlines:
        if len(o.polygon) < 3:
            continue
        view = shown.get(o.chromosome_id)
        label = view.label if view is not None else None
        if o.cluster > 1 and label is None:
            colour, text, width = RED, f"~{o.cluster}?", 3
        elif view is not None and (view.low_confidence or label in abnormal):
            colour, text, width = RED, label or "?", 2
        elif label is None:
            colour, text, width = ORANGE, "?", 2
        else:
            colour, text, width = BLUE, label, 2
        pts = [(x * scale, y * scale + top) for x, y in o.polygon]
        draw.line(pts + [pts[0]], fill=colour, width=width, joint="curve")
        x0, y0 = o.box[0] * scale, o.box[1] * scale + top
        tw, fs = draw.textlength(text, font=font), float(getattr(font, "size", 12))
        tx, ty = max(0.0, x0 - tw - 2), max(float(top), y0 - fs)
        draw.rectangle([tx - 1, ty - 1, tx + tw + 1, ty + fs + 1], fill=(255, 255, 255))
        draw.text((tx, ty), text, fill=colour, font=font)
    return canvas


def outlined_metaphase(database: Database, cell: CellView, *, title: str = "", max_side: int = 1600
                       ) -> Image.Image | None:
    """The drawing for one cell, or None when the cell came as crops (the web review and the PDF use this)."""
    got = load_metaphase(database, cell)
    if got is None:
        return None
    grey, outlines = got
    return draw_metaphase(grey, outlines, cell, title=title, max_side=max_side)
