"""The size prior: how much DNA a chromosome holds, relative to its own cell, as evidence for its class.

Resize-to-fit preprocessing (the best image input we measured) throws a chromosome's size away, and the
image model's remaining errors are mostly pairs a cytogeneticist tells apart by size (1/2, 10/16, 21/22).
Size relative to the cell is also what survives a change of microscope or condensation. So a model folder
may carry a small Gaussian model per class of one number, the chromosome's integrated darkness (its "ink",
a proxy for DNA content, as in classical densitometric karyotyping) divided by the median ink of its cell,
on a log scale. At prediction time:

    log p'(k) = log p_image(k) + weight * log N(r; mean_k, std_k)      (then renormalised)

with r the crop's log relative ink. Crops whose cell is unknown or has fewer than `min_cell` measurable
chromosomes keep the image probabilities unchanged. `fit` learns the per-class numbers from training cells;
`tune_weight` picks the weight on the validation split (0 means: the prior does not help, do not use it).
"""

from __future__ import annotations

import logging
import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from chromobatch import NUM_CLASSES
from chromobatch.errors import ModelError
from chromobatch.ml.geometry import background_level, chromosome_mask

log = logging.getLogger(__name__)

FEATURE = "log_relative_ink"
#: the weight grid searched on the validation split.
WEIGHTS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 1.0)
#: a cell needs this many measurable chromosomes before its median means anything (a normal cell has 46).
MIN_CELL = 10
MIN_STD = 0.05
#: fewer measured crops of a class than this: that class gets a broad Gaussian (see `fit`) ...
MIN_PER_CLASS = 3
#: ... and with more such classes than this, no prior is fitted at all.
MAX_BROAD = 4


def ink(crop: np.ndarray) -> float:
    """Integrated darkness of a normalised (dark-on-light, uint8) crop over the chromosome's pixels; 0 if blank."""
    arr = np.asarray(crop)
    if arr.ndim != 2 or arr.size == 0:
        return 0.0
    bg, noise = background_level(arr)
    mask = chromosome_mask(arr, bg, noise)
    return float(np.clip(bg - arr[mask].astype(np.float64), 0.0, None).sum())


def inks(crops: Sequence[np.ndarray]) -> list[float]:
    """`ink` of each crop, in order: what a render pool worker measures of its share (`RenderPool.map`)."""
    return [ink(c) for c in crops]


def cell_median_inks(inks: Sequence[float], cells: Sequence[str], min_cell: int = MIN_CELL) -> list[float | None]:
    """Per crop, the median ink of its cell ('' = unknown cell -> None; too few measurable crops -> None)."""
    if len(inks) != len(cells):
        raise ValueError(f"{len(inks)} ink values for {len(cells)} cells")
    by_cell: dict[str, list[float]] = defaultdict(list)
    for v, c in zip(inks, cells, strict=True):
        if c and v > 0:
            by_cell[c].append(v)
    med = {c: float(np.median(v)) for c, v in by_cell.items() if len(v) >= min_cell}
    return [med.get(c) if c else None for c in cells]


def relative(inks: Sequence[float], refs: Sequence[float | None]) -> np.ndarray:
    """log(ink / cell median ink) per crop; NaN where either is missing or not positive."""
    out = np.full(len(inks), np.nan)
    for i, (v, r) in enumerate(zip(inks, refs, strict=True)):
        if r is not None and r > 0 and v > 0:
            out[i] = math.log(v / r)
    return out


@dataclass(frozen=True)
class SizePrior:
    """Per-class mean/std of the log relative ink and the weight it gets; stored in model.json."""

    mean: tuple[float, ...]
    std: tuple[float, ...]
    weight: float
    min_cell: int = MIN_CELL
    feature: str = FEATURE

    def __post_init__(self) -> None:
        if len(self.mean) != NUM_CLASSES or len(self.std) != NUM_CLASSES:
            raise ModelError(f"size prior needs {NUM_CLASSES} means and stds")
        if self.feature != FEATURE:
            raise ModelError(f"unknown size-prior feature {self.feature!r} (newer chromobatch?)")
        if not (self.weight >= 0 and all(s > 0 for s in self.std) and all(map(math.isfinite, self.mean))):
            raise ModelError("invalid size prior numbers (weight >= 0, std > 0, finite means)")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SizePrior:
        try:
            return cls(mean=tuple(float(v) for v in data["mean"]), std=tuple(float(v) for v in data["std"]),
                       weight=float(data["weight"]), min_cell=int(data.get("min_cell", MIN_CELL)),
                       feature=str(data.get("feature", FEATURE)))
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelError(f"size prior in model.json is malformed: {exc}") from exc

    def log_likelihood(self, rel: np.ndarray) -> np.ndarray:
        """[N, 24] Gaussian log-likelihood of each crop's log relative ink under each class; 0 rows for NaN."""
        r = np.asarray(rel, dtype=np.float64)[:, None]
        mean, std = np.asarray(self.mean)[None, :], np.asarray(self.std)[None, :]
        ll = -0.5 * ((r - mean) / std) ** 2 - np.log(std)
        ll[~np.isfinite(r[:, 0])] = 0.0
        return ll

    def apply(self, probs: np.ndarray, rel: np.ndarray, weight: float | None = None) -> np.ndarray:
        """Image probabilities [N, 24] combined with the size evidence; rows without a measurement unchanged."""
        w = self.weight if weight is None else weight
        p = np.asarray(probs, dtype=np.float64)
        if w == 0 or p.size == 0:
            return np.asarray(probs, dtype=np.float32)
        score = np.log(np.clip(p, 1e-12, None)) + w * self.log_likelihood(rel)
        score -= score.max(axis=1, keepdims=True)
        out = np.exp(score)
        out /= out.sum(axis=1, keepdims=True)
        keep = ~np.isfinite(np.asarray(rel, dtype=np.float64))
        out[keep] = p[keep]
        return out.astype(np.float32)


def relative_inks(inks: Sequence[float], cells: Sequence[str], min_cell: int = MIN_CELL) -> np.ndarray:
    """log(ink / median ink of the crop's cell) per crop: what `SizePrior.apply` takes. NaN where the cell is
    unknown ('') or has fewer than `min_cell` measurable crops."""
    return relative(inks, cell_median_inks(inks, cells, min_cell))
