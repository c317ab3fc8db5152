"""Is an image one chromosome, or a whole metaphase? And is a "metaphase" really one?

Why here, before any model: a scanner delivers whole metaphases, a karyotyping system delivers crops, and
a folder of the wrong kind must never become a nonsense karyotype (ten metaphases read as "10
chromosomes in 1 cell"). The checks are classical image statistics on the normalised image (dark on light),
cheap enough to run on every file: the objects darker than the background, their sizes, shapes and
orientations.

- `classify_image`: "metaphase" when the image holds many separate objects or is far larger than any
  chromosome crop (g612 crops are at most 163 px, bioimlab crops 200 px); else "crop".
- `check_metaphase`: raises ImageRejected with a reason a lab can act on for an image that is not a
  metaphase: a blank field, a photo or document without a uniform background, an interphase nucleus alone,
  a karyogram sheet (chromosomes already upright in rows).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from chromobatch.intake.imaging import ImageRejected

#: A crop is never larger than this on its long side; a larger image is a metaphase candidate.
CROP_MAX_SIDE = 400
#: No metaphase fits in an image this small: it is a crop, however many pieces its bands fall into.
METAPHASE_MIN_SIDE = 256
#: This many separate objects make an image of any size a metaphase candidate.
MIN_OBJECTS = 6
#: Objects smaller than this (pixels) are specks, not chromosomes.
MIN_AREA = 12
#: A chromosome covers at least this many pixels at a microscope's native scale (the smallest, 21, 22 and Y
#: in bioimlab-metaphase, cover about 100); smaller objects are debris.
MIN_CHROMOSOME_AREA = 60
#: A round filled object this large is an interphase nucleus, not a chromosome (the largest chromosome of
#: bioimlab-metaphase covers about 1,500 pixels).
NUCLEUS_MIN_AREA = 2000
#: Fewer chromosome-like objects than this is not a metaphase that can be counted or analysed.
MIN_CHROMOSOMES = 5
#: In a metaphase chromosomes lie at any angle (about 1 in 8 within 12 degrees of vertical; at most 0.40 in
#: the 163 real bioimlab-metaphase frames); on a karyogram sheet they stand upright in rows.
UPRIGHT_SHARE = 0.55
INPUT_KINDS = ("auto", "crops", "metaphase")


@dataclass(frozen=True)
class Blob:
    area: int
    #: Long over short axis of the object's second moments (1 = round).
    elongation: float
    #: Angle of the long axis from the vertical, degrees, 0..90.
    tilt: float
    #: Area over the area of its moments' ellipse: about 1 for a filled ellipse or rod, less for a ring.
    fill: float
    width: int
    height: int


@dataclass(frozen=True)
class ImageStats:
    background: float
    noise: float
    #: Share of pixels within the background's noise band.
    background_share: float
    blobs: tuple[Blob, ...]

    @property
    def nuclei(self) -> list[Blob]:
        return [b for b in self.blobs if _nucleus_like(b)]

    @property
    def chromosome_like(self) -> list[Blob]:
        """Objects a chromosome could be: not a nucleus, not a speck of debris (small and round)."""
        return [b for b in self.blobs if not _nucleus_like(b) and not _speck(b)]


def _nucleus_like(b: Blob) -> bool:
    """Round, filled and far bigger than any chromosome at a microscope's scale (a chromosome is a rod; a
    cluster of chromosomes is not filled)."""
    return b.elongation < 1.6 and b.fill > 0.8 and b.area >= NUCLEUS_MIN_AREA


def _speck(b: Blob) -> bool:
    return b.area < MIN_CHROMOSOME_AREA or (b.elongation < 1.3 and b.fill > 0.9 and b.area < 300)


def _ruled_line(b: Blob) -> bool:
    """A thin horizontal line, as under each pair of a printed karyogram."""
    return b.tilt >= 80.0 and b.elongation >= 6.0 and b.height <= 6 and b.width >= 25


def upright_share(stats: ImageStats) -> float:
    rest = [b for b in stats.chromosome_like if not _ruled_line(b)]
    return sum(1 for b in rest if b.tilt <= 12.0 and b.elongation >= 1.2) / max(1, len(rest))


def image_stats(dark_on_light: np.ndarray) -> ImageStats:
    from scipy import ndimage

    arr = dark_on_light.astype(np.float32)
    bg = float(np.median(arr))
    noise = float(1.4826 * np.median(np.abs(arr - bg)))
    smooth = ndimage.uniform_filter(arr, size=3, mode="nearest")
    threshold = bg - max(12.0, 4.0 * noise)
    mask = smooth < threshold
    labels, n = ndimage.label(mask)
    blobs: list[Blob] = []
    if n:
        for sl, idx in zip(ndimage.find_objects(labels), range(1, n + 1), strict=True):
            if sl is None:
                continue
            sub = labels[sl] == idx
            area = int(sub.sum())
            if area < MIN_AREA:
                continue
            ys, xs = np.nonzero(sub)
            dy, dx = ys - ys.mean(), xs - xs.mean()
            cov = np.array([[np.mean(dx * dx), np.mean(dx * dy)], [np.mean(dx * dy), np.mean(dy * dy)]])
            evals, evecs = np.linalg.eigh(cov)
            lo, hi = max(float(evals[0]), 1e-6), max(float(evals[1]), 1e-6)
            vx, vy = evecs[:, 1]
            tilt = abs(math.degrees(math.atan2(abs(vx), abs(vy))))
            ellipse = math.pi * 4.0 * math.sqrt(lo * hi)
            blobs.append(Blob(area=area, elongation=math.sqrt(hi / lo), tilt=tilt,
                              fill=min(1.0, area / max(ellipse, 1.0)), width=sl[1].stop - sl[1].start,
                              height=sl[0].stop - sl[0].start))
    band = max(6.0, 3.0 * noise)
    share = float(np.mean(np.abs(arr - bg) <= band))
    return ImageStats(background=bg, noise=noise, background_share=share, blobs=tuple(blobs))


def classify_image(dark_on_light: np.ndarray, stats: ImageStats | None = None) -> str:
    """'metaphase' or 'crop', for input = auto."""
    h, w = dark_on_light.shape
    if max(h, w) > CROP_MAX_SIDE:
        return "metaphase"
    if max(h, w) < METAPHASE_MIN_SIDE:
        return "crop"
    stats = stats or image_stats(dark_on_light)
    return "metaphase" if len(stats.blobs) >= MIN_OBJECTS else "crop"


def check_metaphase(dark_on_light: np.ndarray, stats: ImageStats | None = None) -> ImageStats:
    """The image's statistics when it can be a metaphase; else ImageRejected with the reason."""
    stats = stats or image_stats(dark_on_light)
    if not stats.blobs:
        raise ImageRejected("not a metaphase: blank field (no object darker or brighter than the background)")
    if stats.background_share < 0.35:
        raise ImageRejected(f"not a metaphase: no uniform background ({stats.background_share:.0%} of the image "
                            "is background; a photo or a scanned document?)")
    chromosomes = stats.chromosome_like
    nuclei = stats.nuclei
    if len(chromosomes) < MIN_CHROMOSOMES:
        if nuclei:
            raise ImageRejected(f"not a metaphase: no chromosomes found, only {len(nuclei)} round object(s) the "
                                f"size of an interphase nucleus (and {len(chromosomes)} small object(s))")
        raise ImageRejected(f"not a metaphase: blank field or a frame off the spread ({len(chromosomes)} "
                            f"object(s) that could be a chromosome, at least {MIN_CHROMOSOMES} expected)")
    lines = [b for b in chromosomes if _ruled_line(b)]
    rest = [b for b in chromosomes if not _ruled_line(b)]
    upright = [b for b in rest if b.tilt <= 12.0 and b.elongation >= 1.2]
    if len(rest) >= 8 and (len(upright) >= UPRIGHT_SHARE * len(rest) or len(lines) >= 3):
        raise ImageRejected(f"not a metaphase: looks like a karyogram sheet ({len(upright)} of {len(chromosomes)} "
                            f"objects upright in rows, {len(lines)} ruled lines); deliver the metaphase image or "
                            "the chromosome crops")
    return stats
