"""The karyogram layout: one cell's chromosomes upright, at one scale per cell (a 1 must look bigger than
a 21), homologs side by side above their class number, doubtful chromosomes and abnormal counts marked.

The PDF draws its karyogram pages with it; the future web review will reuse it (`layout_karyogram`,
`Placement`: where each chromosome went and how it was marked).
"""

from __future__ import annotations

import functools
import importlib.util
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from chromobatch import CLASSES
from chromobatch.ml.geometry import background_level, upright
from chromobatch.report.view import CellView, ChromosomeView

#: The standard karyogram rows (ISCN): groups A-B, C + X, D-E, F-G + Y.
KARYOGRAM_ROWS: tuple[tuple[str, ...], ...] = (
    ("1", "2", "3", "4", "5"),
    ("6", "7", "8", "9", "10", "11", "12", "X"),
    ("13", "14", "15", "16", "17", "18"),
    ("19", "20", "21", "22", "Y"),
)
UNCLASSIFIED = "unclassified"
#: Karyogram image size in pixels: a landscape A4 page at ~180 dpi, the layout karyograms are read in.
KARYOGRAM_SIZE = (1920, 1100)
MAX_SCALE = 4.0

RED = (210, 20, 20)
BLUE = (20, 90, 220)
GREY = (110, 110, 110)
BLACK = (0, 0, 0)


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
def font_path(bold: bool = False) -> str | None:
    """DejaVu Sans from matplotlib (a dependency): Unicode names, same face in PNG and PDF."""
    spec = importlib.util.find_spec("matplotlib")
    if spec is None or not spec.submodule_search_locations:
        return None
    name = "DejaVuSans-Bold.ttf" if bold else "DejaVuSans.ttf"
    path = Path(list(spec.submodule_search_locations)[0]) / "mpl-data" / "fonts" / "ttf" / name
    return str(path) if path.is_file() else None


@functools.lru_cache(maxsize=16)
def _pil_font(size: int, bold: bool = False) -> Any:
    path = font_path(bold)
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


#: Turns a crop upright: (the upright image, the angle); the web review passes a cached one.
Turn = Callable[[np.ndarray], tuple[np.ndarray, float]]


@dataclass
class _Row:
    slots: list[tuple[str, list[tuple[ChromosomeView, np.ndarray, float]]]]
    wrap: bool = False  # the unclassified row wraps onto several lines


def _rows_for(cell: CellView, turn: Turn = upright) -> list[_Row]:
    by_class: dict[str, list[tuple[ChromosomeView, np.ndarray, float]]] = defaultdict(list)
    loose: list[tuple[ChromosomeView, np.ndarray, float]] = []
    for chrom in cell.chromosomes:
        if chrom.crop is None:
            raise ValueError(f"chromosome {chrom.chromosome_id}: crop not loaded (load_cell_crops first)")
        arr, angle = turn(chrom.crop)
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


def layout_karyogram(cell: CellView, *, title: str = "", size: tuple[int, int] = KARYOGRAM_SIZE,
                     paint: bool = True, turn: Turn = upright) -> Karyogram:
    """Draw one cell's karyogram; every chromosome of the cell is placed exactly once (see placements).

    paint=False computes the same placements without drawing (the web review shows each chromosome's own
    thumbnail where the layout put it; the image is then blank); `turn` turns a crop upright.
    """
    width, height = size
    rows = _rows_for(cell, turn)
    s = _scale_for(rows, width, height)
    abnormal = abnormal_classes(cell.counts())
    canvas = np.full((height, width, 3) if paint else (1, 1, 3), 255, dtype=np.uint8)
    placements: list[Placement] = []
    boxes: list[tuple[tuple[int, int, int, int], tuple[int, int, int]]] = []
    numbers: list[tuple[int, int, str, tuple[int, int, int]]] = []
    rules: list[tuple[int, int, int]] = []
    avail = width - 2 * _MARGIN

    def place(item: tuple[ChromosomeView, np.ndarray, float], slot: str, x: int, base: int) -> int:
        chrom, arr, angle = item
        w, h = max(1, round(arr.shape[1] * s)), max(1, round(arr.shape[0] * s))
        y = base - h
        if paint:
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
    if not paint:
        return Karyogram(img, placements, s, abnormal)
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
