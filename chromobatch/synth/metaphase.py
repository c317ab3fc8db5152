"""Synthetic whole metaphase spreads with exact instance masks, and the negatives a metaphase reader must reject.

Why: a lab's microscope delivers one image per cell, not chromosome crops; the segmenter needs G- and Q-band
spreads with ground truth, and only Q-band spreads (bioimlab-metaphase) are annotated. Every chromosome is
drawn by the crop renderer (``render.chromosome_density``) at the native scale of a 768 x 576 camera frame
(chromosomes ~15-110 px long, ~10-14 px wide, as in bioimlab-metaphase), at a random angle and bend, into
one stain-density plane; the plane is exposed once (illumination gradient, absorption (G) or fluorescence
(Q), optical blur, camera noise, gamma), so overlaps are darker (G) or brighter (Q) as on a slide.

Ground truth is exact: an instance's mask is the set of pixels its chromatid capsules cover
(``body > 0`` in the renderer; a gap between the sister chromatids that the chromosome encloses is filled,
as an annotator's outline would include it), recorded per instance (overlaps included) and as a label map (overlap
pixels go to the chromosome drawn last, i.e. on top). Nuclei and debris are drawn but are never part of a
chromosome mask (they get masks of their own). Touching (8-adjacent, no shared pixel) and overlapping
(shared pixels) pairs are placed on purpose at the rates asked for, everything else keeps a gap of at
least ``min_gap`` background pixels; the flags are measured on the final masks, not taken from the intent.

All randomness comes from the ``rng`` passed in: the same seed gives the same image and masks.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from scipy import ndimage

from chromobatch.errors import ConfigError
from chromobatch.synth.ideogram import RESOLUTIONS, check_label
from chromobatch.synth.karyotypes import NORMAL_KARYOTYPES, karyotype_labels
from chromobatch.synth.render import (
    CONDENSATION_RANGE,
    Imaging,
    _smooth_noise,
    check_style,
    chromosome_density,
    draw_imaging,
)

#: Image size (width, height) of the bioimlab-metaphase camera frames.
DEFAULT_SIZE: tuple[int, int] = (768, 576)
#: Magnification relative to the crop renderer (chromosome 1 ~100 px at condensation 1): drawn per image.
#: Measured on 12 Q-band spreads: mask lengths (tip to tip) median ~42 px, 98th percentile ~100 px, widths
#: median ~8 px; the bioimlab-metaphase polygons, drawn a few px outside the chromosomes, give 46 / 109 / 12.
SCALE_RANGE: tuple[float, float] = (0.72, 1.0)


def _grow(mask: np.ndarray, r: int) -> np.ndarray:
    """``mask`` dilated by ``r`` px in chessboard distance (8-connected), same shape (pad first to keep it)."""
    return ndimage.maximum_filter(mask.view(np.uint8), size=2 * r + 1, mode="constant") > 0


@dataclass
class Metaphase:
    """One synthetic metaphase image and its ground truth.

    Instance ``k`` (1..N) is ``classes[k - 1]``, ``boxes[k - 1]`` (x0, y0, x1, y1; x1, y1 exclusive, the
    convention of ``segment.base.Instance``) and ``masks[k - 1]`` (bool, the box's shape; the whole
    chromosome, overlapped parts included). ``labels`` cannot hold overlaps: a pixel shared by two
    chromosomes carries the one drawn last (on top); ``overlap`` marks those pixels.
    """

    image: np.ndarray  # uint8 (H, W), in the stain's own polarity (G dark on light, Q bright on dark)
    labels: np.ndarray  # int32 (H, W): 0 background (nuclei and debris included), k = instance k
    classes: list[str]
    boxes: list[tuple[int, int, int, int]]
    masks: list[np.ndarray]
    overlapping: list[bool]  # shares pixels with another chromosome
    touching: list[bool]  # 8-adjacent to another chromosome without sharing pixels with it
    contacts: list[tuple[int, int, str]]  # (k, l, "touch" | "overlap"), k < l
    overlap: np.ndarray  # bool (H, W): pixels covered by two or more chromosomes
    nuclei: np.ndarray  # bool (H, W): interphase nuclei (not chromosomes)
    debris: np.ndarray  # bool (H, W): specks and clouds of debris (not chromosomes)
    stain: str
    karyotype: str | None  # of the cell drawn; with partial frames the image may hold fewer chromosomes
    truncated: list[bool] = field(default_factory=list)  # cut by the image edge (partial frames)
    info: dict[str, float | int | str] = field(default_factory=dict)

    @property
    def count(self) -> int:
        return len(self.classes)

    @property
    def shape(self) -> tuple[int, int]:
        return (int(self.image.shape[0]), int(self.image.shape[1]))

    def full_mask(self, k: int) -> np.ndarray:
        """The whole mask of instance ``k`` (1..N) in image coordinates, overlapped parts included."""
        if not 1 <= k <= self.count:
            raise IndexError(f"instance {k} not in 1..{self.count}")
        out = np.zeros(self.shape, dtype=bool)
        x0, y0, x1, y1 = self.boxes[k - 1]
        out[y0:y1, x0:x1] = self.masks[k - 1]
        return out

    def full_masks(self) -> np.ndarray:
        """All instance masks as one (N, H, W) bool array (memory: N x H x W bytes)."""
        out = np.zeros((self.count, *self.shape), dtype=bool)
        for i, ((x0, y0, x1, y1), m) in enumerate(zip(self.boxes, self.masks, strict=True)):
            out[i, y0:y1, x0:x1] = m
        return out


@dataclass
class _Piece:
    """A chromosome ready to place: its density and mask cropped to the mask's box, and dilations of it."""

    label: str
    density: np.ndarray
    mask: np.ndarray
    near: np.ndarray  # mask dilated by 1 px, padded by 1 (contact test)
    clear: np.ndarray  # mask dilated by min_gap px, padded by min_gap (gap test)


