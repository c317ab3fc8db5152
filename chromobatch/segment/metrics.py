"""Scoring instances against annotated chromosomes: F1 and AP at IoU 0.5, and the count per image.

Why these: a chromosome that is found but cut in two, or merged with its neighbour, is useless to the
classifier, so an instance counts only when it overlaps one annotated chromosome with IoU >= 0.5 (the
usual instance-segmentation criterion); F1 says how many whole chromosomes come out, AP (ranked by the
segmenter's score) whether the score can tell good instances from bad ones. The count per cell is a
first-class result for the lab, so the count error is reported on its own: a flagged cluster counts as
its estimated size N (that is the count the pipeline reports), an instance as 1.

Ground truth comes from labelme polygons (`read_labelme`), rasterised with skimage.draw.polygon.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from chromobatch.errors import DataError
from chromobatch.segment.base import Instance

IOU_THRESHOLD = 0.5


def polygon_instance(points: Sequence[Sequence[float]], shape: tuple[int, int]) -> Instance | None:
    """One labelme polygon (x, y points) as an Instance (None when it covers no pixel of the image)."""
    from skimage.draw import polygon

    pts = np.asarray(points, dtype=np.float64)
    if pts.ndim != 2 or pts.shape[0] < 3 or pts.shape[1] != 2:
        return None
    rr, cc = polygon(pts[:, 1], pts[:, 0], shape=shape)
    if len(rr) == 0:
        return None
    y0, y1, x0, x1 = int(rr.min()), int(rr.max()) + 1, int(cc.min()), int(cc.max()) + 1
    mask = np.zeros((y1 - y0, x1 - x0), dtype=bool)
    mask[rr - y0, cc - x0] = True
    return Instance(mask=mask, box=(x0, y0, x1, y1))


def read_labelme(path: Path, shape: tuple[int, int] | None = None) -> list[Instance]:
    """Every polygon of a labelme JSON file as an Instance; `shape` (H, W) defaults to the file's own."""
    try:
        doc = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{path}: not a readable labelme JSON file: {exc}") from exc
    if not isinstance(doc, dict) or not isinstance(doc.get("shapes"), list):
        raise DataError(f"{path}: no 'shapes' list (not a labelme annotation)")
    if shape is None:
        try:
            shape = (int(doc["imageHeight"]), int(doc["imageWidth"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise DataError(f"{path}: lacks imageHeight/imageWidth") from exc
    out = []
    for s in doc["shapes"]:
        if s.get("shape_type", "polygon") != "polygon":
            continue
        inst = polygon_instance(s.get("points", []), shape)
        if inst is not None:
            out.append(inst)
    return out


def iou_matrix(pred: Sequence[Instance], gt: Sequence[Instance]) -> np.ndarray:
    """IoU of every prediction (rows) with every ground-truth instance (columns), via their boxes."""
    out = np.zeros((len(pred), len(gt)), dtype=np.float64)
    for i, p in enumerate(pred):
        px0, py0, px1, py1 = p.box
        pa = p.area
        for j, g in enumerate(gt):
            gx0, gy0, gx1, gy1 = g.box
            x0, y0, x1, y1 = max(px0, gx0), max(py0, gy0), min(px1, gx1), min(py1, gy1)
            if x0 >= x1 or y0 >= y1:
                continue
            pm = p.mask[y0 - py0 : y1 - py0, x0 - px0 : x1 - px0]
            gm = g.mask[y0 - gy0 : y1 - gy0, x0 - gx0 : x1 - gx0]
            inter = int(np.logical_and(pm, gm).sum())
            if inter:
                out[i, j] = inter / (pa + g.area - inter)
    return out


def _greedy_match(iou: np.ndarray, order: np.ndarray, threshold: float) -> np.ndarray:
    """For predictions taken in `order`, the ground truth each one matches (-1: none): the unmatched one
    with the highest IoU >= threshold (the COCO rule)."""
    matched = np.full(iou.shape[0], -1, dtype=np.int64)
    taken = np.zeros(iou.shape[1], dtype=bool)
    for i in order:
        if iou.shape[1] == 0:
            break
        row = np.where(taken, -1.0, iou[i])
        j = int(np.argmax(row))
        if row[j] >= threshold:
            matched[i] = j
            taken[j] = True
    return matched


@dataclass
class ImageScore:
    """One image's instances scored against its annotation."""

    name: str
    n_pred: int
    n_gt: int
    tp: int
    count: int
    #: (score, is true positive) per prediction, for AP over a whole set.
    ranked: list[tuple[float, bool]] = field(default_factory=list)
    flagged: int = 0

    @property
    def count_error(self) -> int:
        return self.count - self.n_gt


def score_image(pred: Sequence[Instance], gt: Sequence[Instance], name: str = "",
                threshold: float = IOU_THRESHOLD) -> ImageScore:
    """Match predictions to annotated chromosomes (IoU >= threshold, one to one, by score)."""
    iou = iou_matrix(pred, gt)
    scores = np.array([p.score for p in pred], dtype=np.float64)
    order = np.argsort(-scores, kind="stable")
    matched = _greedy_match(iou, order, threshold)
    ranked = [(float(scores[i]), bool(matched[i] >= 0)) for i in range(len(pred))]
    return ImageScore(name=name, n_pred=len(pred), n_gt=len(gt), tp=int((matched >= 0).sum()),
                      count=int(sum(max(1, p.cluster) for p in pred)), ranked=ranked,
                      flagged=sum(1 for p in pred if p.cluster > 1))


def average_precision(ranked: Sequence[tuple[float, bool]], n_gt: int) -> float:
    """AP as the area under the all-point interpolated precision-recall curve (predictions by score)."""
    if n_gt == 0:
        return float("nan")
    if not ranked:
        return 0.0
    arr = sorted(ranked, key=lambda t: -t[0])
    tp = np.cumsum([1.0 if t else 0.0 for _, t in arr])
    fp = np.cumsum([0.0 if t else 1.0 for _, t in arr])
    recall = tp / n_gt
    precision = tp / np.maximum(tp + fp, 1e-12)
    mrec = np.concatenate([[0.0], recall, [recall[-1]]])
    mpre = np.concatenate([[1.0], precision, [0.0]])
    for i in range(len(mpre) - 2, -1, -1):
        mpre[i] = max(mpre[i], mpre[i + 1])
    idx = np.where(mrec[1:] != mrec[:-1])[0]
    return float(np.sum((mrec[idx + 1] - mrec[idx]) * mpre[idx + 1]))


@dataclass
class SetScore:
    """A set of images: instance F1/precision/recall and AP at IoU 0.5 (pooled over all instances), and
    the count per image (exact, within +-1, mean absolute error)."""

    images: list[ImageScore]

    @property
    def tp(self) -> int:
        return sum(s.tp for s in self.images)

    @property
    def n_pred(self) -> int:
        return sum(s.n_pred for s in self.images)

    @property
    def n_gt(self) -> int:
        return sum(s.n_gt for s in self.images)

    @property
    def precision(self) -> float:
        return self.tp / self.n_pred if self.n_pred else 0.0

    @property
    def recall(self) -> float:
        return self.tp / self.n_gt if self.n_gt else 0.0

    @property
    def f1(self) -> float:
        d = self.n_pred + self.n_gt
        return 2 * self.tp / d if d else 1.0

    @property
    def ap(self) -> float:
        return average_precision([r for s in self.images for r in s.ranked], self.n_gt)

    @property
    def exact_count(self) -> float:
        return float(np.mean([s.count_error == 0 for s in self.images])) if self.images else 0.0

    @property
    def count_within_1(self) -> float:
        return float(np.mean([abs(s.count_error) <= 1 for s in self.images])) if self.images else 0.0

    @property
    def mean_abs_count_error(self) -> float:
        return float(np.mean([abs(s.count_error) for s in self.images])) if self.images else 0.0

    @property
    def flagged(self) -> int:
        return sum(s.flagged for s in self.images)

    def summary(self) -> dict[str, float | int]:
        return {"images": len(self.images), "annotated": self.n_gt, "predicted": self.n_pred, "tp": self.tp,
                "precision": self.precision, "recall": self.recall, "f1": self.f1, "ap50": self.ap,
                "exact_count": self.exact_count, "count_within_1": self.count_within_1,
                "mean_abs_count_error": self.mean_abs_count_error, "flagged_clusters": self.flagged}
