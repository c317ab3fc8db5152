"""From instances to chromosome crops: what the classifier reads, and what the database keeps of each.

Why a crop of the instance's own pixels: a neighbour that touches or crosses a chromosome would otherwise
enter its crop and its ink (the size prior). Each crop is cut at native scale (size is information),
neighbours masked to white, and turned upright as karyogram crops are, so the classifier trained on
karyogram crops reads it the same way. Its identity is the source file's hash plus its own mask, so two
chromosomes of one file never collide and the same delivery cut by the same segmenter is the same rows.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Collection
from typing import Any

import numpy as np

from chromobatch.intake.imaging import ImageRejected, encode_png
from chromobatch.intake.metaphase import MIN_CHROMOSOMES
from chromobatch.intake.scan import Accepted, CellSource, Metaphase, ScannedCase
from chromobatch.ml.geometry import upright
from chromobatch.segment.base import Instance, Segmenter

log = logging.getLogger(__name__)

#: Margin (pixels) of background kept around each instance before it is turned upright.
MARGIN = 3


def polygon_of(inst: Instance, *, tolerance: float = 0.8) -> list[list[int]]:
    """The instance's outline in image coordinates, [[x, y], ...] (the longest contour, simplified)."""
    from skimage.measure import approximate_polygon, find_contours

    padded = np.pad(inst.mask.astype(np.float32), 1)
    contours = find_contours(padded, 0.5)
    if not contours:
        x0, y0, x1, y1 = inst.box
        return [[x0, y0], [x1, y0], [x1, y1], [x0, y1]]
    contour = approximate_polygon(max(contours, key=len), tolerance=tolerance)
    x0, y0 = inst.box[0] - 1, inst.box[1] - 1
    return [[int(round(c)) + x0, int(round(r)) + y0] for r, c in contour]


def instance_crop(grey: np.ndarray, inst: Instance) -> np.ndarray:
    """The instance's pixels only (neighbours white), with a margin, turned upright."""
    h, w = grey.shape
    x0, y0, x1, y1 = inst.box
    X0, Y0 = max(x0 - MARGIN, 0), max(y0 - MARGIN, 0)
    X1, Y1 = min(x1 + MARGIN, w), min(y1 + MARGIN, h)
    region = grey[Y0:Y1, X0:X1].copy()
    mask = np.zeros(region.shape, dtype=bool)
    mask[y0 - Y0:y1 - Y0, x0 - X0:x1 - X0] = inst.mask
    region[~mask] = 255
    turned, _ = upright(region)
    return turned


def instance_sha(source_sha: str, inst: Instance) -> str:
    h = hashlib.sha256()
    h.update(source_sha.encode())
    h.update(np.asarray(inst.box, dtype=np.int64).tobytes())
    h.update(np.packbits(inst.mask.astype(bool)).tobytes())
    return h.hexdigest()


def reading_order(instances: list[Instance]) -> list[Instance]:
    """Top to bottom, then left to right, in bands of the median object height: numbers a person can follow."""
    if not instances:
        return []
    band = max(8.0, float(np.median([i.box[3] - i.box[1] for i in instances])))
    return sorted(instances, key=lambda i: (int(((i.box[1] + i.box[3]) / 2) // band), (i.box[0] + i.box[2]) / 2))


def cut_metaphase(m: Metaphase, segmenter: Segmenter) -> tuple[list[Accepted], CellSource]:
    """Segment one metaphase into accepted chromosomes (and clusters, flagged) and what its cell keeps.

    Raises ImageRejected when fewer than MIN_CHROMOSOMES chromosomes are found (clusters by their estimate).
    """
    instances = reading_order(segmenter.segment(m.grey))
    found = sum(max(1, int(i.cluster)) for i in instances)
    if found < MIN_CHROMOSOMES:
        raise ImageRejected(f"not a metaphase: the segmenter found {found} chromosome(s), at least "
                            f"{MIN_CHROMOSOMES} expected (only background, nuclei or debris?)")
    accepted: list[Accepted] = []
    clusters: list[dict[str, Any]] = []
    for number, inst in enumerate(instances, start=1):
        flags: dict[str, Any] | None = None
        if inst.cluster > 1:
            flags = {"cluster": int(inst.cluster)}
            clusters.append({"instance": number, "about": int(inst.cluster)})
        accepted.append(Accepted(file=f"{m.file}#{number}", cell=m.cell, sha256=instance_sha(m.sha256, inst),
                                 crop=instance_crop(m.grey, inst), polarity=m.polarity, cell_order=m.order,
                                 instance=number, box=[int(v) for v in inst.box], polygon=polygon_of(inst),
                                 flags=flags))
    source = CellSource(file=m.file, sha256=m.sha256, image_png=encode_png(m.grey), count=found,
                        segmentation={"segmenter": f"{segmenter.name} {segmenter.version}",
                                      "instances": len(instances), "clusters": clusters,
                                      "count_is_estimate": bool(clusters)})
    return accepted, source


def cut_case(scanned: ScannedCase, segmenter: Segmenter, *, stored: Collection[str] = ()) -> int:
    """Cut every metaphase of a scanned case into scanned.accepted; a metaphase whose file hash is in
    `stored` (already segmented and stored for this case) is not cut again, so a re-run adds nothing.
    A metaphase that yields nothing is moved to scanned.rejected with the reason. Returns how many were cut."""
    cut = 0
    todo = [m for m in scanned.metaphases if m.sha256 not in stored]
    if todo:
        log.info("case %s: segmenting %d metaphase(s) with %s %s", scanned.case_id, len(todo), segmenter.name,
                 segmenter.version)
    for m in todo:
        try:
            accepted, source = cut_metaphase(m, segmenter)
        except ImageRejected as exc:
            scanned.rejected[m.file] = str(exc)
            continue
        scanned.accepted.extend(accepted)
        scanned.cell_sources[m.cell] = source
        cut += 1
        log.debug("case %s: %s: %d objects (%d chromosomes counted)", scanned.case_id, m.file,
                  len(accepted), source.count)
    return cut