def _check_size(size: tuple[int, int]) -> tuple[int, int]:
    try:
        w, h = (int(size[0]), int(size[1]))
    except (TypeError, ValueError, IndexError):
        raise ConfigError(f"size must be (width, height), got {size!r}") from None
    if not (64 <= w <= 8192 and 64 <= h <= 8192):
        raise ConfigError(f"size must be 64..8192 px on each side, got {size!r}")
    return w, h


def _check_rate(name: str, value: float) -> float:
    if not 0.0 <= value <= 1.0:
        raise ConfigError(f"{name} must be a fraction 0..1, got {value!r}")
    return float(value)


def _piece(label: str, rng: np.random.Generator, stain: str, resolution: int, condensation: float,
           imaging: Imaging, scale: float, min_gap: int, bend: float, splay: float) -> _Piece:
    splay = splay * float(rng.uniform(0.4, 1.6)) if splay else 0.0
    drawn = chromosome_density(label, rng, style=stain, resolution=resolution, condensation=condensation,
                               imaging=imaging, scale=scale, tight=True, bend=bend, splay=splay)
    mask = drawn.body > 0
    if mask[0].any() or mask[-1].any() or mask[:, 0].any() or mask[:, -1].any():  # never seen; never cut
        drawn = chromosome_density(label, rng, style=stain, resolution=resolution, condensation=condensation,
                                   imaging=imaging, scale=scale, splay=splay)
        mask = drawn.body > 0
    ys, xs = np.nonzero(mask)
    sl = (slice(ys.min(), ys.max() + 1), slice(xs.min(), xs.max() + 1))
    # a gap between sister chromatids closed at both ends is inside the chromosome (as an annotator's outline)
    mask = ndimage.binary_fill_holes(mask[sl])
    near = _grow(np.pad(mask, 1), 1)
    clear = _grow(np.pad(mask, min_gap), min_gap)
    return _Piece(label, np.where(mask, drawn.density[sl], 0.0), mask, near, clear)


class _Canvas:
    """Where chromosomes have been put: coverage counts and the topmost owner of every pixel."""

    def __init__(self, h: int, w: int, edge: int) -> None:
        self.h, self.w, self.edge = h, w, edge
        self.count = np.zeros((h, w), dtype=np.uint8)
        self.owner = np.zeros((h, w), dtype=np.int32)
        self.density = np.zeros((h, w), dtype=np.float32)
        self.boxes: list[tuple[int, int, int, int]] = []
        self.masks: list[np.ndarray] = []
        self.overlapping: list[bool] = []  # running estimates that steer the placement (final: _contacts)
        self.touching: list[bool] = []

    def inside(self, piece: _Piece, x: int, y: int) -> bool:
        mh, mw = piece.mask.shape
        e = self.edge
        return x >= e and y >= e and x + mw <= self.w - e and y + mh <= self.h - e

    def hits(self, m: np.ndarray, x: int, y: int) -> np.ndarray:
        """Coverage under mask ``m`` placed with its top-left at (x, y) (clipped at the image border)."""
        mh, mw = m.shape
        x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + mw, self.w), min(y + mh, self.h)
        return self.count[y0:y1, x0:x1][m[y0 - y:y1 - y, x0 - x:x1 - x]]

    def is_clear(self, piece: _Piece, x: int, y: int, gap: int) -> bool:
        return self.inside(piece, x, y) and not self.hits(piece.clear, x - gap, y - gap).any()

    def _owners(self, m: np.ndarray, x: int, y: int) -> set[int]:
        mh, mw = m.shape
        x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + mw, self.w), min(y + mh, self.h)
        return set(np.unique(self.owner[y0:y1, x0:x1][m[y0 - y:y1 - y, x0 - x:x1 - x]]).tolist()) - {0}

    def keeps_gap(self, piece: _Piece, x: int, y: int, gap: int) -> bool:
        """Whether every chromosome within ``gap`` px of the piece at (x, y) is one it touches or overlaps."""
        return self._owners(piece.clear, x - gap, y - gap) <= self._owners(piece.near, x - 1, y - 1)

    def put(self, piece: _Piece, x: int, y: int) -> None:
        mh, mw = piece.mask.shape
        k = len(self.boxes) + 1
        sl = (slice(y, y + mh), slice(x, x + mw))
        over = self._owners(piece.mask, x, y)
        near = self._owners(piece.near, x - 1, y - 1) - over
        for j in over:
            self.overlapping[j - 1] = True
        for j in near:
            self.touching[j - 1] = True
        self.overlapping.append(bool(over))
        self.touching.append(bool(near))
        self.count[sl] += piece.mask
        self.owner[sl][piece.mask] = k
        self.density[sl] += piece.density
        self.boxes.append((x, y, x + mw, y + mh))
        self.masks.append(piece.mask)


def _place_clear(canvas: _Canvas, piece: _Piece, rng: np.random.Generator, centre: tuple[float, float],
                 radii: list[float], gap: int) -> bool:
    """Somewhere in the spread with at least ``gap`` free pixels around; the spread widens when crowded."""
    mh, mw = piece.mask.shape
    for attempt in range(400):
        if attempt and attempt % 40 == 0:
            radii[0] *= 1.1
            radii[1] *= 1.1
        r = math.sqrt(rng.random())
        phi = rng.uniform(0, 2 * math.pi)
        cx = centre[0] + radii[0] * r * math.cos(phi)
        cy = centre[1] + radii[1] * r * math.sin(phi)
        x, y = int(round(cx - mw / 2)), int(round(cy - mh / 2))
        if canvas.is_clear(piece, x, y, gap):
            canvas.put(piece, x, y)
            return True
    return False


