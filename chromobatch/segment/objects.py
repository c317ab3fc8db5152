"""What both segmenters share: labelled regions into Instances, cluster flagging, chromosome width.

Cluster rule (both segmenters): an object much larger than the image's median chromosome (more than
`CLUSTER_FACTOR` times its area) that could not be split is kept whole and flagged "cluster, about N
chromosomes" with N = round(area / (divisor x mean single-chromosome area)), at least 2, never guessed apart. The
largest human chromosome is about twice the median one, so 2.5x leaves room for chromosome 1 while catching two or
more stuck together. The learned segmenter chooses its factor, divisor and fork check on its training split
(`segment.train.tune_clusters`): on real Q-band spreads the chromosomes stuck together are mostly the large
ones, so area over the mean single area overcounts them (bioimlab-metaphase train split: 148 estimated for
104 annotated), and objects of 2.5-3x the median are more often two chromosomes than one, the forked ones
most of all (docs/results.md).
"""

from __future__ import annotations

import numpy as np

from chromobatch.segment.base import Instance

CLUSTER_FACTOR = 2.5


def regions_to_instances(labels: np.ndarray, scores: dict[int, float] | None = None,
                         min_area: int = 1, cluster_factor: float = CLUSTER_FACTOR,
                         reference_area: float | None = None) -> list[Instance]:
    """Each label > 0 of `labels` (H, W ints) as an Instance, small ones (< min_area px) dropped, large
    ones flagged as clusters relative to the median area (or `reference_area` when given)."""
    from scipy import ndimage as ndi

    out: list[Instance] = []
    slices = ndi.find_objects(labels)
    for idx, sl in enumerate(slices, start=1):
        if sl is None:
            continue
        mask = labels[sl] == idx
        if int(mask.sum()) < min_area:
            continue
        ys, xs = sl
        box = (int(xs.start), int(ys.start), int(xs.stop), int(ys.stop))
        score = 1.0 if scores is None else float(scores.get(idx, 1.0))
        out.append(Instance(mask=mask, box=box, score=score))
    flag_clusters(out, cluster_factor, reference_area)
    return out


def is_nucleus(mask: np.ndarray, width: float, *, min_width: float = 3.0, min_solidity: float = 0.8,
               min_area: float = 6.0) -> bool:
    """An interphase nucleus rather than chromosomes: far wider than a chromosome (minor axis over
    `min_width` x its width), compact (solidity over `min_solidity`) and large (over `min_area` x width^2).
    A cluster of chromosomes is as large but ragged (low solidity) or thin somewhere."""
    from skimage.measure import regionprops

    if mask.sum() < min_area * width * width:
        return False
    props = regionprops(mask.astype(np.uint8))
    if not props:
        return False
    r = props[0]
    return bool(r.axis_minor_length > min_width * width and r.solidity > min_solidity)


def flag_clusters(instances: list[Instance], cluster_factor: float = CLUSTER_FACTOR,
                  reference_area: float | None = None, *, divisor: float = 1.0,
                  branched_below: float = 0.0) -> None:
    """Mark instances far larger than the median chromosome (over `cluster_factor` x its area) as clusters
    (in place). Their size N is the area over `divisor` x the *mean* area of the single chromosomes (at least
    2): total area over mean area is the expected count where clusters are a fair draw of chromosomes (the
    median, sizes being skewed, would overcount); `divisor` > 1 where the clustered ones are the large ones.

    `branched_below`: an object under this many times the median area is a cluster only when its skeleton
    branches. Why: a long chromosome 1 or 2 can be as large as two small ones stuck together, but it is one
    unbranched band, where two chromosomes touching or crossing make a fork or a cross (bioimlab-metaphase
    train split, objects of 2.2-3x the median: 50 of 61 branched ones hold two chromosomes, 17 of 24
    unbranched ones a single one)."""
    if not instances:
        return
    areas = np.array([i.area for i in instances], dtype=np.float64)
    median = float(reference_area) if reference_area else float(np.median(areas))
    if median <= 0:
        return
    big = areas > cluster_factor * median
    for k in np.flatnonzero(big & (areas <= branched_below * median)):
        big[k] = branches(instances[k].mask)
    if not big.any():
        return
    mean = float(areas[~big].mean()) if (~big).any() else median
    for inst, area, flagged in zip(instances, areas, big, strict=True):
        if flagged:
            inst.cluster = max(2, int(round(area / (divisor * mean))))
            inst.notes["cluster_reason"] = f"area {area / median:.1f}x the median chromosome, not separable"
            inst.score = min(inst.score, 0.5)


def branches(mask: np.ndarray) -> bool:
    """Whether the skeleton of an object forks: a skeleton pixel with three or more skeleton neighbours,
    after the short spurs a thick blunt end leaves on a skeleton are pruned (arms shorter than the object's
    width, area over skeleton length: a real fork's arms are whole chromosome arms)."""
    from scipy import ndimage as ndi
    from skimage.morphology import skeletonize

    skel = skeletonize(np.pad(mask, 1))
    length = int(skel.sum())
    if length == 0:
        return False
    kernel = np.ones((3, 3), np.uint8)
    for _ in range(int(round(mask.sum() / length))):  # peel one pixel off every free end, width times
        neighbours = ndi.convolve(skel.astype(np.uint8), kernel, mode="constant") - 1
        ends = skel & (neighbours <= 1)
        if not ends.any():
            break
        skel = skel & ~ends
    neighbours = ndi.convolve(skel.astype(np.uint8), kernel, mode="constant") - 1
    return bool((skel & (neighbours >= 3)).any())


def stroke_width(fg: np.ndarray) -> float | None:
    """The median width (px) of the elongated objects in a foreground mask: twice the distance transform
    along their skeletons. None when there is too little foreground to tell."""
    from scipy import ndimage as ndi
    from skimage.morphology import skeletonize

    if fg.sum() < 200:
        return None
    dist = ndi.distance_transform_edt(fg)
    skel = skeletonize(fg)
    vals = dist[skel]
    if len(vals) < 50:
        return None
    return float(2.0 * np.median(vals))


def otsu_foreground(grey: np.ndarray, min_area: int = 30) -> np.ndarray:
    """Dark objects on a light background by Otsu's threshold, specks removed."""
    from skimage.filters import threshold_otsu
    from skimage.morphology import remove_small_objects

    t = threshold_otsu(grey)
    fg = grey < t
    return np.asarray(remove_small_objects(fg, max_size=min_area - 1))
