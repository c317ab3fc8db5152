"""Synthetic G-/Q-banded chromosome crops and cells rendered from the ideogram (chromobatch.synth.ideogram).

Every chromosome's length follows its ISCN length and its band pattern the cytoband stains; a cell's
chromosomes share one band level, one condensation and one set of acquisition settings. All randomness comes
from the ``rng`` passed in (``seeded_rng``: the same keys give the same pixels).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from chromobatch.errors import ConfigError
from chromobatch.synth.ideogram import (
    ACROCENTRIC,
    RESOLUTIONS,
    BandedChromosome,
    banded_chromosome,
    check_label,
)
from chromobatch.synth.karyotypes import karyotype_labels

STYLES: tuple[str, ...] = ("G", "Q")
#: Pixels per ISCN length unit at condensation 1.0: chromosome 1 (15100 units) ~100 px, 21 (3200) ~21 px,
#: close to the real G-band crops (median height of chr1 110 px, chr21 25 px, margins included).
PX_PER_ISCN = 0.0066
#: Smoothing of the band pattern along the axis, in ISCN units: fewer bands = more condensed = blurrier.
BAND_BLUR_ISCN = {400: 80.0, 550: 55.0, 850: 35.0}
#: Condensation range of a cell at each band level (prometaphase cells are longer).
CONDENSATION_RANGE = {400: (0.8, 1.15), 550: (1.0, 1.3), 850: (1.2, 1.5)}
#: Staining of each gieStain class relative to gpos100 (G-banding; Q-bands are bright where these are high).
STAIN_DARKNESS = {"gneg": 0.0, "gpos25": 0.3, "gpos50": 0.55, "gpos75": 0.78, "gpos100": 1.0,
                  "acen": 0.5, "gvar": 0.75, "stalk": 0.05}


@dataclass(frozen=True)
class Imaging:
    """Acquisition settings of one cell image, shared by all its chromosomes (same slide, same camera)."""

    style: str
    background: float  # grey level of the background
    contrast: float  # grey levels from background to a fully stained band
    base: float  # staining of a gneg band relative to gpos100 (chromatin is never unstained)
    blur: float  # optical blur, Gaussian sigma in px
    noise: float  # camera noise, grey levels
    gamma: float
    texture: float  # granularity of the chromatin
    width: float  # chromatid width relative to the default (spreading and optics differ between labs)
    clean_background: bool  # background set to a flat level, as in crops cut from a karyogram


def check_style(style: str) -> str:
    """``style`` if it is G or Q, else a ConfigError."""
    if style not in STYLES:
        raise ConfigError(f"style must be G (dark bands on light) or Q (bright on dark), got {style!r}")
    return style


def seeded_rng(*keys: int) -> np.random.Generator:
    """A generator seeded from integer keys (seed, case, cell): the same keys draw the same numbers."""
    return np.random.default_rng(np.random.SeedSequence([int(k) for k in keys]))


def draw_imaging(rng: np.random.Generator, style: str = "G") -> Imaging:
    """Random acquisition settings for one cell in the given style."""
    check_style(style)
    if style == "G":
        background = min(255.0, rng.uniform(230, 290))
        return Imaging("G", background, background - rng.uniform(10, 60), rng.uniform(0.3, 0.52),
                       rng.uniform(0.6, 1.0), rng.uniform(1.0, 4.5), rng.uniform(0.85, 1.2),
                       rng.uniform(0.12, 0.25), rng.uniform(0.92, 1.1), bool(rng.random() < 0.6))
    background = rng.uniform(0, 10)
    return Imaging("Q", background, rng.uniform(140, 215) - background, rng.uniform(0.55, 0.72),
                   rng.uniform(1.0, 1.6), rng.uniform(1.0, 4.0), rng.uniform(0.9, 1.2),
                   rng.uniform(0.05, 0.12), rng.uniform(0.7, 0.88), bool(rng.random() < 0.5))


def _band_stain(ch: BandedChromosome, style: str, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Per-band stain (0..~1.4) and width factor for one chromosome copy, with copy-to-copy variation."""
    n = len(ch.stains)
    stain = np.array([STAIN_DARKNESS.get(s, 0.0) for s in ch.stains])
    stain = np.clip(stain + rng.normal(0.0, 0.05, n), 0.0, 1.0)
    width = np.ones(n)
    for i, (s, name) in enumerate(zip(ch.stains, ch.names, strict=True)):
        satellite = ch.label in ACROCENTRIC and name.startswith("p1") and s == "gvar"
        if s == "stalk":
            width[i] = rng.uniform(0.3, 0.45)
        elif satellite:
            width[i] = rng.uniform(0.65, 0.85)
        if style == "G":
            if s == "gvar":  # heterochromatin: variable between homologues
                stain[i] = rng.uniform(0.2, 0.6) if satellite else rng.uniform(0.45, 1.0)
        else:  # Q-banding: distal Yq brilliant, 1/9/16 heterochromatin dull, 3cen/4cen/satellites variable
            if s == "gvar":
                if ch.label == "Y":
                    stain[i] = rng.uniform(1.25, 1.5)
                elif satellite or ch.label == "3":
                    stain[i] = rng.uniform(0.2, 1.3)
                else:
                    stain[i] = rng.uniform(0.05, 0.3)
            elif s == "acen" and ch.label in ("3", "4") and rng.random() < 0.3:
                stain[i] = rng.uniform(1.1, 1.4)
    return stain, width


