"""Synthetic G-/Q-banded chromosomes, cells and cases rendered from the real human ideogram.

Why: labs cannot share patient karyotypes, yet tests, demos and a first model need realistic data with
known truth. Every chromosome is drawn from the GRCh38 cytoband tables vendored in
``chromobatch/data/cytoband`` (NCBI via eweitz/ideogram, CC0): its length follows the ISCN length, its
centromere sits at the ``acen`` bands and its band pattern follows ``gieStain``. Cases are written in the
formats ingest reads (PNG cell folders or flat DICOM) with ``labels.csv`` and ``truth.json``.

All randomness comes from one integer seed: the same seed (and case id) gives the same bytes.
"""

from __future__ import annotations

import csv
import datetime as _dt
import functools
import hashlib
import io
import json
import logging
import math
import re
import shutil
import zlib
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage

from chromobatch import CLASSES, normalise_label
from chromobatch.errors import ConfigError, InputError, InvalidCaseId
from chromobatch.intake.imaging import encode_png

log = logging.getLogger(__name__)

DATA_DIR = Path(__file__).resolve().parents[1] / "data" / "cytoband"
RESOLUTIONS: tuple[int, ...] = (400, 550, 850)
STYLES: tuple[str, ...] = ("G", "Q")
FORMATS: tuple[str, ...] = ("png", "dicom")
ACROCENTRIC = frozenset({"13", "14", "15", "21", "22"})

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
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
_CASE_ID = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]*")


@dataclass(frozen=True)
class Band:
    """One cytoband of the ideogram; start/stop are ISCN length units from pter."""

    name: str
    stain: str
    start: float
    stop: float

    @property
    def arm(self) -> str:
        return self.name[:1]


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


# ---------------------------------------------------------------------------------------------- ideogram
@functools.cache
def _ideogram(resolution: int) -> dict[str, tuple[Band, ...]]:
    if resolution not in RESOLUTIONS:
        raise ConfigError(f"band resolution must be one of {RESOLUTIONS}, got {resolution!r}")
    path = DATA_DIR / f"ncbi_GRCh38_{resolution}band_cytoband.tsv"
    bands: dict[str, list[Band]] = {c: [] for c in CLASSES}
    with path.open(newline="") as fh:
        for row in csv.reader(fh, delimiter="\t"):
            if not row or row[0].startswith("#"):
                continue
            label = normalise_label(row[0])
            bands[label].append(Band(row[3], row[4], float(row[5]), float(row[6])))
    for label, items in bands.items():
        if not items or not any(b.stain == "acen" for b in items):
            raise ConfigError(f"cytoband table {path.name} lacks chromosome {label} or its centromere")
        items.sort(key=lambda b: b.start)
    return {label: tuple(items) for label, items in bands.items()}


def load_ideogram(resolution: int = 400) -> dict[str, list[Band]]:
    """The GRCh38 ideogram at 400, 550 or 850 bands: class name -> bands from pter to qter (cached)."""
    return {label: list(bands) for label, bands in _ideogram(resolution).items()}


def iscn_length(label: str, resolution: int = 400) -> float:
    """Total ISCN length of a chromosome (the same at every band level)."""
    return _ideogram(resolution)[_label(label)][-1].stop


@dataclass(frozen=True)
class _Chrom:
    label: str
    length: float
    starts: np.ndarray
    stains: tuple[str, ...]
    names: tuple[str, ...]
    centromere: float  # p/q boundary
    acen_half: float  # half the extent of the acen bands


@functools.cache
def _chrom(label: str, resolution: int) -> _Chrom:
    bands = _ideogram(resolution)[label]
    acen = [b for b in bands if b.stain == "acen"]
    p_acen = [b for b in acen if b.arm == "p"]
    centromere = p_acen[-1].stop if p_acen else acen[0].start
    return _Chrom(label, bands[-1].stop, np.array([b.start for b in bands]), tuple(b.stain for b in bands),
                  tuple(b.name for b in bands), centromere, (acen[-1].stop - acen[0].start) / 2)


def _label(label: str | int) -> str:
    try:
        return normalise_label(label)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def _check_style(style: str) -> str:
    if style not in STYLES:
        raise ConfigError(f"style must be G (dark bands on light) or Q (bright on dark), got {style!r}")
    return style


