"""Training the learned segmenter on annotated metaphases (bioimlab-metaphase's train split, optionally
with synthetic G-band spreads), choosing on the validation split.

Why random crops: the CPU is shared, so each step sees a small batch of 256 x 256 crops (most centred on
the spread) with flips, 90-degree turns, a random scale, gamma, contrast, blur, noise and an uneven
background; full images are only used for validation, where the whole pipeline (network + watershed +
cluster flags) is scored by instance F1 at IoU 0.5 and count error. The best validation model is written
as a segmenter folder after each validation (atomically), so an interrupted run leaves a usable model.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn import functional as F

from chromobatch.errors import DataError
from chromobatch.files import atomic_write
from chromobatch.segment.base import Instance
from chromobatch.segment.data import Annotated, load_set
from chromobatch.segment.learned import (
    POSTPROCESS,
    LearnedSegmenter,
    Prepared,
    read_meta,
    save_segmenter,
    update_meta,
)
from chromobatch.segment.metrics import SetScore, score_image
from chromobatch.segment.unet import UNet

log = logging.getLogger(__name__)

#: A core pixel lies at least this far (px) from the background and from any other chromosome.
CORE_MARGIN = 2


@dataclass
class SegTrainConfig:
    steps: int = 3000
    batch_size: int = 4
    crop: int = 256
    lr: float = 2e-3
    weight_decay: float = 1e-4
    channels: tuple[int, ...] = (8, 16, 32, 64)
    val_every: int = 250
    threads: int = 1
    seed: int = 0
    time_budget_min: float | None = None
    synth_dir: str | None = None
    synth_weight: float = 0.3
    scale_range: tuple[float, float] = (0.75, 1.35)
    #: warm start: a segmenter folder whose U-Net (its channels, not `channels`) the run continues from,
    #: with a fresh optimiser and schedule; None = random init
    init_from: str | None = None
    #: with `init_from`: build the U-Net at `channels` (deeper levels added) and copy the levels it shares
    #: with the start (`grow_unet`), instead of continuing the start's own U-Net
    grow: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


def grow_unet(small: UNet, channels: tuple[int, ...],
              sample: torch.Tensor | None = None) -> tuple[UNet, int]:
    """A deeper U-Net whose first levels are `small`'s: same widths up to `len(small.channels)`, new levels
    below. The encoder levels, the decoder levels at the shared resolutions and the head keep `small`'s
    weights; the new deepest encoder level and the decoder level that comes up from it start at random.
    Why: a 5th level doubles the context the network sees (telling touching chromosomes apart needs it)
    for about a quarter more compute, and starting from the trained 4 levels saves hours of CPU training."""
    old = list(small.channels)
    new = list(channels)
    if new[: len(old)] != old or len(new) <= len(old):
        raise DataError(f"cannot grow a U-Net {old} into {new}: the new widths must start with the old ones")
    big = UNet(tuple(new))
    shift = len(new) - len(old)  # decoder blocks are listed deepest first: the old up.i is the new up.(i+shift)
    src = small.state_dict()
    state = big.state_dict()
    copied = 0
    for key, value in state.items():
        parts = key.split(".")
        if parts[0] == "up":
            parts[1] = str(int(parts[1]) - shift)
        okey = ".".join(parts)
        if okey in src and tuple(src[okey].shape) == tuple(value.shape):
            state[key] = src[okey].clone()
            copied += 1
    big.load_state_dict(state)
    if sample is not None and shift == 1:
        _pass_through(big, sample)
    return big, copied


@torch.no_grad()
def _pass_through(big: UNet, sample: torch.Tensor) -> None:
    """Start the new decoder block as (nearly) a pass-through of its skip input, so the grown network begins
    where the small one was instead of at noise: identity 3x3 convolutions on the skip channels, the deep
    channels at a small random weight (so gradients reach the new level), and BatchNorms set to give back
    the skip features' own mean and spread (measured on `sample`, a batch of training crops)."""
    block = big.up[0]
    assert isinstance(block, torch.nn.Sequential)
    deep = big.channels[-1]
    width = big.channels[-2]
    conv1, conv2 = block[0], block[3]
    bn1, bn2 = block[1], block[4]
    assert isinstance(conv1, torch.nn.Conv2d) and isinstance(conv2, torch.nn.Conv2d)
    assert isinstance(bn1, torch.nn.BatchNorm2d) and isinstance(bn2, torch.nn.BatchNorm2d)
    feats = sample
    big.down.eval()
    for i, down in enumerate(big.down[:-1]):  # the skip input: the output of the level above the new one
        feats = down(feats if i == 0 else F.max_pool2d(feats, 2))
    mean = feats.mean(dim=(0, 2, 3))
    var = feats.var(dim=(0, 2, 3)) + 1e-3
    eye = torch.zeros(width, width, 3, 3)
    eye[range(width), range(width), 1, 1] = 1.0
    conv1.weight.mul_(0.1)
    conv1.weight[:, deep:] = eye
    conv2.weight.copy_(eye)
    for bn in (bn1, bn2):
        bn.weight.copy_(var.sqrt())
        bn.bias.copy_(mean)
        assert bn.running_mean is not None and bn.running_var is not None
        bn.running_mean.copy_(mean)
        bn.running_var.copy_(var)


