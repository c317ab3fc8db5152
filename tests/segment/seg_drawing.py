"""Tiny synthetic metaphase pieces for the segmenter tests: rods (chromosomes), a textured nucleus, specks."""

from __future__ import annotations

import numpy as np

from chromobatch.segment.base import Instance

BACKGROUND = 235
INK = 70


def rod(shape: tuple[int, int], p0: tuple[float, float], p1: tuple[float, float], radius: float) -> np.ndarray:
    """A capsule (all pixels within `radius` of the segment p0-p1, points as (x, y)) as a bool mask."""
    h, w = shape
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    (x0, y0), (x1, y1) = p0, p1
    dx, dy = x1 - x0, y1 - y0
    t = np.clip(((xx - x0) * dx + (yy - y0) * dy) / max(dx * dx + dy * dy, 1e-9), 0, 1)
    return np.asarray((xx - (x0 + t * dx)) ** 2 + (yy - (y0 + t * dy)) ** 2 <= radius * radius)


def disk(shape: tuple[int, int], centre: tuple[float, float], radius: float) -> np.ndarray:
    return rod(shape, centre, centre, radius)


def paint(masks: list[np.ndarray], shape: tuple[int, int], rng: np.random.Generator,
          extra: list[tuple[np.ndarray, int]] = ()) -> np.ndarray:  # type: ignore[assignment]
    """A normalised image: light background, the masks dark, `extra` (mask, grey) drawn too, a little noise."""
    img = np.full(shape, BACKGROUND, dtype=np.float64)
    for m in masks:
        img[m] = INK
    for m, grey in extra:
        img[m] = grey
    img += rng.normal(0, 3, shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def as_instance(mask: np.ndarray) -> Instance:
    ys, xs = np.nonzero(mask)
    y0, y1, x0, x1 = int(ys.min()), int(ys.max()) + 1, int(xs.min()), int(xs.max()) + 1
    return Instance(mask=mask[y0:y1, x0:x1].copy(), box=(x0, y0, x1, y1))