# ---------------------------------------------------------------------------------------------- rendering
def draw_imaging(rng: np.random.Generator, style: str = "G") -> Imaging:
    """Random acquisition settings for one cell in the given style."""
    _check_style(style)
    if style == "G":
        background = min(255.0, rng.uniform(230, 290))
        return Imaging("G", background, background - rng.uniform(10, 60), rng.uniform(0.3, 0.52),
                       rng.uniform(0.6, 1.0), rng.uniform(1.0, 4.5), rng.uniform(0.85, 1.2),
                       rng.uniform(0.12, 0.25), rng.uniform(0.92, 1.1), bool(rng.random() < 0.6))
    background = rng.uniform(0, 10)
    return Imaging("Q", background, rng.uniform(140, 215) - background, rng.uniform(0.55, 0.72),
                   rng.uniform(1.0, 1.6), rng.uniform(1.0, 4.0), rng.uniform(0.9, 1.2),
                   rng.uniform(0.05, 0.12), rng.uniform(0.7, 0.88), bool(rng.random() < 0.5))


def _band_stain(ch: _Chrom, style: str, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
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


def _centreline(length: float, rng: np.random.Generator, upright: bool, t_cen: float) -> np.ndarray:
    """Points of a smoothly bent axis of the given arc length, (n+1, 2) as (x, y) with y down."""
    n = int(np.clip(math.ceil(length / 7.0), 2, 16))
    t = (np.arange(n) + 0.5) / n
    a1 = rng.normal(0.0, 1.3 if rng.random() < 0.15 else 0.4)
    a2 = rng.normal(0.0, 0.35)
    kink = rng.normal(0.0, 0.5) if rng.random() < 0.3 else 0.0
    bend = a1 * (t - 0.5) + a2 * (4 * (t - 0.5) ** 2 - 1 / 3) + kink / (1 + np.exp(-(t - t_cen) / 0.04))
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
    label = _label(label)
    _check_style(style)
    if not (0.2 <= condensation <= 4.0):
        raise ConfigError(f"condensation must be within 0.2..4, got {condensation!r}")
    ch = _chrom(label, resolution)
    im = imaging if imaging is not None else draw_imaging(rng, style)
    if im.style != style:
        raise ConfigError(f"imaging settings are for style {im.style}, not {style}")

    cond = condensation * rng.uniform(0.95, 1.05)
    px_per_iscn = PX_PER_ISCN * cond
    half_width = rng.uniform(7.0, 8.5) * im.width * cond**-0.25
    radius = half_width * rng.uniform(0.52, 0.58)  # of one chromatid
    offset = radius * rng.uniform(0.62, 0.85)  # of each chromatid from the axis: sets the groove depth
    total_px = ch.length * px_per_iscn
    arc = max(total_px - 2 * radius, 1.0)

    # Band pattern and width along the axis, sampled ~4x per pixel and smoothed (band level; ~1 px).
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

    pts = _centreline(arc, rng, upright, ch.centromere / ch.length)
    margin = half_width + 3 * im.blur + int(rng.integers(3, 9))
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
    body = np.zeros_like(u)
    for side in (-1.0, 1.0):
        r = np.sqrt(along + (v - side * c_local) ** 2) / r_local
        body += np.sqrt(np.clip(1.0 - r * r, 0.0, 1.0))
    body = np.minimum(body, 1.0) ** 0.6
    density = body * (im.base + (1.0 - im.base) * np.interp(iscn, grid, profile))
    density *= 1.0 + im.texture * texture
    density = density.reshape(h, w)

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


# ---------------------------------------------------------------------------------------------- karyotypes
def _karyotype(extra: tuple[str, ...], sex: str) -> list[str]:
    autosomes = [str(i) for i in range(1, 23)]
    labels = [a for a in autosomes for _ in range(2)] + list(extra) + list(sex)
    return sorted(labels, key=lambda c: (CLASSES.index(c)))


#: Karyotype name (ISCN) -> labels of one cell, sorted by class.
KARYOTYPES: dict[str, list[str]] = {
    "46,XX": _karyotype((), "XX"),
    "46,XY": _karyotype((), "XY"),
    "47,XX,+13": _karyotype(("13",), "XX"),
    "47,XY,+13": _karyotype(("13",), "XY"),
    "47,XX,+18": _karyotype(("18",), "XX"),
    "47,XY,+18": _karyotype(("18",), "XY"),
    "47,XX,+21": _karyotype(("21",), "XX"),
    "47,XY,+21": _karyotype(("21",), "XY"),
    "45,X": _karyotype((), "X"),
    "47,XXX": _karyotype((), "XXX"),
    "47,XXY": _karyotype((), "XXY"),
    "47,XYY": _karyotype((), "XYY"),
}
NORMAL_KARYOTYPES: tuple[str, ...] = ("46,XX", "46,XY")
ABNORMAL_KARYOTYPES: tuple[str, ...] = tuple(k for k in KARYOTYPES if k not in NORMAL_KARYOTYPES)


def karyotype_labels(name: str) -> list[str]:
    """Labels of one cell with this karyotype (a fresh list, sorted by class)."""
    if name not in KARYOTYPES:
        raise ConfigError(f"unknown karyotype {name!r}; known: {', '.join(KARYOTYPES)}")
    return list(KARYOTYPES[name])


def normal_partner(name: str) -> str:
    """The normal cell line that usually accompanies an abnormal one in a mosaic (same sex)."""
    return "46,XY" if "Y" in name.split(",")[1] else "46,XX"


def case_karyotype(cell_karyotypes: list[str]) -> str:
    """Case-level ISCN: the karyotype, or for mosaics ``mos 47,XXY[2]/46,XY[1]`` (normal line last)."""
    counts = Counter(cell_karyotypes)
    if len(counts) == 1:
        return cell_karyotypes[0]
    order = sorted(counts, key=lambda k: (k in NORMAL_KARYOTYPES, -counts[k], cell_karyotypes.index(k)))
    return "mos " + "/".join(f"{k}[{counts[k]}]" for k in order)


def patient_sex(cell_karyotypes: list[str]) -> str:
    """DICOM PatientSex: M when any cell line has a Y."""
    return "M" if any("Y" in k.split(",")[1] for k in cell_karyotypes) else "F"


# ---------------------------------------------------------------------------------------------- cases
def _rng(*keys: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(k) for k in keys]))


