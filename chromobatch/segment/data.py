"""Annotated metaphases for training and measuring segmenters: the bioimlab-metaphase layout
(`manifest.csv` with image, annotation, split; labelme polygons) and synthetic spreads written in the same
layout.

Images are returned *normalised* (uint8, dark chromosomes on a light background) the way a segmenter gets
them: Q-band images (bright on dark, detected from the border) are inverted.
"""

from __future__ import annotations

import csv
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from chromobatch.errors import DataError
from chromobatch.segment.base import Instance
from chromobatch.segment.metrics import read_labelme

log = logging.getLogger(__name__)

MANIFEST = "manifest.csv"


@dataclass
class Annotated:
    name: str
    grey: np.ndarray  # normalised uint8 (H, W)
    instances: list[Instance]


def normalise_metaphase(arr: np.ndarray) -> np.ndarray:
    """Any greyscale metaphase -> uint8, dark on light: rescaled to 8 bit, inverted when the border (the
    background) is darker than the middle of the intensity range (Q-band, fluorescence)."""
    from chromobatch.intake.imaging import rescale_to_uint8

    grey = arr if arr.dtype == np.uint8 else rescale_to_uint8(arr)
    border = np.concatenate([grey[0], grey[-1], grey[:, 0], grey[:, -1]])
    if float(np.median(border)) < 128:
        grey = 255 - grey
    return np.ascontiguousarray(grey)


def read_image(path: Path) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            arr = np.asarray(im.convert("L") if im.mode not in ("L", "I;16", "I") else im)
    except (OSError, UnidentifiedImageError) as exc:
        raise DataError(f"{path}: not a readable image: {exc}") from exc
    return normalise_metaphase(arr)


def manifest_rows(root: Path, split: str | None = None) -> list[dict[str, str]]:
    path = Path(root) / MANIFEST
    if not path.is_file():
        raise DataError(f"{path}: missing (a segmentation set holds {MANIFEST} with image,annotation,split)",
                        hint="Pass --data the bioimlab-metaphase folder (or a synthetic set written like it).")
    with path.open(newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    for key in ("image", "annotation"):
        if rows and key not in rows[0]:
            raise DataError(f"{path}: lacks the column {key!r}")
    if split is not None:
        rows = [r for r in rows if r.get("split", "") == split]
    return rows


def load_set(root: Path, split: str | None = None, limit: int | None = None) -> list[Annotated]:
    """The annotated images of one split of a segmentation set (all of them with split=None)."""
    root = Path(root)
    rows = manifest_rows(root, split)
    if limit is not None:
        rows = rows[:limit]
    out = []
    for r in rows:
        grey = read_image(root / r["image"])
        out.append(Annotated(name=Path(r["image"]).stem, grey=grey,
                             instances=read_labelme(root / r["annotation"], grey.shape[:2])))
    log.info("loaded %d annotated images from %s (split %s)", len(out), root, split or "all")
    return out