def _place_against(canvas: _Canvas, piece: _Piece, rng: np.random.Generator, kind: str,
                   max_overlap: float, gap: int) -> bool:
    """Slide the chromosome towards a placed one until it touches it (or crosses it, for "overlap")."""
    mh, mw = piece.mask.shape
    area = int(piece.mask.sum())
    for _ in range(12):
        j = int(rng.integers(len(canvas.boxes)))
        bx0, by0, bx1, by1 = canvas.boxes[j]
        tx, ty = (bx0 + bx1) / 2, (by0 + by1) / 2
        phi = rng.uniform(0, 2 * math.pi)
        d = math.hypot(bx1 - bx0, by1 - by0) / 2 + math.hypot(mw, mh) / 2 + 2
        # overlap: push on past the first contact, from a tip resting on the other to a full crossing
        extra = int(rng.integers(2, max(3, max(mh, mw) // 2 + 2))) if kind == "overlap" else 0
        contact = False
        past = 0  # steps taken since the first contact
        while d > 0:
            x = int(round(tx + d * math.cos(phi) - mw / 2))
            y = int(round(ty + d * math.sin(phi) - mh / 2))
            d -= 1.0
            if not canvas.inside(piece, x, y):
                if contact:
                    break
                continue
            if not contact:
                if not canvas.hits(piece.near, x - 1, y - 1).any():
                    continue
                contact = True
                under = canvas.hits(piece.mask, x, y)
                if under.any():  # came in from outside the image already on top of something
                    break
                if kind == "touch":
                    if not canvas.keeps_gap(piece, x, y, gap):
                        break
                    canvas.put(piece, x, y)
                    return True
            past += 1
            if past < extra:
                continue
            under = canvas.hits(piece.mask, x, y)
            if not under.any() or (under > 1).any():  # missed, or would make a triple layer
                break
            sl = (slice(y, y + mh), slice(x, x + mw))
            owners = np.unique(canvas.owner[sl][piece.mask & (canvas.count[sl] > 0)])
            if owners.size != 1:
                break
            other = int(canvas.masks[int(owners[0]) - 1].sum())
            if int((under > 0).sum()) > max_overlap * min(area, other) or not canvas.keeps_gap(piece, x, y, gap):
                break
            canvas.put(piece, x, y)
            return True
    return False


def _cut_to_frame(canvas: _Canvas, pad: int, h: int, w: int, min_visible: int
                  ) -> tuple[list[tuple[int, int, int, int]], list[np.ndarray], list[int], list[bool]]:
    """The placed masks in frame coordinates, cut at its edges: (boxes, masks, kept piece indices, truncated)."""
    boxes, masks, kept, truncated = [], [], [], []
    for i, ((bx0, by0, bx1, by1), mk) in enumerate(zip(canvas.boxes, canvas.masks, strict=True)):
        x0, y0, x1, y1 = bx0 - pad, by0 - pad, bx1 - pad, by1 - pad
        cx0, cy0, cx1, cy1 = max(x0, 0), max(y0, 0), min(x1, w), min(y1, h)
        if cx0 >= cx1 or cy0 >= cy1:
            continue
        part = mk[cy0 - y0:cy1 - y0, cx0 - x0:cx1 - x0]
        if int(part.sum()) < min(min_visible, int(mk.sum())):
            continue
        ys, xs = np.nonzero(part)  # tighten the box to what is left
        part = part[ys.min():ys.max() + 1, xs.min():xs.max() + 1]
        boxes.append((cx0 + int(xs.min()), cy0 + int(ys.min()), cx0 + int(xs.max()) + 1, cy0 + int(ys.max()) + 1))
        masks.append(part)
        kept.append(i)
        truncated.append(int(part.sum()) < int(mk.sum()))
    return boxes, masks, kept, truncated


def _contacts(boxes: list[tuple[int, int, int, int]], masks: list[np.ndarray]) -> list[tuple[int, int, str]]:
    """Touching (8-adjacent, nothing shared) and overlapping (pixels shared) pairs, measured on the masks."""
    out = []
    for a in range(len(boxes)):
        ax0, ay0, ax1, ay1 = boxes[a]
        near = _grow(np.pad(masks[a], 1), 1)
        for b in range(a + 1, len(boxes)):
            bx0, by0, bx1, by1 = boxes[b]
            x0, y0 = max(ax0 - 1, bx0), max(ay0 - 1, by0)
            x1, y1 = min(ax1 + 1, bx1), min(ay1 + 1, by1)
            if x0 >= x1 or y0 >= y1:
                continue
            mb = masks[b][y0 - by0:y1 - by0, x0 - bx0:x1 - bx0]
            if not (near[y0 - ay0 + 1:y1 - ay0 + 1, x0 - ax0 + 1:x1 - ax0 + 1] & mb).any():
                continue
            ix0, iy0, ix1, iy1 = max(ax0, bx0), max(ay0, by0), min(ax1, bx1), min(ay1, by1)
            shared = ix0 < ix1 and iy0 < iy1 and bool(
                (masks[a][iy0 - ay0:iy1 - ay0, ix0 - ax0:ix1 - ax0]
                 & masks[b][iy0 - by0:iy1 - by0, ix0 - bx0:ix1 - bx0]).any())
            out.append((a + 1, b + 1, "overlap" if shared else "touch"))
    return out


# ------------------------------------------------------------------------------------------ optics
@dataclass(frozen=True)
class _Optics:
    stain: str
    level: float  # G: background brightness; Q: background offset
    contrast: float  # G: absorbance of a fully stained band; Q: grey levels of one
    blur: float
    noise: float
    gamma: float


def _draw_optics(rng: np.random.Generator, stain: str, imaging: Imaging) -> _Optics:
    if stain == "G":  # bright-field: from crisp and dark to soft and pale (the iroh example is the latter)
        return _Optics("G", rng.uniform(205, 250), rng.uniform(0.35, 1.0), rng.uniform(0.8, 2.0),
                       rng.uniform(1.5, 4.0), rng.uniform(0.9, 1.15))
    return _Optics("Q", rng.uniform(0, 14), rng.uniform(150, 230), imaging.blur * rng.uniform(0.8, 1.1),
                   rng.uniform(1.5, 4.0), rng.uniform(0.9, 1.15))


def _illumination(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A smooth field around 1: a linear gradient, vignetting and faint low-frequency unevenness.

    Every term is a sum or product of a function of x and one of y, so it is built from 1-D vectors.
    """
    f32 = np.float32
    xn = np.arange(w, dtype=f32) / f32(w) - f32(0.5)
    yn = np.arange(h, dtype=f32) / f32(h) - f32(0.5)
    gx, gy = (f32(v) for v in rng.normal(0, 0.05, 2))  # ~10% end to end at 2 sigma
    cx, cy = (f32(v) for v in rng.normal(0, 0.15, 2))
    vignette = f32(rng.uniform(0.0, 0.12))
    fx = gx * xn - vignette * (xn - cx) ** 2
    fy = f32(1) + gy * yn - vignette * (yn - cy) ** 2
    field_ = fy[:, None] + fx[None, :]
    for _ in range(3):  # faint low-frequency unevenness: a few long waves, cos(a + b) = cos a cos b - sin a sin b
        kx, ky = rng.normal(0, 1.2, 2)
        amp, phase = f32(rng.uniform(0, 0.006)), rng.uniform(0, 6.3)
        a = (2 * np.pi * kx * xn + phase).astype(f32)
        b = (2 * np.pi * ky * yn).astype(f32)
        field_ += amp * (np.cos(b)[:, None] * np.cos(a)[None, :] - np.sin(b)[:, None] * np.sin(a)[None, :])
    return np.clip(field_, f32(0.5), f32(1.5))


def _expose(density: np.ndarray, optics: _Optics, rng: np.random.Generator) -> np.ndarray:
    """Stain density (H, W) to the camera's uint8 image in the stain's own polarity."""
    h, w = density.shape
    f32 = np.float32
    light = _illumination(rng, h, w)
    density = density.astype(f32, copy=False)
    if optics.stain == "G":  # transmitted light: absorbance adds up, overlaps are darker
        img = f32(optics.level) * light * np.exp(f32(-optics.contrast) * density)
    else:  # fluorescence: emission adds up, overlaps are brighter; the background offset is uneven too
        img = f32(optics.level) * (f32(2) - light) + f32(optics.contrast) * light * density
    img = ndimage.gaussian_filter(img, optics.blur, mode="nearest")
    shot = np.sqrt(np.maximum(img, f32(0)) * f32(1 / 255))  # photon noise grows with the signal
    noise = rng.standard_normal(img.shape, dtype=f32)
    noise *= f32(optics.noise) * (f32(0.4) + f32(0.6) * shot)
    img += noise
    np.clip(img, f32(0), f32(255), out=img)
    if optics.gamma != 1.0:
        img = f32(255) * (img * f32(1 / 255)) ** f32(optics.gamma)
    return np.round(img).astype(np.uint8)


# ------------------------------------------------------------------------------------------ nuclei, debris
def _nucleus(rng: np.random.Generator, scale: float, stain: str) -> tuple[np.ndarray, np.ndarray]:
    """(density, mask) of one interphase nucleus: a round, slightly irregular, granular blob."""
    a = scale * rng.uniform(55, 105)  # bioimlab-metaphase nuclei: ~70-85 px in radius
    b = a * rng.uniform(0.75, 1.0)
    theta = rng.uniform(0, math.pi)
    half = int(math.ceil(a)) + 4
    yy, xx = np.mgrid[-half:half + 1, -half:half + 1].astype(np.float64)
    u = xx * math.cos(theta) + yy * math.sin(theta)
    v = -xx * math.sin(theta) + yy * math.cos(theta)
    n = xx.shape[0]
    wobble = 1 + 0.04 * _smooth_noise(rng, (n, n), n / 6)
    r = np.sqrt((u / a) ** 2 + (v / b) ** 2) / wobble
    mask = r < 1.0
    edge = 1 / (1 + np.exp((r - 0.97) / 0.02))
    grain = 0.5 * _smooth_noise(rng, (n, n), rng.uniform(1.2, 2.5)) + 0.5 * _smooth_noise(rng, (n, n), 5.0)
    level = rng.uniform(0.55, 0.95) if stain == "Q" else rng.uniform(0.35, 0.6)  # Q: as bright as chromosomes
    dens = edge * level * (1 + rng.uniform(0.15, 0.3) * grain)
    return np.clip(dens, 0, None) * mask, mask


def _speck(rng: np.random.Generator, scale: float) -> tuple[np.ndarray, np.ndarray]:
    """(density, mask) of a small speck of debris, or now and then a faint fibrous cloud."""
    if rng.random() < 0.12:
        rad = scale * rng.uniform(8, 22)
        half = int(math.ceil(2 * rad)) + 2
        yy, xx = np.mgrid[-half:half + 1, -half:half + 1]
        n = xx.shape[0]
        lump = np.exp(-(xx**2 + yy**2) / (2 * rad**2)) * (1 + 0.6 * _smooth_noise(rng, (n, n), rad / 2))
        fibres = _smooth_noise(rng, (n, n), rng.uniform(1.0, 2.0))
        dens = np.clip(lump - 0.35, 0, None) * np.clip(fibres + 0.3, 0, None) * rng.uniform(0.15, 0.4)
        return dens, dens > 0.01
    rad = scale * rng.uniform(0.7, 2.8)
    half = int(math.ceil(rad)) + 1
    yy, xx = np.mgrid[-half:half + 1, -half:half + 1]
    mask = xx**2 + yy**2 <= rad**2
    return mask * rng.uniform(0.3, 1.3), mask


def _add_blobs(rng: np.random.Generator, density: np.ndarray, out_mask: np.ndarray, keep_off: np.ndarray,
               blobs: list[tuple[np.ndarray, np.ndarray]], *, margin: int, allow_partial: bool) -> int:
    """Drop each (density, mask) blob at a random place that stays ``margin`` px off ``keep_off``."""
    h, w = density.shape
    placed = 0
    far = _grow(keep_off, margin)
    for dens, mask in blobs:
        bh, bw = mask.shape
        lo_x, lo_y = (-bw // 3, -bh // 3) if allow_partial else (0, 0)
        hi_x, hi_y = (w - 2 * bw // 3, h - 2 * bh // 3) if allow_partial else (w - bw, h - bh)
        if hi_x <= lo_x or hi_y <= lo_y:
            continue
        for _ in range(40):
            x, y = int(rng.integers(lo_x, hi_x)), int(rng.integers(lo_y, hi_y))
            x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + bw, w), min(y + bh, h)
            sub = (slice(y0 - y, y1 - y), slice(x0 - x, x1 - x))
            if (far[y0:y1, x0:x1] & mask[sub]).any():
                continue
            density[y0:y1, x0:x1] += dens[sub]
            out_mask[y0:y1, x0:x1] |= mask[sub]
            placed += 1
            break
    return placed


# ------------------------------------------------------------------------------------------ spreads
def render_metaphase(
    rng: np.random.Generator,
    *,
    karyotype: str | None = None,
    labels: list[str] | None = None,
    stain: str = "G",
    size: tuple[int, int] = DEFAULT_SIZE,
    scale: float | None = None,
    resolution: int | None = None,
    condensation: float | None = None,
    splay: float | None = None,
    crowding: float | None = None,
    overlap_rate: float = 0.08,
    touch_rate: float = 0.15,
    nuclei: int | None = None,
    debris: int | None = None,
    min_gap: int = 2,
    partial: bool = False,
    min_visible: int = 30,
) -> Metaphase:
    """One whole metaphase spread as a microscope delivers it, with exact instance masks.

    ``karyotype`` (an ISCN name from synth.karyotypes; None: 46,XX or 46,XY at random) or ``labels`` (the
    classes to draw, e.g. a spread that lost chromosomes) say what is in the cell. ``size`` is (width,
    height). ``scale`` is the magnification relative to the crop renderer (None: drawn from SCALE_RANGE),
    ``condensation`` the chromosomes' length factor (longer and thinner above 1, as in prometaphase; None:
    drawn for the band level ``resolution``), ``splay`` how far the sister chromatids part towards the
    telomeres, in chromatid radii (None: 0.3-1.0 in 40% of the short metaphase cells, else 0; 0: never),
    ``crowding`` the spread's area per chromosome area (None: drawn from 2.5..7; lower is more crowded).
    ``overlap_rate`` and ``touch_rate`` are the fractions of chromosomes meant to overlap or touch another
    (each event involves two, so about rate x N / 2 events are placed; the flags on the result are measured).
    ``nuclei``/``debris`` are counts (None: drawn; 0-2 nuclei, 0-40 specks). Chromosomes stay ``min_gap``
    px apart unless they touch or overlap on purpose, and whole inside the frame unless ``partial``: then
    the frame holds part of a spread that runs over one edge (as some bioimlab-metaphase frames); chromosomes
    cut by the edge are kept with the part inside and flagged ``truncated``, those with fewer than
    ``min_visible`` px inside are left out of the truth (``info["drawn"]`` counts all drawn).
    """
    check_style(stain)
    w, h = _check_size(size)
    overlap_rate = _check_rate("overlap_rate", overlap_rate)
    touch_rate = _check_rate("touch_rate", touch_rate)
    if not isinstance(min_gap, int) or not 1 <= min_gap <= 10:
        raise ConfigError(f"min_gap must be an integer 1..10 px, got {min_gap!r}")
    if labels is not None:
        if karyotype is not None:
            raise ConfigError("give a karyotype or a list of labels, not both")
        cell = [check_label(lab) for lab in labels]  # "chr1", "23" -> 1, X: classes are class names
        if not cell:
            raise ConfigError("a metaphase needs at least one chromosome (render_blank_field draws none)")
    else:
        if karyotype is None:
            karyotype = str(rng.choice(NORMAL_KARYOTYPES))
        cell = karyotype_labels(karyotype)
    if resolution is None:
        resolution = int(rng.choice(RESOLUTIONS, p=[0.6, 0.3, 0.1]))
    elif resolution not in RESOLUTIONS:
        raise ConfigError(f"band resolution must be one of {RESOLUTIONS}, got {resolution!r}")
    lo, hi = CONDENSATION_RANGE[resolution]
    drawn_condensation = float(rng.uniform(lo, hi))
    if condensation is None:
        condensation = drawn_condensation
    elif not 0.5 <= condensation <= 3.0:
        raise ConfigError(f"condensation must be within 0.5..3, got {condensation!r}")
    if scale is None:
        scale = float(rng.uniform(*SCALE_RANGE)) / math.sqrt(condensation)  # longer cells: wider field
    if crowding is None:
        crowding = float(rng.uniform(2.5, 7.0))
    elif not 1.0 <= crowding <= 50.0:
        raise ConfigError(f"crowding must be within 1..50, got {crowding!r}")
    imaging = draw_imaging(rng, stain)
    if stain == "G":  # whole slides show softer bands than karyogram crops (no contrast stretch per crop)
        imaging = replace(imaging, base=float(rng.uniform(0.3, 0.55)))
    optics = _draw_optics(rng, stain, imaging)

    order = rng.permutation(len(cell))
    bend = float(rng.uniform(0.8, 1.2)) * max(condensation, 1.0) ** 1.5  # long chromosomes curl more
    # short metaphase chromosomes often show their sister chromatids parted towards the tips
    drawn_splay = float(rng.uniform(0.3, 1.0)) if condensation < 1.15 and rng.random() < 0.4 else 0.0
    if splay is None:
        splay = drawn_splay
    elif not 0.0 <= splay <= 3.0:
        raise ConfigError(f"splay must be within 0..3 chromatid radii, got {splay!r}")
    pieces = [_piece(cell[i], rng, stain, resolution, condensation, imaging, scale, min_gap, bend, splay)
              for i in order]
    area = sum(int(p.mask.sum()) for p in pieces)
    radius = math.sqrt(crowding * area / math.pi)
    aspect = rng.uniform(0.75, 1.0)
    if partial:
        # a frame that holds part of a spread: the spread runs over one edge; chromosomes are placed on a
        # canvas padded by the largest one, then cut at the frame (those left with < min_visible px dropped)
        pad = max(max(p.mask.shape) for p in pieces) + 8
        radii = [radius / math.sqrt(aspect), radius * math.sqrt(aspect)]
        side = int(rng.integers(4))
        inward = float(rng.uniform(-0.4, 0.6))  # centre's distance inside the edge, in spread radii
        cx = pad + float(rng.uniform(0.2, 0.8)) * w
        cy = pad + float(rng.uniform(0.2, 0.8)) * h
        if side == 0:
            cx = pad + inward * radii[0]
        elif side == 1:
            cx = pad + w - inward * radii[0]
        elif side == 2:
            cy = pad + inward * radii[1]
        else:
            cy = pad + h - inward * radii[1]
        centre = (cx, cy)
    else:
        pad = 0
        radii = [min(radius / math.sqrt(aspect), 0.48 * w), min(radius * math.sqrt(aspect), 0.48 * h)]
        # the microscopist centres the cell, more or less
        centre = (float(np.clip(w / 2 + rng.normal(0, 0.12 * w), min(radii[0], w / 2), max(w - radii[0], w / 2))),
                  float(np.clip(h / 2 + rng.normal(0, 0.12 * h), min(radii[1], h / 2), max(h - radii[1], h / 2))))
    canvas = _Canvas(h + 2 * pad, w + 2 * pad, edge=2)
    for i, piece in enumerate(pieces):
        # Steer towards the rates asked for: the shortfall of flagged chromosomes (an event flags two).
        want_o = min(max(overlap_rate * (i + 2) - sum(canvas.overlapping), 0.0), 1.0)
        want_t = min(max(touch_rate * (i + 2) - sum(canvas.touching), 0.0), 1.0)
        u = rng.random()
        kind = "clear"
        if canvas.boxes:
            kind = "overlap" if u < want_o / 2 else "touch" if u < (want_o + want_t) / 2 else kind
        if kind != "clear" and _place_against(canvas, piece, rng, kind, max_overlap=0.3, gap=min_gap):
            continue
        if not _place_clear(canvas, piece, rng, centre, radii, min_gap):
            raise ConfigError(f"{len(pieces)} chromosomes at scale {scale:.2f} do not fit in a {w} x {h} image",
                              hint="Use a larger size, a smaller scale or a lower crowding.")

    frame = (slice(pad, pad + h), slice(pad, pad + w))
    density = canvas.density[frame].copy()
    chromosomes = canvas.count[frame] > 0
    boxes, masks, kept, truncated = _cut_to_frame(canvas, pad, h, w, min_visible)
    classes = [pieces[i].label for i in kept]
    label_map = np.zeros((h, w), dtype=np.int32)
    coverage = np.zeros((h, w), dtype=np.uint8)
    for k, ((x0, y0, x1, y1), mk) in enumerate(zip(boxes, masks, strict=True), start=1):
        label_map[y0:y1, x0:x1][mk] = k  # drawn in order: the last one is on top
        coverage[y0:y1, x0:x1] += mk
    nucleus_mask = np.zeros((h, w), dtype=bool)
    n_nuclei = int(rng.choice([0, 1, 2], p=[0.4, 0.45, 0.15])) if nuclei is None else int(nuclei)
    placed_nuclei = 0
    for _ in range(n_nuclei):
        placed_nuclei += _add_blobs(rng, density, nucleus_mask, chromosomes | nucleus_mask,
                                    [_nucleus(rng, scale, stain)], margin=6, allow_partial=True)
    debris_mask = np.zeros((h, w), dtype=bool)
    n_debris = int(rng.integers(0, 41)) if debris is None else int(debris)
    _add_blobs(rng, density, debris_mask, chromosomes | nucleus_mask, [_speck(rng, scale) for _ in range(n_debris)],
               margin=3, allow_partial=False)
    image = _expose(density, optics, rng)

    contacts = _contacts(boxes, masks)
    n = len(boxes)
    overlapping = [False] * n
    touching = [False] * n
    for a, b, kind in contacts:
        flags = overlapping if kind == "overlap" else touching
        flags[a - 1] = flags[b - 1] = True
    return Metaphase(
        image=image, labels=label_map, classes=classes, boxes=boxes, masks=masks, overlapping=overlapping,
        touching=touching, contacts=contacts, overlap=coverage > 1, nuclei=nucleus_mask, debris=debris_mask,
        stain=stain, karyotype=karyotype, truncated=truncated,
        info={"resolution": resolution, "condensation": round(condensation, 4), "scale": round(scale, 4),
              "crowding": round(crowding, 3), "nuclei": placed_nuclei, "blur": round(optics.blur, 3),
              "noise": round(optics.noise, 3), "splay": round(splay, 3), "drawn": len(pieces)})


# ------------------------------------------------------------------------------------------ negatives
def _sheet_optics(rng: np.random.Generator, stain: str) -> _Optics:
    """A scanned print or screen grab: even light, little blur and noise."""
    if stain == "G":
        return _Optics("G", rng.uniform(235, 252), rng.uniform(0.8, 1.4), rng.uniform(0.5, 0.8),
                       rng.uniform(0.5, 1.5), 1.0)
    return _Optics("Q", rng.uniform(0, 8), rng.uniform(150, 230), rng.uniform(0.5, 0.8), rng.uniform(0.5, 1.5), 1.0)


def render_blank_field(rng: np.random.Generator, *, stain: str = "G", size: tuple[int, int] = DEFAULT_SIZE,
                       debris: int | None = None) -> np.ndarray:
    """A field with no cell in it: uneven background, noise and a few specks of debris (a negative)."""
    check_style(stain)
    w, h = _check_size(size)
    scale = float(rng.uniform(*SCALE_RANGE))
    density = np.zeros((h, w))
    n = int(rng.integers(0, 25)) if debris is None else int(debris)
    _add_blobs(rng, density, np.zeros((h, w), dtype=bool), np.zeros((h, w), dtype=bool),
               [_speck(rng, scale) for _ in range(n)], margin=0, allow_partial=False)
    return _expose(density, _draw_optics(rng, stain, draw_imaging(rng, stain)), rng)


def render_nucleus_only(rng: np.random.Generator, *, stain: str = "G", size: tuple[int, int] = DEFAULT_SIZE,
                        nuclei: int | None = None) -> np.ndarray:
    """One to three interphase nuclei and some debris, no metaphase (a negative)."""
    check_style(stain)
    w, h = _check_size(size)
    scale = float(rng.uniform(*SCALE_RANGE))
    density = np.zeros((h, w))
    taken = np.zeros((h, w), dtype=bool)
    n = int(rng.integers(1, 4)) if nuclei is None else int(nuclei)
    if n < 1:
        raise ConfigError(f"a nucleus-only image needs at least one nucleus, got {nuclei!r}")
    placed = 0
    for _ in range(n):  # one at a time, apart from each other
        placed += _add_blobs(rng, density, taken, taken.copy(), [_nucleus(rng, scale, stain)], margin=4,
                             allow_partial=False)
    if placed == 0:
        raise ConfigError(f"no nucleus fits in a {w} x {h} image", hint="Use a larger size.")
    _add_blobs(rng, density, np.zeros((h, w), dtype=bool), taken,
               [_speck(rng, scale) for _ in range(int(rng.integers(0, 20)))], margin=3, allow_partial=False)
    return _expose(density, _draw_optics(rng, stain, draw_imaging(rng, stain)), rng)


#: Rows of a printed karyogram (ISCN order).
KARYOGRAM_ROWS: tuple[tuple[str, ...], ...] = (
    ("1", "2", "3", "4", "5"), ("6", "7", "8", "9", "10", "11", "12"), ("13", "14", "15", "16", "17", "18"),
    ("19", "20", "21", "22", "X", "Y"))


def _text_mask(text: str, height: int) -> np.ndarray:
    """``text`` rendered as a boolean mask about ``height`` px tall (Pillow's built-in font, no files)."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default(size=max(int(height), 6))
    left, top, right, bottom = font.getbbox(text)
    img = Image.new("L", (int(math.ceil(right - left)) + 2, int(math.ceil(bottom - top)) + 2), 0)
    ImageDraw.Draw(img).text((1 - left, 1 - top), text, fill=255, font=font)
    return np.asarray(img) > 96


def _cropped(density: np.ndarray) -> np.ndarray:
    ys, xs = np.nonzero(density > 0)
    return density[ys.min():ys.max() + 1, xs.min():xs.max() + 1]


def render_karyogram_sheet(rng: np.random.Generator, *, stain: str = "G", size: tuple[int, int] = (1024, 768),
                           karyotype: str | None = None) -> np.ndarray:
    """A printed karyogram: the chromosomes of one cell upright in ISCN rows, each class pair over a line
    with its number beneath (a negative: a report page, not what a microscope delivers)."""
    check_style(stain)
    w, h = _check_size(size)
    if karyotype is None:
        karyotype = str(rng.choice(NORMAL_KARYOTYPES))
    cell = karyotype_labels(karyotype)
    resolution = int(rng.choice(RESOLUTIONS, p=[0.5, 0.4, 0.1]))
    lo, hi = CONDENSATION_RANGE[resolution]
    condensation = float(rng.uniform(lo, hi))
    imaging = draw_imaging(rng, stain)
    gap = 6
    rows = []
    for classes in KARYOGRAM_ROWS:
        groups = []
        for c in classes:
            copies = [_cropped(chromosome_density(c, rng, style=stain, resolution=resolution,
                                                  condensation=condensation, imaging=imaging, upright=True,
                                                  tight=True).density) for _ in range(cell.count(c))]
            groups.append((c, copies))
        rows.append(groups)
    label_h = 14
    sheet_rows = []
    for groups in rows:
        height = max((d.shape[0] for _, copies in groups for d in copies), default=20)
        blocks = []
        for c, copies in groups:
            width = max(sum(d.shape[1] for d in copies) + gap * max(len(copies) - 1, 0), 24)
            block = np.zeros((height + 5 + label_h + 2, width))
            x = (width - sum(d.shape[1] for d in copies) - gap * max(len(copies) - 1, 0)) // 2
            for d in copies:  # chromosomes stand on the line
                block[height - d.shape[0]:height, x:x + d.shape[1]] = d
                x += d.shape[1] + gap
            block[height + 2:height + 4, :] = 1.0  # the line under the pair
            text = _text_mask(c, label_h - 2)
            tx = max((width - text.shape[1]) // 2, 0)
            th, tw = text.shape[0], min(text.shape[1], width - tx)
            ty = height + 6
            block[ty:ty + th, tx:tx + tw] = np.maximum(block[ty:ty + th, tx:tx + tw], text[:, :tw] * 1.0)
            blocks.append(block)
        spacer = np.zeros((blocks[0].shape[0], 28))
        row = np.concatenate([part for b in blocks for part in (b, spacer)][:-1], axis=1)
        sheet_rows.append(row)
    width = max(r.shape[1] for r in sheet_rows) + 80
    height = sum(r.shape[0] for r in sheet_rows) + 30 * (len(sheet_rows) - 1) + 80
    sheet = np.zeros((height, width))
    y = 40
    for r in sheet_rows:
        x = (width - r.shape[1]) // 2
        sheet[y:y + r.shape[0], x:x + r.shape[1]] = r
        y += r.shape[0] + 30
    zoom = min(w / width, h / height)
    small = ndimage.zoom(sheet, zoom, order=1)
    density = np.zeros((h, w))
    oy, ox = (h - small.shape[0]) // 2, (w - small.shape[1]) // 2
    density[oy:oy + small.shape[0], ox:ox + small.shape[1]] = small
    return _expose(density, _sheet_optics(rng, stain), rng)


#: The negatives by name, as case folders and tests ask for them: (rng, *, stain) -> uint8 image.
NEGATIVES: dict[str, Callable[..., np.ndarray]] = {
    "blank": render_blank_field, "nucleus": render_nucleus_only, "karyogram": render_karyogram_sheet}


# ------------------------------------------------------------------------------------------ training sets
def mask_polygon(mask: np.ndarray, origin: tuple[int, int] = (0, 0)) -> list[list[float]]:
    """The outline of a boolean mask as labelme points [[x, y], ...] in image pixels (pixel centres at
    integers), traced between inside and outside pixel centres, so rasterising it (pixel centres inside
    the polygon) gives the mask back up to the odd boundary pixel. The longest outline when it has several.
    """
    from skimage.measure import find_contours

    contours = find_contours(np.pad(mask, 1).astype(np.float32), 0.5)
    if not contours:
        return []
    best = max(contours, key=len)
    x0, y0 = origin
    return [[round(float(c) - 1 + x0, 2), round(float(r) - 1 + y0, 2)] for r, c in best[:-1]]


def write_segmentation_set(out_dir: Path, n: int, stain: str, rng: np.random.Generator, *,
                           size: tuple[int, int] = DEFAULT_SIZE, val_fraction: float = 0.1) -> Path:
    """Write ``n`` synthetic metaphases with exact instance masks for training a segmenter; return the manifest.

    Layout (the bioimlab-metaphase layout, so the same loader reads real and synthetic sets)::

        OUT/manifest.csv        image,annotation,labels,masks,stain,instances,overlapping,touching,nuclei,split
        OUT/images/<name>.png   the metaphase, 8-bit greyscale, in the stain's own polarity (Q bright on dark)
        OUT/annotations/<name>.json  labelme 4.5-style: one polygon per chromosome, label "chr" (as
                                the real set), plus "class" (1..22, X, Y), "overlapping", "touching" and
                                "truncated" (cut by the frame's edge)
        OUT/labels/<name>.png   uint16 label map: 0 background, k = chromosome k; a pixel two chromosomes
                                share carries the one on top (drawn last); nuclei and debris are 0
        OUT/masks/<name>.npz    exact masks: "masks" (N, H, ceil(W/8)) uint8 = np.packbits of the (N, H, W)
                                bool instance masks along the last axis (overlaps included; unpack with
                                np.unpackbits(a, axis=-1, count=W)), "classes" (N,) str, "boxes" (N, 4)
                                x0,y0,x1,y1 (exclusive), "overlapping"/"touching" (N,) bool, "nuclei" and
                                "debris" packed the same way (H, ceil(W/8))

    ``stain`` is G, Q or GQ (alternating, for a mixed set). Each image draws its own cell (46,XX or 46,XY,
    now and then an aneuploid one or a spread that lost a few chromosomes), scale, crowding and rates of
    touching (0.05-0.3) and overlapping (0.02-0.2) chromosomes; 15% are partial frames (the spread runs over
    an edge; chromosomes cut by it keep their inside part, "truncated" in the annotation). ``split`` is train
    or val (by image).
    """
    import csv
    import json

    from chromobatch.errors import InputError
    from chromobatch.intake.imaging import encode_png
    from chromobatch.synth.karyotypes import KARYOTYPES

    stains = list(stain) if stain == "GQ" else [check_style(stain)]
    if not isinstance(n, int) or n < 1:
        raise ConfigError(f"n must be a positive integer, got {n!r}")
    if not 0.0 <= val_fraction < 1.0:
        raise ConfigError(f"val_fraction must be within 0..1, got {val_fraction!r}")
    out_dir = Path(out_dir)
    manifest = out_dir / "manifest.csv"
    if manifest.exists():
        raise InputError(f"{out_dir} already holds a segmentation set; synthetic data is never overwritten",
                         hint="Write to an empty output folder.")
    for sub in ("images", "annotations", "labels", "masks"):
        (out_dir / sub).mkdir(parents=True, exist_ok=True)
    n_val = int(round(val_fraction * n))
    val = set(rng.permutation(n)[:n_val].tolist())
    rows = []
    names = list(KARYOTYPES)
    for i, child in enumerate(rng.spawn(n)):
        st = stains[i % len(stains)]
        kt = str(child.choice(NORMAL_KARYOTYPES)) if child.random() < 0.85 else str(child.choice(names))
        cell = karyotype_labels(kt)
        if child.random() < 0.2:  # a spread that lost chromosomes (or a frame that holds part of one)
            keep = child.permutation(len(cell))[:len(cell) - int(child.integers(1, 11))]
            cell = [cell[j] for j in sorted(keep)]
        m = render_metaphase(child, labels=cell, stain=st, size=size, overlap_rate=float(child.uniform(0.02, 0.2)),
                             touch_rate=float(child.uniform(0.05, 0.3)), partial=bool(child.random() < 0.15))
        name = f"syn_{st}_{i + 1:05d}"
        h, w = m.shape
        (out_dir / "images" / f"{name}.png").write_bytes(encode_png(m.image))
        (out_dir / "labels" / f"{name}.png").write_bytes(encode_png(m.labels.astype(np.uint16)))
        np.savez_compressed(out_dir / "masks" / f"{name}.npz", masks=np.packbits(m.full_masks(), axis=-1),
                            classes=np.array(m.classes), boxes=np.array(m.boxes, dtype=np.int32).reshape(-1, 4),
                            overlapping=np.array(m.overlapping), touching=np.array(m.touching),
                            nuclei=np.packbits(m.nuclei, axis=-1), debris=np.packbits(m.debris, axis=-1))
        shapes: list[dict[str, object]] = [{"label": "chr", "points": mask_polygon(mk, (b[0], b[1])), "group_id": None,
                   "shape_type": "polygon", "flags": {}, "class": c, "overlapping": o, "touching": t, "truncated": tr}
                  for mk, b, c, o, t, tr in zip(m.masks, m.boxes, m.classes, m.overlapping, m.touching, m.truncated,
                                                strict=True)]
        doc = {"version": "4.5.7", "flags": {}, "shapes": shapes, "imagePath": f"../images/{name}.png",
               "imageData": None, "imageHeight": h, "imageWidth": w,
               "synthetic": {"stain": st, "karyotype": kt, **m.info}}
        (out_dir / "annotations" / f"{name}.json").write_text(json.dumps(doc) + "\n")
        rows.append([f"images/{name}.png", f"annotations/{name}.json", f"labels/{name}.png", f"masks/{name}.npz",
                     st, m.count, sum(m.overlapping), sum(m.touching), int(m.info["nuclei"]),
                     "val" if i in val else "train"])
    with manifest.open("w", newline="") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(["image", "annotation", "labels", "masks", "stain", "instances", "overlapping", "touching",
                         "nuclei", "split"])
        writer.writerows(rows)
    return manifest