def _case_key(case_id: str) -> int:
    return zlib.crc32(case_id.encode())


def _check_common(cells: int, seed: int, style: str) -> None:
    _check_style(style)
    if not isinstance(cells, int) or cells < 1:
        raise ConfigError(f"cells must be a positive integer, got {cells!r}")
    if not isinstance(seed, int) or seed < 0:
        raise ConfigError(f"seed must be a non-negative integer, got {seed!r}")


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


def _new_folder(final: Path) -> Path:
    """A hidden temporary sibling, renamed to ``final`` when complete (watchers never see half a case)."""
    if final.exists() and (not final.is_dir() or any(final.iterdir())):
        raise InputError(f"{final} already exists and is not empty; synthetic cases are never overwritten",
                         hint="Write to an empty output folder or remove the old case first.")
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.partial"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    return tmp


def _finish_folder(tmp: Path, final: Path) -> None:
    if final.exists():
        final.rmdir()  # empty, checked in _new_folder
    tmp.rename(final)


def _dicom_bytes(pixels: np.ndarray, tags: dict[str, object], monochrome1: bool) -> bytes:
    import pydicom
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SECONDARY_CAPTURE
    meta.MediaStorageSOPInstanceUID = tags["SOPInstanceUID"]
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset("synthetic.dcm", {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = SECONDARY_CAPTURE
    for key, value in tags.items():
        setattr(ds, key, value)
    ds.Modality = "OT"
    ds.ConversionType = "SYN"
    ds.Manufacturer = "chromobatch synth"
    ds.ImageComments = "Synthetic image of a fictitious patient (chromobatch.synth)"
    ds.PatientBirthDate = ""
    ds.ReferringPhysicianName = ""
    ds.PatientOrientation = ""
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME1" if monochrome1 else "MONOCHROME2"
    ds.Rows, ds.Columns = int(pixels.shape[0]), int(pixels.shape[1])
    ds.BitsAllocated = 8
    ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    stored = (255 - pixels) if monochrome1 else pixels
    data = np.ascontiguousarray(stored, dtype=np.uint8).tobytes()
    ds.add_new(0x7FE00010, "OB", data + (b"\0" if len(data) % 2 else b""))  # PixelData
    buf = io.BytesIO()
    if int(pydicom.__version__.split(".")[0]) >= 3:
        ds.save_as(buf, enforce_file_format=True)
    else:  # pragma: no cover - pydicom 2.x
        ds.is_little_endian, ds.is_implicit_VR = True, False
        ds.save_as(buf, write_like_original=False)
    return buf.getvalue()


def _uid(*parts: object) -> str:
    """A UUID-derived UID (2.25.<128-bit int>, ISO/IEC 9834-8) hashed from the parts: same seed, same UID.

    (pydicom's generate_uid ignores entropy_srcs when prefix is None, so it cannot be used for this.)
    """
    digest = hashlib.sha256("/".join(["chromobatch.synth", *map(str, parts)]).encode()).digest()
    return f"2.25.{int.from_bytes(digest[:16], 'big')}"


def generate_case(
    out_dir: Path,
    case_id: str,
    *,
    cells: int,
    fmt: str,
    karyotype: str | list[str],
    seed: int,
    style: str = "G",
    monochrome1: float | None = None,
) -> Path:
    """Write one synthetic case folder ``out_dir/case_id`` and return it.

    ``karyotype`` is one name for all cells, or a list with one name per cell (a mosaic). PNG: ``cellNN/cNN.png``
    in shuffled order; DICOM: flat ``iNNNN.dcm``, one series per cell. ``monochrome1`` is the fraction of
    DICOM instances stored inverted (MONOCHROME1); None draws it per case (mostly 0, sometimes all or half).
    Same seed and case id -> same bytes.
    """
    _check_common(cells, seed, style)
    if fmt not in FORMATS:
        raise ConfigError(f"format must be png or dicom, got {fmt!r}")
    if not _CASE_ID.fullmatch(case_id):
        raise InvalidCaseId(f"invalid case id {case_id!r}: letters, digits, '-', '_' and '.' only")
    kts = [karyotype] * cells if isinstance(karyotype, str) else list(karyotype)
    if len(kts) != cells:
        raise ConfigError(f"a mosaic needs one karyotype per cell: got {len(kts)} for {cells} cells")
    for k in kts:
        karyotype_labels(k)
    if monochrome1 is not None and not 0.0 <= monochrome1 <= 1.0:
        raise ConfigError(f"monochrome1 must be a fraction 0..1, got {monochrome1!r}")

    key = _case_key(case_id)
    case_rng = _rng(seed, key, 0)
    if monochrome1 is None:
        monochrome1 = float(case_rng.choice([0.0, 1.0, 0.5], p=[0.7, 0.2, 0.1]))
    final = Path(out_dir) / case_id
    tmp = _new_folder(final)
    try:
        rows, cell_truth = _write_cells(tmp, case_id, kts, fmt, seed, key, style, monochrome1, case_rng)
        with (tmp / "labels.csv").open("w", newline="") as fh:
            writer = csv.writer(fh, lineterminator="\n")
            writer.writerow(["file", "label"])
            writer.writerows(sorted(rows))
        truth = {"case_id": case_id, "format": fmt, "style": style, "seed": seed,
                 "karyotype": case_karyotype(kts), "sex": patient_sex(kts), "cells": cell_truth}
        (tmp / "truth.json").write_text(json.dumps(truth, indent=2) + "\n")
        _finish_folder(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.debug("synthetic case %s: %s, %d cells, %s", case_id, truth["karyotype"], cells, fmt)
    return final


def _write_cells(tmp: Path, case_id: str, kts: list[str], fmt: str, seed: int, key: int, style: str,
                 monochrome1: float, case_rng: np.random.Generator) -> tuple[list[list[str]], list[dict]]:
    rows: list[list[str]] = []
    cell_truth: list[dict] = []
    study = {}
    if fmt == "dicom":
        date = _dt.date(2021, 1, 1) + _dt.timedelta(days=int(case_rng.integers(0, 1500)))
        study = {
            "PatientID": f"SYNTH-{case_id}"[:64],
            "PatientName": f"SYNTH^{case_id}"[:64],
            "PatientSex": patient_sex(kts),
            "AccessionNumber": f"SYN{zlib.crc32(f'{seed}/{case_id}'.encode()) % 10**9:09d}",
            "StudyDate": date.strftime("%Y%m%d"),
            "StudyTime": f"{int(case_rng.integers(8, 18)):02d}{int(case_rng.integers(0, 60)):02d}00",
            "StudyID": f"{int(case_rng.integers(1, 10**6))}",
            "StudyInstanceUID": _uid(seed, case_id, "study"),
            "StudyDescription": "Synthetic karyotype",
        }
    instance = 0
    for ci, kt in enumerate(kts, start=1):
        labels, crops, cond = render_cell(kt, _rng(seed, key, ci), style=style)
        if fmt == "png":
            cell = f"cell{ci:02d}"
            (tmp / cell).mkdir()
            for j, (lab, crop) in enumerate(zip(labels, crops, strict=True), start=1):
                name = f"{cell}/c{j:02d}.png"
                (tmp / name).write_bytes(encode_png(crop))
                rows.append([name, lab])
        else:
            cell = _uid(seed, case_id, "series", ci)
            inverted = case_rng.random(len(crops)) < monochrome1
            for j, (lab, crop) in enumerate(zip(labels, crops, strict=True), start=1):
                instance += 1
                name = f"i{instance:04d}.dcm"
                tags = dict(study, SeriesInstanceUID=cell, SeriesNumber=ci, InstanceNumber=j,
                            SeriesDescription=f"Synthetic metaphase {ci}",
                            SOPInstanceUID=_uid(seed, case_id, "sop", ci, j),
                            ContentDate=study["StudyDate"], SeriesDate=study["StudyDate"])
                (tmp / name).write_bytes(_dicom_bytes(crop, tags, bool(inverted[j - 1])))
                rows.append([name, lab])
        cell_truth.append({"cell": cell, "karyotype": kt, "count": len(labels), **cond})
    return rows, cell_truth


def _case_plan(rng: np.random.Generator, cases: int, cells: int, abnormal_rate: float) -> list[list[str]]:
    n_abnormal = int(round(abnormal_rate * cases))
    abnormal = set(rng.permutation(cases)[:n_abnormal].tolist())
    plan = []
    for i in range(cases):
        if i not in abnormal:
            plan.append([str(rng.choice(NORMAL_KARYOTYPES))] * cells)
            continue
        kt = str(rng.choice(ABNORMAL_KARYOTYPES))
        if cells >= 2 and rng.random() < 0.25:  # mosaic: abnormal line plus its normal partner
            n_abn = int(rng.integers(1, cells))
            kts = [kt] * n_abn + [normal_partner(kt)] * (cells - n_abn)
            plan.append([kts[j] for j in rng.permutation(cells)])
        else:
            plan.append([kt] * cells)
    return plan


def generate_cases(
    out_dir: Path,
    *,
    cases: int,
    cells: int,
    fmt: str = "png",
    abnormal_rate: float = 0.3,
    seed: int = 0,
    style: str = "G",
) -> list[Path]:
    """Write ``cases`` case folders SYN0001... of ``cells`` cells; round(abnormal_rate*cases) are abnormal
    (trisomies, sex-chromosome aneuploidies, a quarter of them mosaics). Returns the case folders."""
    _check_common(cells, seed, style)
    if not isinstance(cases, int) or cases < 1:
        raise ConfigError(f"cases must be a positive integer, got {cases!r}")
    if not 0.0 <= abnormal_rate <= 1.0:
        raise ConfigError(f"abnormal rate must be within 0..1, got {abnormal_rate!r}")
    if fmt not in FORMATS:
        raise ConfigError(f"format must be png or dicom, got {fmt!r}")
    plan = _case_plan(_rng(seed, 0xCA5E5), cases, cells, abnormal_rate)
    paths = []
    for i, kts in enumerate(plan, start=1):
        paths.append(generate_case(Path(out_dir), f"SYN{i:04d}", cells=cells, fmt=fmt, karyotype=kts,
                                   seed=seed, style=style))
    log.info("wrote %d synthetic %s-band cases (%s) to %s", cases, style, fmt, out_dir)
    return paths


def generate_dataset(
    out_dir: Path,
    *,
    cells: int,
    seed: int = 0,
    style: str = "G",
    val_fraction: float = 0.15,
    test_fraction: float = 0.15,
    upright: bool = False,
) -> Path:
    """Write a training set of normal cells (46,XX / 46,XY) as PNG crops and return its ``manifest.csv``.

    Columns path,label,patient,cell,split like the real data's manifest; one synthetic patient per cell,
    split by patient. ``upright`` draws chromosomes near vertical, pter up, as in crops cut from a karyogram.
    """
    _check_common(cells, seed, style)
    for name, frac in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not 0.0 <= frac < 1.0:
            raise ConfigError(f"{name} must be within 0..1, got {frac!r}")
    n_test = int(round(test_fraction * cells))
    n_val = int(round(val_fraction * cells))
    if cells - n_test - n_val < 1:
        raise ConfigError(f"{cells} cells leave nothing to train on with these val/test fractions")
    out_dir = Path(out_dir)
    manifest = out_dir / "manifest.csv"
    if manifest.exists() or (out_dir / "images").exists():
        raise InputError(f"{out_dir} already holds a dataset; synthetic data is never overwritten",
                         hint="Write to an empty output folder.")
    rng = _rng(seed, 0xDA7A)
    order = rng.permutation(cells)
    split = ["train"] * cells
    for rank, idx in enumerate(order):
        if rank < n_test:
            split[idx] = "test"
        elif rank < n_test + n_val:
            split[idx] = "val"
    rows = []
    for ci in range(cells):
        patient = f"SYNP{ci + 1:05d}"
        cell = f"{patient}.1"
        kt = str(rng.choice(NORMAL_KARYOTYPES))
        labels, crops, _ = render_cell(kt, _rng(seed, 0xDA7A, ci + 1), style=style, upright=upright)
        folder = out_dir / "images" / patient / cell
        folder.mkdir(parents=True)
        for j, (lab, crop) in enumerate(zip(labels, crops, strict=True), start=1):
            rel = f"images/{patient}/{cell}/c{j:02d}.png"
            (out_dir / rel).write_bytes(encode_png(crop))
            rows.append([rel, lab, patient, cell, split[ci]])
    with manifest.open("w", newline="") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(["path", "label", "patient", "cell", "split"])
        writer.writerows(rows)
    log.info("wrote synthetic %s-band dataset: %d cells, %d crops -> %s", style, cells, len(rows), manifest)
    return manifest


# ---------------------------------------------------------------------------------------------- montage
def write_montage(path: Path, *, style: str = "G", seed: int = 0, per_class: int = 3) -> Path:
    """A labelled PNG of all 24 classes at one pixel scale, so realism can be judged by eye (docs/).

    Each panel holds ``per_class`` copies: all but the last upright (karyogram-like), the last free.
    """
    from matplotlib.figure import Figure  # no pyplot: leaves the caller's backend alone

    _check_style(style)
    rng = _rng(seed, 0x3047)
    imaging = Imaging(**{**asdict(draw_imaging(rng, style)), "clean_background": True})
    panels: dict[str, np.ndarray] = {}
    for label in CLASSES:
        crops = [render_chromosome(label, rng, style=style, condensation=1.0 + 0.1 * (k % 2), imaging=imaging,
                                   upright=k < max(per_class - 1, 1)) for k in range(per_class)]
        height = max(c.shape[0] for c in crops)
        bg = int(np.median(np.concatenate([c[0] for c in crops])))
        padded = [np.pad(c, ((0, height - c.shape[0]), (0, 0)), constant_values=bg) for c in crops]
        panels[label] = np.concatenate(padded, axis=1)
    ph = max(p.shape[0] for p in panels.values())
    pw = max(p.shape[1] for p in panels.values())
    zoom = 2.0  # screen pixels per image pixel
    face = (imaging.background / 255.0,) * 3  # panels blend into the figure
    ink = "black" if style == "G" else "white"
    fig = Figure(figsize=(6 * pw * zoom / 100, 4 * (ph * zoom + 30) / 100 + 0.3), dpi=100, facecolor=face)
    axes = fig.subplots(4, 6)
    for ax, label in zip(axes.ravel(), CLASSES, strict=True):  # rows 1-6, 7-12, 13-18, 19-22 X Y
        img = panels[label]
        ax.set_axis_off()
        ax.imshow(img, cmap="gray", vmin=0, vmax=255, interpolation="nearest",
                  extent=(0, img.shape[1], img.shape[0], 0))
        ax.set_xlim(0, pw)
        ax.set_ylim(ph, 0)
        ax.set_title(label, color=ink, fontsize=11)
    fig.suptitle(f"chromobatch synth, {style}-band style (seed {seed}; same pixel scale in every panel)",
                 color=ink, fontsize=10)
    fig.tight_layout(pad=0.4, h_pad=0.2, w_pad=0.2, rect=(0, 0, 1, 0.97))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, facecolor=face, metadata={"Software": None})
    return path
