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
    def chromosome_like(self) -> list[Blob]:
        """Objects a chromosome could be: not specks, not round blobs far larger than the typical object."""
        sizes = [b.area for b in self.blobs]
        if not sizes:
            return []
        typical = float(np.median(sizes))
        return [b for b in self.blobs if not _nucleus_like(b, typical)]


def _nucleus_like(b: Blob, typical_area: float) -> bool:
    """Round and big: an interphase nucleus (a chromosome is a rod; a cluster of chromosomes is not round)."""
    return b.elongation < 1.5 and b.area >= max(400.0, 4.0 * typical_area) and b.fill > 0.75


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
    nuclei = len(stats.blobs) - len(chromosomes)
    big = [b for b in chromosomes if b.area >= 30]
    if len(big) < 2:
        what = f"only {nuclei} round object(s) the size of an interphase nucleus" if nuclei else \
            "only specks"
        raise ImageRejected(f"not a metaphase: no chromosomes found ({what})")
    rods = [b for b in big if b.elongation >= 2.0]
    upright = [b for b in rods if b.tilt <= 12.0]
    lines = [b for b in stats.blobs if b.elongation >= 12.0 and b.tilt >= 80.0 and b.width >= 40]
    if len(rods) >= 10 and (len(upright) >= 0.75 * len(rods) or len(lines) >= 3):
        raise ImageRejected(f"not a metaphase: looks like a karyogram sheet ({len(upright)} of {len(rods)} "
                            f"chromosomes upright in rows, {len(lines)} ruled lines); deliver the metaphase "
                            "image or the chromosome crops")
    return stats