def _centreline(length: float, rng: np.random.Generator, upright: bool, t_cen: float,
                bend_scale: float = 1.0) -> np.ndarray:
    """Points of a smoothly bent axis of the given arc length, (n+1, 2) as (x, y) with y down; ``bend_scale``
    multiplies the bending (long prometaphase chromosomes on a slide curl more)."""
    n = int(np.clip(math.ceil(length / 7.0), 2, 16))
    t = (np.arange(n) + 0.5) / n
    a1 = rng.normal(0.0, 1.3 if rng.random() < 0.15 else 0.4)
    a2 = rng.normal(0.0, 0.35)
    kink = rng.normal(0.0, 0.5) if rng.random() < 0.3 else 0.0
    bend = a1 * (t - 0.5) + a2 * (4 * (t - 0.5) ** 2 - 1 / 3) + kink / (1 + np.exp(-(t - t_cen) / 0.04))
    if bend_scale != 1.0:
        bend = bend * bend_scale
    if upright:
        theta0 = math.pi / 2 + rng.normal(0.0, 0.05)
        bend = bend * 0.5
    else:
        theta0 = rng.uniform(0.0, 2 * math.pi)
    theta = theta0 + bend - bend.mean()
    step = length / n
    pts = np.zeros((n + 1, 2))
    pts[1:, 0] = np.cumsum(step * np.cos(theta))
    pts[1:, 1] = np.cumsum(step * np.sin(theta))
    return pts


