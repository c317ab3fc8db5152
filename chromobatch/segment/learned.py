"""The learned segmenter: a compact U-Net (`unet.py`) predicts foreground and chromosome cores; a watershed
grows every core into the foreground, which separates touching chromosomes; what stays one large object is
flagged as a cluster (`objects.flag_clusters`).

A model folder holds model.safetensors (weights, no pickle) and model.json (format "chromobatch-segmenter":
architecture, post-processing thresholds, the chromosome width it was trained at, training record and
test figures). Like the classifier's folders (`ml.folders`), loading checks every tensor's name and shape
and names the file in every error.

Scale: the network was trained on chromosomes about `stroke_width` px wide (BioImLab, 768 x 576). A
metaphase photographed at another magnification (the 1600 x 1200 G-band example has ~2.5x wider
chromosomes) is resized so its chromosomes have that width before the network sees it, and the instances
are mapped back to the original pixels.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file

import chromobatch
from chromobatch.errors import ModelError
from chromobatch.files import atomic_write, load_weights, read_json_meta, sha256_file
from chromobatch.segment.base import Instance
from chromobatch.segment.objects import branches, flag_clusters, is_nucleus, regions_to_instances
from chromobatch.segment.unet import UNet, pad_to_stride

log = logging.getLogger(__name__)

WEIGHTS = "model.safetensors"
META = "model.json"
FORMAT = "chromobatch-segmenter"
FORMAT_VERSION = 1
#: Post-processing defaults (tuned on the validation split by `train`; model.json may override them).
POSTPROCESS = {"fg_threshold": 0.5, "core_threshold": 0.5, "min_seed": 6, "min_area": 25,
               "cluster_factor": 2.5, "merge_small": 0.0, "cluster_divisor": 1.0,
               "cluster_branched_below": 0.0, "split_factor": 0.0, "split_min_piece": 0.4}

#: Core thresholds tried, lowest first, when a large object's core is raised until it falls apart
#: (`_split_merged`); only those above the model's own core threshold.
SPLIT_LEVELS = (0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


#: An image is resized only when its chromosomes are this much wider or narrower than in training.
SCALE_TOLERANCE = 1.4


def build_net(meta: dict[str, Any]) -> UNet:
    return UNet(channels=tuple(int(c) for c in meta["channels"]))


def save_segmenter(net: UNet, meta: dict[str, Any], folder: str | Path) -> Path:
    """Write `folder`/model.safetensors + model.json atomically (a reader sees the old or the new file)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu").contiguous() for k, v in net.state_dict().items()}
    full = dict(meta)
    full.update({"format": FORMAT, "format_version": FORMAT_VERSION, "architecture": "unet",
                 "channels": list(net.channels), "chromobatch_version": chromobatch.__version__})
    full.setdefault("postprocess", dict(POSTPROCESS))
    atomic_write(folder / WEIGHTS, lambda p: save_file(state, str(p), metadata={"format": FORMAT}))
    atomic_write(folder / META, json.dumps(full, indent=2, sort_keys=True) + "\n")
    return folder


def read_meta(folder: str | Path) -> dict[str, Any]:
    path = Path(folder) / META
    meta = read_json_meta(path, fmt=FORMAT, version=FORMAT_VERSION, what="segmenter")
    if not isinstance(meta.get("channels"), list) or not meta["channels"]:
        raise ModelError(f"{path}: lacks 'channels' (the U-Net's widths)")
    return meta