def targets(shape: tuple[int, int], instances: list[Instance], margin: int = CORE_MARGIN) -> np.ndarray:
    """(2, H, W) uint8: foreground (any chromosome) and cores (inside one chromosome only, `margin` px in)."""
    from scipy import ndimage as ndi

    fg = np.zeros(shape, dtype=bool)
    count = np.zeros(shape, dtype=np.uint8)
    for inst in instances:
        x0, y0, x1, y1 = inst.box
        fg[y0:y1, x0:x1] |= inst.mask
        count[y0:y1, x0:x1] += inst.mask.astype(np.uint8)
    core = np.zeros(shape, dtype=bool)
    structure = ndi.generate_binary_structure(2, 1)
    for inst in instances:
        x0, y0, x1, y1 = inst.box
        padded = np.pad(inst.mask, margin)
        eroded = ndi.binary_erosion(padded, structure, iterations=margin)[margin:-margin, margin:-margin]
        core[y0:y1, x0:x1] |= eroded & (count[y0:y1, x0:x1] == 1)
    return np.stack([fg, core]).astype(np.uint8)


class CropSampler:
    """Random augmented crops of annotated images (image, targets) as float tensors."""

    def __init__(self, items: list[Annotated], cfg: SegTrainConfig, rng: np.random.Generator,
                 weights: np.ndarray | None = None) -> None:
        if not items:
            raise DataError("no annotated images to train on")
        self.items = items
        self.targets = [targets(a.grey.shape, a.instances) for a in items]
        self.cfg = cfg
        self.rng = rng
        w = np.ones(len(items)) if weights is None else np.asarray(weights, dtype=np.float64)
        self.p = w / w.sum()

    def sample(self) -> tuple[np.ndarray, np.ndarray]:
        from PIL import Image

        cfg, rng = self.cfg, self.rng
        k = int(rng.choice(len(self.items), p=self.p))
        grey, tgt = self.items[k].grey, self.targets[k]
        h, w = grey.shape
        scale = float(np.exp(rng.uniform(np.log(cfg.scale_range[0]), np.log(cfg.scale_range[1]))))
        side = min(int(round(cfg.crop / scale)), h, w)
        if rng.random() < 0.85 and tgt[0].any():
            ys, xs = np.nonzero(tgt[0])
            i = int(rng.integers(len(ys)))
            cy, cx = int(ys[i]), int(xs[i])
        else:
            cy, cx = int(rng.integers(h)), int(rng.integers(w))
        y0 = int(np.clip(cy - side // 2, 0, h - side))
        x0 = int(np.clip(cx - side // 2, 0, w - side))
        img = grey[y0 : y0 + side, x0 : x0 + side]
        t = tgt[:, y0 : y0 + side, x0 : x0 + side]
        if side != cfg.crop:
            img = np.asarray(Image.fromarray(img).resize((cfg.crop, cfg.crop), Image.Resampling.BILINEAR))
            t = np.stack([np.asarray(Image.fromarray(c * 255).resize((cfg.crop, cfg.crop),
                                                                      Image.Resampling.BILINEAR)) >= 128
                          for c in t]).astype(np.uint8)
        kr = int(rng.integers(4))
        img, t = np.rot90(img, kr), np.rot90(t, kr, axes=(1, 2))
        if rng.random() < 0.5:
            img, t = img[:, ::-1], t[:, :, ::-1]
        return _photometric(img.astype(np.float32) / 255.0, rng), np.ascontiguousarray(t)

    def batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        xs, ts = zip(*(self.sample() for _ in range(self.cfg.batch_size)), strict=True)
        x = torch.from_numpy(np.stack(xs)[:, None])
        return (x - 0.5) / 0.25, torch.from_numpy(np.stack(ts)).float()


def _photometric(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Gamma, contrast, background level and slope, blur and noise: microscopes and cameras differ."""
    from scipy import ndimage as ndi

    img = np.clip(img, 0, 1) ** float(np.exp(rng.uniform(-0.5, 0.5)))
    bg = float(np.median(img))
    img = bg + (img - bg) * float(rng.uniform(0.6, 1.3))
    h, w = img.shape
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    img = img + rng.uniform(-0.1, 0.1) + rng.uniform(-0.1, 0.1) * yy + rng.uniform(-0.1, 0.1) * xx
    if rng.random() < 0.3:
        img = ndi.gaussian_filter(img, float(rng.uniform(0.5, 1.5)))
    if rng.random() < 0.5:
        img = img + rng.normal(0, rng.uniform(0.005, 0.04), img.shape)
    return np.clip(img, 0, 1).astype(np.float32)


def reference_width(items: list[Annotated]) -> float | None:
    """The chromosome width the network is trained at, measured the way `LearnedSegmenter.segment`
    measures a new image (the classical foreground, not the annotation, whose outlines are drawn wider),
    so that an image like the training ones is left at its scale."""
    from chromobatch.segment.classical import ClassicalSegmenter

    classical = ClassicalSegmenter()
    widths = [w for w in (classical.nuclei(a.grey)[1] for a in items) if w]
    return float(np.median(widths)) if widths else None


def loss_fn(logits: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """BCE + soft Dice on both maps (Dice keeps the thin cores from being swamped by background)."""
    bce = F.binary_cross_entropy_with_logits(logits, t)
    p = torch.sigmoid(logits)
    inter = (p * t).sum(dim=(0, 2, 3))
    dice = 1 - (2 * inter + 1) / (p.sum(dim=(0, 2, 3)) + t.sum(dim=(0, 2, 3)) + 1)
    return bce + dice.mean()


def evaluate(seg: LearnedSegmenter, items: list[Annotated],
             prepared: list[Prepared] | None = None) -> SetScore:
    """The whole segmenter on full images (the network's part may be passed in, cached)."""
    scores = []
    for i, a in enumerate(items):
        inst = seg.finish(prepared[i]) if prepared is not None else seg.segment(a.grey)
        scores.append(score_image(inst, a.instances, a.name))
    return SetScore(scores)


def tune_postprocess(seg: LearnedSegmenter, items: list[Annotated]) -> dict[str, Any]:
    """Choose the thresholds on validation images (network run once), one at a time (core threshold, seed
    size, foreground threshold, fragment merging, smallest object): by F1, then count error. The cluster
    rule is chosen apart, on the training images (`tune_clusters`)."""
    prepared = [seg.prepare(a.grey) for a in items]
    grid: dict[str, tuple[float, ...]] = {"core_threshold": (0.3, 0.4, 0.5, 0.6, 0.7), "min_seed": (3, 6, 12),
                                          "fg_threshold": (0.4, 0.5, 0.6), "merge_small": (0.0, 0.2, 0.35),
                                          "min_area": (25, 50, 80)}
    chosen = dict(seg.post)
    for key, values in grid.items():
        best: tuple[float, float] | None = None
        for v in values:
            seg.post = {**chosen, key: v}
            s = evaluate(seg, items, prepared)
            rank = (s.f1, -s.mean_abs_count_error)
            if best is None or rank > best:
                best, pick = rank, v
        chosen[key] = pick
    seg.post = chosen
    return chosen


#: not under 2.5: the largest single chromosome is about twice the median one, and up to 2.45x in clean
#: synthetic G-band spreads (tests/service/test_metaphase_cases.py counts them exactly), though on bioimlab's
#: Q-band training images objects of 2.2-2.5x already hold two chromosomes more often than one
CLUSTER_FACTORS = (2.5, 3.0)
CLUSTER_DIVISORS = (1.0, 1.5, 2.0)
#: objects between the cluster factor and this many times the median area are clusters only when branched
CLUSTER_BRANCHED_BELOW = 3.0


def tune_clusters(seg: LearnedSegmenter, items: list[Annotated], prepared: list[Prepared] | None = None
                  ) -> dict[str, Any]:
    """Choose when an object is flagged as a cluster and how its size is estimated (`objects.flag_clusters`):
    the pair with the smallest mean count error on `items`, the larger factor (fewer flags) on a tie.

    Why apart from the thresholds and on the training images: the rule changes the count, not the instances
    (F1 is the same for every pair), and a count rule learnt from the few merged objects of a validation
    split of about twenty images follows chance (bioimlab-metaphase: 22 validation images, 827 objects; the
    107 training images hold 4,440)."""
    prepared = prepared if prepared is not None else [seg.prepare(a.grey) for a in items]
    best: tuple[float, float] | None = None
    chosen = dict(seg.post)
    for factor in CLUSTER_FACTORS:
        for divisor in CLUSTER_DIVISORS:
            seg.post = {**chosen, "cluster_factor": factor, "cluster_divisor": divisor,
                        "cluster_branched_below": CLUSTER_BRANCHED_BELOW}
            rank = (-round(evaluate(seg, items, prepared).mean_abs_count_error, 6), factor)
            if best is None or rank > best:
                best, pick = rank, (factor, divisor)
    chosen["cluster_factor"], chosen["cluster_divisor"] = pick
    chosen["cluster_branched_below"] = CLUSTER_BRANCHED_BELOW
    seg.post = chosen
    return chosen


#: `_split_merged` settings tried by `tune_splits` (0 = no splitting)
SPLIT_FACTORS = (0.0, 1.8, 2.2, 2.5)
SPLIT_MIN_PIECES = (0.4, 0.55)


def tune_splits(seg: LearnedSegmenter, items: list[Annotated], prepared: list[Prepared] | None = None
                ) -> dict[str, Any]:
    """Choose when a large object is split at a higher core threshold (`learned._split_merged`): the pair
    with the smallest mean count error on `items`, then the most exact counts; on a tie, no splitting or the
    larger factor (fewer cuts).

    Why by count on the training images, like the cluster rule: a split adds instances, so F1 follows it too,
    but the count is where a wrong cut shows (a chromosome cut into arms counts twice), and merged objects
    are too few on the validation split to choose from (about twenty; the training split holds ~250)."""
    prepared = prepared if prepared is not None else [seg.prepare(a.grey) for a in items]
    best: tuple[float, ...] | None = None
    chosen = dict(seg.post)
    for factor in SPLIT_FACTORS:
        for piece in SPLIT_MIN_PIECES if factor > 0 else SPLIT_MIN_PIECES[:1]:
            seg.post = {**chosen, "split_factor": factor, "split_min_piece": piece}
            s = evaluate(seg, items, prepared)
            log.info("split factor %s, smallest piece %s: %s", factor, piece, json.dumps(s.summary()))
            rank = (-round(s.mean_abs_count_error, 6), round(s.exact_count, 6), factor == 0, factor, piece)
            if best is None or rank > best:
                best, pick = rank, (factor, piece)
    chosen["split_factor"], chosen["split_min_piece"] = pick
    seg.post = chosen
    return chosen


def train_segmenter(data: Path, out: Path, cfg: SegTrainConfig,
                    progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Train, validate every `val_every` steps, keep the best model in `out`; returns the training record."""
    say = progress or log.info
    torch.manual_seed(cfg.seed)
    torch.set_num_threads(max(1, cfg.threads))
    rng = np.random.default_rng(cfg.seed)
    train = load_set(Path(data), "train")
    val = load_set(Path(data), "val")
    if not train or not val:
        raise DataError(f"{data}: needs images in both the train and the val split (manifest.csv split)")
    weights = np.ones(len(train))
    synth: list[Annotated] = []
    if cfg.synth_dir:
        synth = load_set(Path(cfg.synth_dir))
        if synth:
            share = cfg.synth_weight / (1 - cfg.synth_weight)
            weights = np.concatenate([weights, np.full(len(synth), share * len(train) / len(synth))])
    sampler = CropSampler(train + synth, cfg, rng, weights)
    ref_width = reference_width(train)
    init: dict[str, Any] | None = None
    if cfg.init_from:
        from chromobatch.segment.learned import load_segmenter_folder

        start = load_segmenter_folder(cfg.init_from, threads=cfg.threads)
        net = start.net
        init = {"folder": str(cfg.init_from), "version": start.version,
                "best_step": (start.meta.get("training") or {}).get("best_step")}
        if cfg.grow and tuple(cfg.channels) != tuple(net.channels):
            net, copied = grow_unet(net, cfg.channels, sample=sampler.batch()[0])
            init["grown_from"] = list(start.net.channels)
            init["tensors_copied"] = copied
            say(f"grew {start.net.channels} -> {list(cfg.channels)}: {copied} tensors copied, the rest new")
        say(f"warm start from {cfg.init_from} ({start.name} {start.version})")
    else:
        net = UNet(cfg.channels)
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    warm = min(200, cfg.steps // 10)
    t0 = time.monotonic()

    def lr_at(step: int) -> float:
        """Warm-up, then cosine over the run: its steps, or its time budget when that ends it first."""
        if step < warm:
            return cfg.lr * (step + 1) / warm
        done = (step - warm) / max(1, cfg.steps - warm)
        if cfg.time_budget_min:
            done = max(done, (time.monotonic() - t0) / (cfg.time_budget_min * 60))
        return cfg.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, done)))

    # A warm start is validated with its start's tuned thresholds: the defaults suit an untrained network and
    # would rank checkpoints by how many specks they let through rather than by how well they split.
    post = dict(POSTPROCESS)
    if cfg.init_from:
        post.update(start.meta.get("postprocess") or {})
    meta: dict[str, Any] = {"stroke_width": ref_width, "postprocess": post,
                            "training": {"config": _jsonable(asdict(cfg)), "data": str(data),
                                         "train_images": len(train), "synth_images": len(synth),
                                         "val_images": len(val), "val_postprocess": dict(post),
                                         **({"init_from": init} if init else {})}}
    history: list[dict[str, Any]] = []
    best: tuple[float, float] | None = None
    running = 0.0
    step = 0
    for step in range(cfg.steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        net.train()
        x, t = sampler.batch()
        loss = loss_fn(net(x), t)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        lv = float(loss.detach())
        running = 0.98 * running + 0.02 * lv if step else lv
        out_of_time = cfg.time_budget_min is not None and time.monotonic() - t0 > cfg.time_budget_min * 60
        last = step == cfg.steps - 1 or out_of_time
        if (step + 1) % cfg.val_every == 0 or last:
            net.eval()
            seg = LearnedSegmenter(net, meta)
            s = evaluate(seg, val)
            rec = {"step": step + 1, "loss": round(running, 4), "minutes": round((time.monotonic() - t0) / 60, 2),
                   **{k: round(v, 4) if isinstance(v, float) else v for k, v in s.summary().items()}}
            history.append(rec)
            say(json.dumps(rec))
            key = (s.f1, -s.mean_abs_count_error)
            if best is None or key > best:
                best = key
                meta["training"].update({"best_step": step + 1, "val": s.summary(),
                                         "wall_minutes": rec["minutes"]})
                save_segmenter(net, meta, out)
            atomic_write(Path(out) / "history.json", json.dumps(history, indent=1) + "\n")
        if out_of_time:
            say(f"time budget of {cfg.time_budget_min} min reached at step {step + 1}")
            break
    meta["training"]["steps_run"] = step + 1
    meta["training"]["total_minutes"] = round((time.monotonic() - t0) / 60, 2)
    result = retune(out, val, threads=cfg.threads, progress=say, clusters_on=train)
    update_meta(out, {"training": {**read_meta(out)["training"], "steps_run": step + 1,
                                   "total_minutes": meta["training"]["total_minutes"]}})
    return {"history": history, **result}


def retune(folder: Path, val: list[Annotated], threads: int = 1, train: list[Annotated] | None = None,
           progress: Callable[[str], None] | None = None, *, clusters_on: list[Annotated] | None = None
           ) -> dict[str, Any]:
    """Tune a saved segmenter's post-processing on validation images and write it to its model.json
    (with `train`, the reference chromosome width is measured again first, the way inference measures;
    with `clusters_on`, the cluster rule and then the splitting of merged objects are chosen on those images,
    the training split: `tune_clusters`, `tune_splits`)."""
    from chromobatch.segment.learned import load_segmenter_folder

    say = progress or log.info
    if train is not None:
        update_meta(folder, {"stroke_width": reference_width(train)})
    seg = load_segmenter_folder(folder, threads=threads)
    if clusters_on:  # chosen again below, after the thresholds and the cluster rule, as when it was first chosen
        seg.post = {**seg.post, "split_factor": 0.0}
    chosen = tune_postprocess(seg, val)
    if clusters_on:
        prepared = [seg.prepare(a.grey) for a in clusters_on]
        chosen = tune_clusters(seg, clusters_on, prepared)
        chosen = tune_splits(seg, clusters_on, prepared)
    s = evaluate(seg, val)
    meta = read_meta(folder)
    update_meta(folder, {"postprocess": chosen, "training": {**meta.get("training", {}), "val_tuned": s.summary()}})
    say(f"post-processing tuned on val: {chosen} -> {json.dumps(s.summary())}")
    return {"postprocess": chosen, "val": s.summary()}


def _jsonable(d: dict[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(d, default=list))