def _axis_coordinates(pts: np.ndarray, px: np.ndarray, py: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each pixel: arc position along the axis and signed distance across it.

    Beyond either end the arc position runs on (negative or past the end) and the distance is the
    perpendicular one, so caps can be drawn per chromatid.
    """
    a = pts[:-1]
    d = pts[1:] - a
    seg2 = (d**2).sum(axis=1)
    seglen = np.sqrt(seg2)
    cum = np.concatenate([[0.0], np.cumsum(seglen)[:-1]])
    rx = px[None, :] - a[:, 0, None]
    ry = py[None, :] - a[:, 1, None]
    t = (rx * d[:, 0, None] + ry * d[:, 1, None]) / seg2[:, None]
    tc = np.clip(t, 0.0, 1.0)
    dx = rx - tc * d[:, 0, None]
    dy = ry - tc * d[:, 1, None]
    dist2 = dx * dx + dy * dy
    k = dist2.argmin(axis=0)
    cols = np.arange(px.size)
    tk = t[k, cols]
    beyond = ((k == 0) & (tk < 0)) | ((k == len(a) - 1) & (tk > 1))
    cross = (d[k, 0] * ry[k, cols] - d[k, 1] * rx[k, cols]) / seglen[k]
    across = np.where(beyond, cross, np.copysign(np.sqrt(dist2[k, cols]), cross))
    return cum[k] + np.where(beyond, tk, tc[k, cols]) * seglen[k], across


def _smooth_noise(rng: np.random.Generator, shape: int | tuple[int, ...], sigma: float) -> np.ndarray:
    """Gaussian-smoothed white noise rescaled to unit standard deviation (approximately)."""
    field = ndimage.gaussian_filter(rng.standard_normal(shape), sigma, mode="wrap")
    dims = 1 if isinstance(shape, int) else len(shape)
    return field * (2 * math.sqrt(math.pi) * sigma) ** (dims / 2)


def _axis_profiles(ch: BandedChromosome, style: str, resolution: int, rng: np.random.Generator, total_px: float,
                   px_per_iscn: float) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Band pattern, width and sister spread along the axis: (grid in ISCN units, stain, width, spread).

    Sampled ~4x per pixel and smoothed (by band level; widths ~1 px); the chromatids narrow at the centromere.
    """
    stain, width_factor = _band_stain(ch, style, rng)
    n_grid = max(int(total_px * 4), 16)
    step_iscn = ch.length / n_grid
    grid = (np.arange(n_grid) + 0.5) * step_iscn
    band_idx = np.clip(np.searchsorted(ch.starts, grid, side="right") - 1, 0, len(ch.starts) - 1)
    profile = ndimage.gaussian_filter1d(stain[band_idx], BAND_BLUR_ISCN[resolution] / step_iscn, mode="nearest")
    widths = ndimage.gaussian_filter1d(width_factor[band_idx], 4.0, mode="nearest")
    cen_sigma = max(ch.acen_half, 1.8 / px_per_iscn)
    widths *= 1 - rng.uniform(0.4, 0.55) * np.exp(-0.5 * ((grid - ch.centromere) / cen_sigma) ** 2)
    widths *= 1 + 0.05 * _smooth_noise(rng, n_grid, 8.0)  # chromatids are not perfect cylinders
    spread = 1 + 0.12 * _smooth_noise(rng, n_grid, 10.0)  # sisters part and close along the arms
    return grid, profile, widths, spread


def _expose(density: np.ndarray, im: Imaging, style: str, rng: np.random.Generator) -> np.ndarray:
    """Stain density (h, w) to a uint8 image: contrast, optical blur, camera noise and gamma of ``im``."""
    contrast = im.contrast * rng.uniform(0.92, 1.08)
    sign = -1.0 if style == "G" else 1.0
    img = ndimage.gaussian_filter(im.background + sign * contrast * density, im.blur, mode="nearest")
    # Camera noise; weaker on the background (at most 2 grey levels, none when cleaned) so that the
    # chromosome stays the only thing > 12 levels off the background, as ingest's crop expects.
    on_chromosome = ndimage.gaussian_filter(density, 1.0) > 0.02
    background_noise = 0.0 if im.clean_background else min(im.noise, 2.0) / im.noise
    noise = rng.normal(0.0, im.noise, img.shape) * np.where(on_chromosome, 1.0, background_noise)
    img = np.clip(img + noise, 0.0, 255.0)
    img = 255.0 * (img / 255.0) ** im.gamma
    return np.round(img).astype(np.uint8)


@dataclass(frozen=True)
class ChromosomeDensity:
    """One chromosome drawn as stain density before exposure, in a local box of the image plane.

    ``density`` (h, w) float: stain relative to gpos100 (0 off the chromosome); ``body`` (h, w) float in 0..1:
    how much of the chromatid capsules covers each pixel (0 exactly off the chromosome: its rendered pixels
    are ``body > 0``); ``origin``: the (x, y) of the box's top-left pixel in the frame the axis was drawn in.
    """

    density: np.ndarray
    body: np.ndarray
    origin: tuple[float, float]


def chromosome_density(
    label: str,
    rng: np.random.Generator,
    *,
    style: str = "G",
    resolution: int = 400,
    condensation: float = 1.0,
    imaging: Imaging | None = None,
    upright: bool = False,
    scale: float = 1.0,
    tight: bool = False,
    bend: float = 1.0,
    splay: float = 0.0,
) -> ChromosomeDensity:
    """The stain density of one chromosome, before optics and camera (see render_chromosome).

    ``scale`` magnifies length and width together (the microscope's pixel size): 1.0 is the crop scale,
    whole metaphases (chromobatch.synth.metaphase) draw several chromosomes at one scale into one image.
    ``tight`` leaves a 2 px margin instead of the crop's blur and background margin (same random draws);
    ``bend`` multiplies the axis's bending; ``splay`` parts the sister chromatids towards the telomeres (held
    at the centromere: the X of a colcemid metaphase), in chromatid radii at the tip of the longer arm.
    """
    label = check_label(label)
    check_style(style)
    if not (0.2 <= condensation <= 4.0):
        raise ConfigError(f"condensation must be within 0.2..4, got {condensation!r}")
    if not (0.1 <= scale <= 10.0):
        raise ConfigError(f"scale must be within 0.1..10, got {scale!r}")
    ch = banded_chromosome(label, resolution)
    im = imaging if imaging is not None else draw_imaging(rng, style)
    if im.style != style:
        raise ConfigError(f"imaging settings are for style {im.style}, not {style}")

    cond = condensation * rng.uniform(0.95, 1.05)
    px_per_iscn = PX_PER_ISCN * cond * scale
    half_width = rng.uniform(7.0, 8.5) * im.width * cond**-0.25 * scale
    radius = half_width * rng.uniform(0.52, 0.58)  # of one chromatid
    offset = radius * rng.uniform(0.62, 0.85)  # of each chromatid from the axis: sets the groove depth
    total_px = ch.length * px_per_iscn
    arc = max(total_px - 2 * radius, 1.0)

    grid, profile, widths, spread = _axis_profiles(ch, style, resolution, rng, total_px, px_per_iscn)

    pts = _centreline(arc, rng, upright, ch.centromere / ch.length, bend)
    margin = half_width + 3 * im.blur + int(rng.integers(3, 9)) + splay * radius
    if tight:
        margin = half_width * 1.7 + 2 + splay * radius  # the outline's wobble and the satellites stay inside
    x0, y0 = pts.min(axis=0) - margin
    x1, y1 = pts.max(axis=0) + margin
    w, h = int(math.ceil(x1 - x0)), int(math.ceil(y1 - y0))
    ys, xs = np.mgrid[0:h, 0:w]
    u, v = _axis_coordinates(pts, xs.ravel() + x0 + 0.5, ys.ravel() + y0 + 0.5)

    iscn = np.clip((u + radius) / (arc + 2 * radius), 0.0, 1.0) * ch.length
    wf = np.interp(iscn, grid, widths)
    texture = _smooth_noise(rng, (h, w), rng.uniform(0.8, 1.4)).ravel()
    along = np.maximum(np.maximum(-u, u - arc), 0.0) ** 2  # past the telomere: round caps
    r_local = radius * wf * (1 + 0.07 * texture)
    c_local = offset * wf * np.interp(iscn, grid, spread)
    if splay:
        arm = max(ch.centromere, ch.length - ch.centromere)
        c_local = c_local + splay * radius * ((iscn - ch.centromere) / arm) ** 2
    body = np.zeros_like(u)
    for side in (-1.0, 1.0):
        r = np.sqrt(along + (v - side * c_local) ** 2) / r_local
        body += np.sqrt(np.clip(1.0 - r * r, 0.0, 1.0))
    body = np.minimum(body, 1.0) ** 0.6
    density = body * (im.base + (1.0 - im.base) * np.interp(iscn, grid, profile))
    density *= 1.0 + im.texture * texture
    return ChromosomeDensity(density.reshape(h, w), body.reshape(h, w), (float(x0), float(y0)))


def render_chromosome(
    label: str,
    rng: np.random.Generator,
    *,
    style: str = "G",
    resolution: int = 400,
    condensation: float = 1.0,
    imaging: Imaging | None = None,
    upright: bool = False,
) -> np.ndarray:
    """One chromosome crop (2-D uint8) with a background margin, drawn from the ideogram.

    Length = ISCN length x PX_PER_ISCN x condensation (x a few % between homologues). Two sister chromatids
    (rounded capsules, so telomeres are round) that close in at the acen bands (the primary constriction),
    thin stalks and satellites on acrocentrics, a smoothly bent axis at a random angle (near vertical, pter
    up, with ``upright``), band blur by band level, chromatin texture and ragged outline, then optical blur,
    camera noise and gamma from ``imaging`` (drawn from ``rng`` when None). G: dark bands on a light
    background; Q: bright bands on a dark one.
    """
    check_style(style)
    im = imaging if imaging is not None else draw_imaging(rng, style)
    drawn = chromosome_density(label, rng, style=style, resolution=resolution, condensation=condensation,
                               imaging=im, upright=upright)
    return _expose(drawn.density, im, style, rng)


def _cell_conditions(rng: np.random.Generator) -> tuple[int, float]:
    resolution = int(rng.choice(RESOLUTIONS, p=[0.6, 0.3, 0.1]))
    lo, hi = CONDENSATION_RANGE[resolution]
    return resolution, float(rng.uniform(lo, hi))


def render_cell(karyotype: str, rng: np.random.Generator, *, style: str = "G", upright: bool = False
                ) -> tuple[list[str], list[np.ndarray], dict[str, float | int]]:
    """All chromosomes of one cell, in shuffled order: (labels, crops, conditions)."""
    labels = karyotype_labels(karyotype)
    resolution, condensation = _cell_conditions(rng)
    imaging = draw_imaging(rng, style)
    order = rng.permutation(len(labels))
    labels = [labels[i] for i in order]
    crops = [render_chromosome(lab, rng, style=style, resolution=resolution, condensation=condensation,
                               imaging=imaging, upright=upright) for lab in labels]
    return labels, crops, {"resolution": resolution, "condensation": round(condensation, 4)}