def update_meta(folder: str | Path, changes: dict[str, Any]) -> dict[str, Any]:
    """Merge `changes` into a segmenter folder's model.json (atomically)."""
    meta = read_meta(folder)
    meta.update(changes)
    atomic_write(Path(folder) / META, json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return meta


class LearnedSegmenter:
    """A trained U-Net + watershed; `segment(grey)` on a normalised metaphase (dark on light, uint8)."""

    def __init__(self, net: UNet, meta: dict[str, Any], *, name: str = "unet", version: str = "",
                 threads: int | None = None) -> None:
        self.net = net.eval()
        self.meta = meta
        self.name = name
        self.version = version or str(meta.get("version", ""))
        self.post = {**POSTPROCESS, **meta.get("postprocess", {})}
        self.threads = threads
        self.last_timing: dict[str, float] = {}

    # -- the steps, public so that training can tune the post-processing on cached network outputs --

    def scale_for(self, width: float | None) -> float:
        """Factor the image is resized by so its chromosomes are as wide as in training (1.0: as is), given
        their width measured on the image (`ClassicalSegmenter.nuclei`, the way training measured its own)."""
        ref = self.meta.get("stroke_width")
        if not ref or not width:
            return 1.0
        factor = float(ref) / width
        # the network saw chromosomes at 0.75-1.35x their width in training, and a single image's estimate
        # is rough (+-20%, a nucleus narrows Otsu's foreground): only a clearly other magnification is resized
        return 1.0 if 1 / SCALE_TOLERANCE <= factor <= SCALE_TOLERANCE else factor

    @torch.no_grad()
    def probabilities(self, grey: np.ndarray) -> np.ndarray:
        """(2, H, W) float32: foreground and core probabilities for a normalised uint8 image."""
        previous = torch.get_num_threads()
        if self.threads:  # for this forward pass only: the classifier in the same process keeps its own
            torch.set_num_threads(self.threads)
        try:
            x = torch.from_numpy(np.ascontiguousarray(grey, dtype=np.float32) / 255.0)[None, None]
            x = (x - 0.5) / 0.25
            x, (h, w) = pad_to_stride(x, self.net.stride)
            out = torch.sigmoid(self.net(x))[0, :, :h, :w]
        finally:
            torch.set_num_threads(previous)
        return out.numpy()

    def instances_from(self, probs: np.ndarray, nuclei: np.ndarray | None = None) -> list[Instance]:
        """Foreground + cores -> instances: seeds are the core components, watershed grows them over the
        foreground; foreground components without any core become instances of their own. Regions lying
        mostly on a nucleus (`nuclei`, found on the image by the classical rule) are left out."""
        from scipy import ndimage as ndi
        from skimage.morphology import remove_small_objects
        from skimage.segmentation import watershed

        p = self.post
        pfg, pcore = probs[0], probs[1]
        fg = pfg > float(p["fg_threshold"])
        fg = remove_small_objects(fg, max_size=int(p["min_area"]) - 1)
        seeds, n = ndi.label((pcore > float(p["core_threshold"])) & fg)
        if n:
            sizes = np.bincount(seeds.ravel())
            small = sizes < int(p["min_seed"])
            small[0] = False
            seeds[small[seeds]] = 0
        labels = watershed(-pcore, markers=seeds, mask=fg)
        orphans, k = ndi.label(fg & (labels == 0))
        if k:
            labels = np.where(orphans > 0, orphans + labels.max(), labels)
        labels, _, _ = _relabel(labels)
        if float(p.get("merge_small", 0.0)) > 0:
            labels, _, _ = _relabel(_merge_fragments(labels, float(p["merge_small"])))
        width = float(self.meta.get("stroke_width") or 10.0)
        if float(p.get("split_factor", 0.0)) > 0:
            labels = _split_merged(labels, pcore, p, width)
        if nuclei is not None and nuclei.any():
            labels = _drop_on_nuclei(labels, nuclei)
        scores = _region_scores(labels, pfg, pcore)
        found = regions_to_instances(labels, scores, min_area=int(p["min_area"]), cluster_factor=math.inf)
        self._flag_clusters(found)
        kept = [i for i in found if i.cluster == 1 or not is_nucleus(i.mask, width)]
        if len(kept) < len(found):  # a nucleus the network took for chromosomes: left out, clusters re-judged
            for i in kept:
                i.cluster, i.notes = 1, {}
            self._flag_clusters(kept)
        return kept

    def _flag_clusters(self, instances: list[Instance]) -> None:
        """`objects.flag_clusters` with this model's cluster rule (chosen on its training split)."""
        p = self.post
        flag_clusters(instances, float(p["cluster_factor"]), divisor=float(p["cluster_divisor"]),
                      branched_below=float(p["cluster_branched_below"]))

    def prepare(self, grey: np.ndarray) -> Prepared:
        """The costly part of `segment`: nuclei and width (classical), the scale, the network's maps."""
        if grey.ndim != 2 or grey.dtype != np.uint8:
            raise ValueError(f"segment wants a normalised uint8 (H, W) image, got {grey.dtype} {grey.shape}")
        from chromobatch.segment.classical import ClassicalSegmenter

        t0 = time.perf_counter()
        nuclei, width = ClassicalSegmenter().nuclei(grey)
        scale = self.scale_for(width)
        work = grey if scale == 1.0 else _resize(grey, scale)
        if scale != 1.0:
            nuclei = _resize(nuclei.astype(np.uint8) * 255, scale) >= 128
        t1 = time.perf_counter()
        probs = self.probabilities(work)
        self.last_timing = {"nuclei_and_scale": t1 - t0, "network": time.perf_counter() - t1, "factor": scale}
        return Prepared(probs=probs, nuclei=nuclei, scale=scale, shape=(int(grey.shape[0]), int(grey.shape[1])))

    def finish(self, prep: Prepared) -> list[Instance]:
        """The post-processing of `segment` (cheap: training tunes its thresholds on cached `prepare`s)."""
        t0 = time.perf_counter()
        inst = self.instances_from(prep.probs, prep.nuclei)
        if prep.scale != 1.0:
            inst = _rescale_instances(inst, prep.shape, prep.scale)
            self._flag_clusters(inst)
        self.last_timing["watershed"] = time.perf_counter() - t0
        return inst

    def segment(self, grey: np.ndarray) -> list[Instance]:
        return self.finish(self.prepare(grey))


@dataclass
class Prepared:
    probs: np.ndarray  # (2, h, w) foreground and core probabilities, at the working scale
    nuclei: np.ndarray  # bool (h, w), at the working scale
    scale: float  # working scale / original scale
    shape: tuple[int, int]  # the original image's (H, W)


def _relabel(labels: np.ndarray) -> tuple[np.ndarray, Any, Any]:
    from skimage.segmentation import relabel_sequential

    return relabel_sequential(labels.astype(np.int32))


def _drop_on_nuclei(labels: np.ndarray, nuclei: np.ndarray, share: float = 0.5) -> np.ndarray:
    """Labels with at least `share` of their pixels on a (slightly grown) nucleus set to background."""
    from scipy import ndimage as ndi

    grown = ndi.binary_dilation(nuclei, iterations=3)
    n = int(labels.max())
    if n == 0:
        return labels
    total = np.bincount(labels.ravel(), minlength=n + 1)
    on = np.bincount(labels[grown], minlength=n + 1)
    drop = (on >= share * np.maximum(total, 1))
    drop[0] = False
    if not drop.any():
        return labels
    out = np.where(drop[labels], 0, labels)
    return _relabel(out)[0]


def _merge_fragments(labels: np.ndarray, fraction: float) -> np.ndarray:
    """Regions smaller than `fraction` x the median region that touch another region are merged into the
    neighbour they share the longest border with: a chromosome whose core broke in two (at a centromere,
    a pale band) comes back whole instead of being counted twice."""
    from scipy import ndimage as ndi

    areas = np.bincount(labels.ravel())
    if len(areas) <= 2:
        return labels
    median = float(np.median(areas[1:]))
    small = [i for i in np.argsort(areas) if i > 0 and areas[i] < fraction * median]
    if not small:
        return labels
    out = labels.copy()
    slices = ndi.find_objects(labels)
    h, w = labels.shape
    for i in small:
        sl = slices[i - 1]
        if sl is None:
            continue
        ys = slice(max(0, sl[0].start - 1), min(h, sl[0].stop + 1))
        xs = slice(max(0, sl[1].start - 1), min(w, sl[1].stop + 1))
        region = out[ys, xs]
        mine = region == i
        if not mine.any():
            continue
        ring = ndi.binary_dilation(mine) & ~mine
        neighbours = region[ring]
        neighbours = neighbours[(neighbours > 0) & (neighbours != i)]
        if len(neighbours):
            region[mine] = np.bincount(neighbours).argmax()
    return out


def _split_merged(labels: np.ndarray, pcore: np.ndarray, p: dict[str, Any], width: float) -> np.ndarray:
    """Large objects that look like two or more chromosomes stuck together, split where their core map allows.

    Why: one core threshold for the whole image is a compromise; where two chromosomes touch or cross, their
    cores often still join at it, but part at a higher one. So for each object over `split_factor` x the
    median area (and forked, below `cluster_branched_below` x the median: the cluster rule's test for a
    merge), the core threshold is raised inside it (SPLIT_LEVELS) until the core breaks into two or more
    seeds of `min_seed` pixels; a watershed on the core map then cuts the object. The cut is kept only if
    every piece is at least `split_min_piece` x the median area and there are no more pieces than the object's
    estimated chromosome count (its area over `cluster_divisor` x the mean single area, at least 2), so a
    long chromosome whose core thins at the centromere is not cut into arms. What stays whole is judged by
    the cluster rule as before. An object shaped like an interphase nucleus (`objects.is_nucleus`, `width`
    the model's chromosome width) is never cut: whole, it is left out below; cut, its pieces would be counted.
    Chosen on the training split by count (`train.tune_splits`).
    """
    from scipy import ndimage as ndi
    from skimage.segmentation import watershed

    areas = np.bincount(labels.ravel())
    if len(areas) <= 2:
        return labels
    median = float(np.median(areas[1:]))
    factor = float(p["split_factor"])
    singles = areas[1:][areas[1:] <= factor * median]
    mean_single = float(singles.mean()) if singles.size else median
    levels = [t for t in SPLIT_LEVELS if t > float(p["core_threshold"])]
    branched_below = float(p.get("cluster_branched_below", 0.0))
    divisor = float(p.get("cluster_divisor", 1.0))
    min_seed = int(p["min_seed"])
    out = labels.copy()
    next_label = int(labels.max()) + 1
    for i, sl in enumerate(ndi.find_objects(labels), start=1):
        if sl is None or areas[i] <= factor * median:
            continue
        region = labels[sl] == i
        if areas[i] <= branched_below * median and not branches(region):
            continue
        if is_nucleus(region, width):
            continue
        most = max(2, int(round(areas[i] / (divisor * mean_single))))
        core = pcore[sl]
        for level in levels:
            seeds, n = ndi.label((core > level) & region)
            if n < 2:
                continue
            sizes = np.bincount(seeds.ravel())
            small = sizes < min_seed
            small[0] = False
            seeds[small[seeds]] = 0
            seeds, _, _ = _relabel(seeds)
            n = int(seeds.max())
            if n < 2:
                continue
            pieces = watershed(-core, markers=seeds, mask=region)
            if (np.bincount(pieces.ravel())[1:] < float(p["split_min_piece"]) * median).any():
                continue
            if n <= most:
                view = out[sl]
                for k in range(2, n + 1):
                    view[pieces == k] = next_label
                    next_label += 1
            break  # too many pieces at this level means more at the next: keep the object whole
    return _relabel(out)[0]


def _region_scores(labels: np.ndarray, pfg: np.ndarray, pcore: np.ndarray) -> dict[int, float]:
    """Per region: mean foreground probability times its highest core probability (an instance with a
    confident core and a clean outline scores near 1)."""
    from scipy import ndimage as ndi

    n = int(labels.max())
    if n == 0:
        return {}
    idx = np.arange(1, n + 1)
    mean_fg = ndi.mean(pfg, labels, idx)
    max_core = ndi.maximum(pcore, labels, idx)
    return {int(i): float(a * b) for i, a, b in zip(idx, mean_fg, max_core, strict=True)}


def _resize(grey: np.ndarray, scale: float) -> np.ndarray:
    from PIL import Image

    h, w = grey.shape
    size = (max(16, round(w * scale)), max(16, round(h * scale)))
    return np.asarray(Image.fromarray(grey).resize(size, Image.Resampling.BILINEAR))


def _rescale_instances(instances: list[Instance], shape: tuple[int, int], scale: float) -> list[Instance]:
    """Instances found on a resized image, mapped back onto the original pixels."""
    from PIL import Image

    out = []
    h, w = shape
    for inst in instances:
        x0, y0, x1, y1 = inst.box
        X0, Y0 = int(np.floor(x0 / scale)), int(np.floor(y0 / scale))
        X1, Y1 = min(w, int(np.ceil(x1 / scale))), min(h, int(np.ceil(y1 / scale)))
        if X1 <= X0 or Y1 <= Y0:
            continue
        m = Image.fromarray(inst.mask.astype(np.uint8) * 255).resize((X1 - X0, Y1 - Y0), Image.Resampling.BILINEAR)
        mask = np.asarray(m) >= 128
        if not mask.any():
            continue
        out.append(Instance(mask=mask, box=(X0, Y0, X1, Y1), score=inst.score, cluster=1, notes=dict(inst.notes)))
    return out


def load_segmenter_folder(folder: str | Path, threads: int | None = None) -> LearnedSegmenter:
    """Rebuild a saved segmenter; ModelError names the faulty file."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ModelError(f"{folder}: segmenter folder not found")
    meta = read_meta(folder)
    wpath = folder / WEIGHTS
    state = load_weights(folder, "segmenter")
    net = build_net(meta)
    expected = net.state_dict()
    missing = sorted(set(expected) - set(state))
    extra = sorted(set(state) - set(expected))
    wrong = sorted(k for k in set(expected) & set(state) if tuple(expected[k].shape) != tuple(state[k].shape))
    if missing or extra or wrong:
        raise ModelError(f"{wpath}: weights do not fit the U-Net {meta['channels']}: missing {missing[:3]}, "
                         f"unexpected {extra[:3]}, wrong shape {wrong[:3]}")
    net.load_state_dict({k: v.to(expected[k].dtype) for k, v in state.items()})
    version = str(meta.get("version") or sha256_file(wpath)[:12])
    return LearnedSegmenter(net, meta, name=f"unet-{'-'.join(str(c) for c in meta['channels'])}",
                            version=version, threads=threads)
