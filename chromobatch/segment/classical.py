"""The classical baseline (scikit-image): threshold, connected components, specks and nuclei left out,
touching chromosomes split by a distance-transform watershed, the rest kept whole and flagged.

Why it exists: it needs no training and no model file, so it is the yardstick the learned segmenter is
measured against (docs/results.md) and a fallback a lab can run anywhere.

Steps, on a normalised image (dark chromosomes on light):
1. light smoothing, then Otsu's threshold (with a local threshold for uneven illumination when asked);
2. connected components; specks under `min_area` px are debris;
3. nuclei: components far wider than a chromosome (minor axis > `nucleus_width` x the chromosome width),
   compact (solidity > `nucleus_solidity`) and large are left out: an interphase nucleus is a big round
   blob, a chromosome is a thin rod;
4. components larger than `split_factor` x the median chromosome are split by a watershed on the distance
   transform, seeded by their thick parts (distance >= f x half the chromosome width, f from
   `core_fractions` in turn: a low f first, so that a centromere does not cut a chromosome, higher ones
   for contacts that are broad); the first split whose pieces are all plausible chromosomes
   (>= `min_piece` x the median) is kept, otherwise the component stays whole;
5. whatever is still over `cluster_factor` x the median is flagged "cluster, about N chromosomes".
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from chromobatch.segment.base import Instance
from chromobatch.segment.objects import CLUSTER_FACTOR, flag_clusters, is_nucleus, stroke_width


@dataclass
class ClassicalParams:
    smooth_sigma: float = 1.0
    local_block: int = 0  # > 0: a local (block) threshold of that size combined with Otsu's
    min_area: int = 30
    nucleus_width: float = 3.0
    nucleus_solidity: float = 0.8
    nucleus_area: float = 6.0
    level: float = 0.4
    split_factor: float = 1.3
    core_fractions: tuple[float, ...] = (0.5, 0.65)
    min_piece: float = 0.3
    cluster_factor: float = CLUSTER_FACTOR


class ClassicalSegmenter:
    name = "classical"
    version = "1"

    def __init__(self, params: ClassicalParams | None = None) -> None:
        self.params = params or ClassicalParams()

    def foreground(self, grey: np.ndarray) -> np.ndarray:
        return self._foreground(grey)[0]

    def _foreground(self, grey: np.ndarray) -> tuple[np.ndarray, float | None]:
        """Chromosomes and nuclei. Two passes: Otsu's threshold finds the objects; nuclei (dark and large)
        would drag a global threshold towards themselves and lose pale chromosomes, so the final threshold
        sits `level` of the way from the background's median to the median of the thin objects' pixels."""
        from scipy import ndimage as ndi
        from skimage.filters import gaussian, threshold_local, threshold_otsu
        from skimage.morphology import remove_small_objects

        p = self.params
        img = gaussian(grey.astype(np.float64) / 255.0, sigma=p.smooth_sigma) if p.smooth_sigma else grey / 255.0
        first = np.asarray(remove_small_objects(img < threshold_otsu(img), max_size=p.min_area - 1))
        measured = stroke_width(first) if first.any() else None
        if first.any():
            width = measured or 8.0
            labels, _ = ndi.label(first)
            thin = first & ~self._nucleus_mask(labels, width)
            if thin.sum() > p.min_area:
                bg = float(np.median(img[~ndi.binary_dilation(first, iterations=3)]))
                obj = float(np.median(img[thin]))
                fg = img < bg - p.level * (bg - obj)
            else:
                fg = first
        else:
            fg = first
        if p.local_block:
            fg &= img < threshold_local(img, p.local_block | 1, offset=0.02)
        return np.asarray(remove_small_objects(fg, max_size=p.min_area - 1)), measured

    def nuclei(self, grey: np.ndarray) -> tuple[np.ndarray, float | None]:
        """Interphase nuclei (bool mask) and the chromosome width (px, None if unknown) of an image; the
        learned segmenter uses both (to drop a nucleus its network marked, to choose its scale)."""
        from scipy import ndimage as ndi

        fg = self.foreground(grey)
        # measured on the final foreground: Otsu's first pass is narrowed by a nucleus (x1.4 on some images)
        width = stroke_width(fg)
        labels, n = ndi.label(fg)
        if n == 0:
            return np.zeros(grey.shape, dtype=bool), width
        return self._nucleus_mask(labels, width or 8.0), width

    def _nucleus_mask(self, labels: np.ndarray, width: float) -> np.ndarray:
        """Pixels of components that look like interphase nuclei: wide, compact and large."""
        from skimage.measure import regionprops

        p = self.params
        out = np.zeros(labels.shape, dtype=bool)
        for r in regionprops(labels):
            if is_nucleus(r.image, width, min_width=p.nucleus_width, min_solidity=p.nucleus_solidity,
                          min_area=p.nucleus_area):
                y0, x0, y1, x1 = r.bbox
                out[y0:y1, x0:x1] |= r.image
        return out

    def segment(self, grey: np.ndarray) -> list[Instance]:
        from scipy import ndimage as ndi
        from skimage.measure import regionprops

        if grey.ndim != 2:
            raise ValueError(f"segment wants a (H, W) greyscale image, got shape {grey.shape}")
        p = self.params
        fg = self.foreground(grey)
        labels, n = ndi.label(fg)
        if n == 0:
            return []
        width = stroke_width(fg) or 8.0
        nuclei = self._nucleus_mask(labels, width)
        labels[nuclei] = 0
        keep = [r for r in regionprops(labels)]
        if not keep:
            return []
        median = float(np.median([r.area for r in keep]))
        dist = ndi.distance_transform_edt(labels > 0)
        out: list[Instance] = []
        for r in keep:
            y0, x0, y1, x1 = r.bbox
            mask = r.image
            pieces = [(mask, 1.0)]
            if r.area > p.split_factor * median:
                pieces = self._split(mask, dist[y0:y1, x0:x1], width, median) or pieces
            for m, conf in pieces:
                ys, xs = np.nonzero(m)
                by0, by1, bx0, bx1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
                sub = m[by0:by1, bx0:bx1]
                score = conf * float(min(1.0, sub.sum() / (0.5 * median)))
                out.append(Instance(mask=sub.copy(), box=(x0 + int(bx0), y0 + int(by0), x0 + int(bx1), y0 + int(by1)),
                                    score=score))
        flag_clusters(out, p.cluster_factor, reference_area=median)
        return out

    def _split(self, mask: np.ndarray, dist: np.ndarray, width: float,
               median: float) -> list[tuple[np.ndarray, float]] | None:
        """Watershed pieces of one component, or None when no confident split exists."""
        from scipy import ndimage as ndi
        from skimage.segmentation import watershed

        d = np.where(mask, dist, 0)
        for fraction in self.params.core_fractions:
            seeds, k = ndi.label(d >= fraction * width / 2)
            if k < 2:
                continue
            lab = watershed(-d, markers=seeds, mask=mask)
            pieces = [m for m in (lab == i for i in range(1, k + 1)) if m.any()]
            if len(pieces) >= 2 and min(int(m.sum()) for m in pieces) >= self.params.min_piece * median:
                return [(m, 0.8) for m in pieces]
        return None
