"""End to end on real Q-band metaphases: the share of chromosomes both segmented and classified right.

    .venv/bin/python benchmarks/bioimlab_metaphase_e2e.py --model models/qband [--segmenter default]
        [--data /work/data] [--split test] [--images original_2 original_7] [--labels labels.json] [--json out.json]

bioimlab-metaphase annotates every chromosome with a polygon but no class. The classification crops of
bioimlab metaphase N were cut from a spread like `original_N`, straightened for the karyogram: turned by any
angle, sometimes mirrored, contrast-stretched, and for some metaphases from another frame or magnification.
So a polygon gets its class from a crop only where a crop can be laid back onto it (`pair_crops`):

1. the crops' scale relative to the image is probed on the 6 largest crops and 12 largest polygons
   (median area ratio x 0.85 .. 1.17), then every crop is resized to it;
2. every size-compatible (crop, polygon) pair is scored by the best normalised cross-correlation of the
   crop, turned to the polygon's long axis (both ways, +-6 degrees, mirrored or not), over a window around
   the polygon (skimage.feature.match_template);
3. the Hungarian assignment (one crop per polygon) is kept where the pair's correlation is >= --min-ncc (0.9)
   and beats the polygon's best crop of another class by >= --min-margin (0.02): a crop cut from this very
   frame correlates at 0.95-1.0 (original_1: seven crops at 0.999, cut unturned), another chromosome of a
   similar size at 0.7-0.9.

The labels are cached (--labels) because the pairing costs about a minute per image. Then each image goes
through the real pipeline as a one-cell case (`process_case`: detect, segment, cut, classify with the given
model and its size prior, per-cell assignment, commit) into a fresh SQLite file, and every stored
chromosome's outline is matched to the annotated polygons at IoU >= 0.5.

Most frames are not the crops' source (another capture of the spread): there only a few crops pair by
chance-level margins. A frame with at least --source-frame-labels (10) labels is taken as the source, and
its labels are reported on their own beside the pooled figures.

Reported: annotated chromosomes, those that got a class, the share of those segmented (IoU >= 0.5) and the
share both segmented and classified right, by the image model with its size prior (Prediction.label) and
after the per-cell assignment (Prediction.assigned_label); and, as a check of the labels themselves, the
share the classifier gets right on the annotated polygons cut out directly (no segmenter).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import shutil
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from common import cpu_name  # noqa: E402

from chromobatch.config import load_settings  # noqa: E402
from chromobatch.errors import EmptyCase  # noqa: E402
from chromobatch.registry.register import load_predictor  # noqa: E402
from chromobatch.segment.base import Instance  # noqa: E402
from chromobatch.segment.metrics import read_labelme  # noqa: E402
from chromobatch.service.pipeline import process_case  # noqa: E402
from chromobatch.store import db  # noqa: E402


def full_masks(instances: list, shape: tuple[int, int]) -> list[np.ndarray]:
    return [i.full_mask(shape) for i in instances]


def polygon_mask(points: list[list[int]], shape: tuple[int, int]) -> np.ndarray:
    from skimage.draw import polygon

    out = np.zeros(shape, dtype=bool)
    pts = np.asarray(points, dtype=np.float64)
    rr, cc = polygon(pts[:, 1], pts[:, 0], shape)
    out[rr, cc] = True
    return out


def _long_axis_angle(mask: np.ndarray) -> float:
    """Counter-clockwise angle (degrees, screen coordinates) of a mask's long axis."""
    ys, xs = np.nonzero(mask)
    if xs.size < 3:
        return 0.0
    cov = np.cov(np.stack([xs - xs.mean(), ys - ys.mean()]))
    _, vecs = np.linalg.eigh(cov)
    vx, vy = vecs[:, 1]
    return math.degrees(math.atan2(-vy, vx))


class _Pairing:
    """Scores of crops laid onto the polygons of one image (see the module docstring)."""

    def __init__(self, img: np.ndarray, gt: list, crops: list[Image.Image], pad: int = 6) -> None:
        self.img, self.gt, self.raw, self.pad = img, gt, crops, pad
        self.crop_area = np.array([(np.asarray(c) > 30).sum() for c in crops], dtype=np.float64)
        self.poly_area = np.array([max(1, int((img[g.box[1]:g.box[3], g.box[0]:g.box[2]][g.mask] > 30).sum()))
                                   for g in gt], dtype=np.float64)
        self.poly_angle = [_long_axis_angle(g.mask) for g in gt]

    def scores(self, scale: float, crops: list[int], polys: list[int], deltas: tuple[int, ...]) -> np.ndarray:
        from functools import cache

        from skimage.feature import match_template

        resized = [c.resize((max(4, round(c.size[0] / scale)), max(4, round(c.size[1] / scale))),
                            Image.Resampling.BILINEAR) for c in self.raw]
        angles = [_long_axis_angle(np.asarray(c) > 30) for c in resized]
        areas = self.crop_area / scale / scale

        @cache
        def turned(j: int, mirror: bool, angle: int) -> np.ndarray:
            c = resized[j].transpose(Image.Transpose.FLIP_LEFT_RIGHT) if mirror else resized[j]
            return np.asarray(c.rotate(angle, resample=Image.Resampling.BILINEAR, expand=True, fillcolor=0),
                              dtype=np.float32)

        h, w = self.img.shape
        out = np.full((len(self.gt), len(self.raw)), -1.0)
        for i in polys:
            x0, y0, x1, y1 = self.gt[i].box
            cy, cx = (y0 + y1) / 2, (x0 + x1) / 2
            for j in crops:
                if not 0.6 < areas[j] / self.poly_area[i] < 1.6:
                    continue
                best = -1.0
                for mirror in (False, True):
                    base = self.poly_angle[i] - (-angles[j] if mirror else angles[j])
                    for turn in (0, 180):
                        for d in deltas:
                            c = turned(j, mirror, int(round(base + turn + d)) % 360)
                            ch, cw = c.shape
                            win = self.img[int(max(0, cy - ch / 2 - self.pad)):int(min(h, cy + ch / 2 + self.pad)),
                                           int(max(0, cx - cw / 2 - self.pad)):int(min(w, cx + cw / 2 + self.pad))]
                            if win.shape[0] < ch or win.shape[1] < cw or win.std() < 1:
                                continue
                            best = max(best, float(match_template(win, c).max()))
                out[i, j] = best
        return out


def pair_crops(img: np.ndarray, gt: list, crops: list[tuple[Image.Image, str]], min_ncc: float,
               min_margin: float) -> tuple[dict[int, str], dict[str, float]]:
    """Class per annotated polygon (index -> class) from the crops that can be laid back onto it."""
    from scipy.optimize import linear_sum_assignment

    if not crops or not gt:
        return {}, {}
    pairing = _Pairing(img, gt, [c for c, _ in crops])
    base = math.sqrt(float(np.median(pairing.crop_area)) / float(np.median(pairing.poly_area)))
    big_c = [int(j) for j in np.argsort(-pairing.crop_area)[:6]]
    big_g = [int(i) for i in np.argsort(-pairing.poly_area)[:12]]
    probe = {}
    for f in (0.85, 0.92, 1.0, 1.08, 1.17):
        m = pairing.scores(base * f, big_c, big_g, (-4, 0, 4))
        probe[f] = float(np.mean(m[big_g][:, big_c].max(axis=0)))
    scale = base * max(probe, key=lambda k: probe[k])
    m = pairing.scores(scale, list(range(len(crops))), list(range(len(gt))), (-6, -3, 0, 3, 6))
    rows, cols = linear_sum_assignment(-m)
    labels = [lab for _, lab in crops]
    out: dict[int, str] = {}
    kept: dict[str, list[float]] = {}
    for i, j in zip(rows, cols, strict=True):
        other = [m[i, k] for k in range(len(crops)) if labels[k] != labels[j]]
        margin = m[i, j] - max(other, default=-1.0)
        if m[i, j] >= min_ncc and margin >= min_margin:
            out[int(i)] = labels[j]
            kept[str(int(i))] = [round(float(m[i, j]), 4), round(float(margin), 4)]
    return out, {"scale": scale, "assigned_median_ncc": float(np.median(m[rows, cols])), "ncc_margin": kept}


class AnnotationSegmenter:
    """The annotated polygons as a segmenter (the pipeline's `segmenter` seam): the classifier's share on
    perfectly cut chromosomes, which checks the pairing's labels and bounds what a segmenter can reach."""

    name = "annotation"
    version = "bioimlab-metaphase"

    def __init__(self, instances: list) -> None:
        self.instances = instances

    def segment(self, grey: np.ndarray) -> list:
        return [Instance(mask=i.mask.copy(), box=i.box) for i in self.instances]


def run_case(database: db.Database, tmp: Path, name: str, image: Path, predictor: object, settings: object,
             segmenter: object | None = None) -> list[tuple[np.ndarray, str, str]]:
    """One image as a one-cell metaphase case through `process_case`; (outline mask, label, assigned) each."""
    case = tmp / "in" / name
    case.mkdir(parents=True)
    shutil.copy(image, case / "cell01.png")
    (case / "input.txt").write_text("metaphase\n")
    try:
        process_case(database, case, predictor=predictor, settings=settings, segmenter=segmenter)  # type: ignore[arg-type]
    except EmptyCase as exc:  # refused as a whole (e.g. a frame with too few chromosomes): nothing segmented
        print(f"{name}: {exc}", flush=True)
        return []
    with database.session() as s:
        got = s.query(db.Chromosome.polygon, db.Prediction.label, db.Prediction.assigned_label).join(
            db.Prediction, db.Prediction.chromosome_id == db.Chromosome.id).join(
            db.Case, db.Case.id == db.Chromosome.case_pk).filter(db.Case.case_id == case.name).all()
    shape = np.asarray(Image.open(image)).shape[:2]
    return [(polygon_mask(p, shape), lab, asg) for p, lab, asg in got if p and len(p) >= 3]


def score(truth: dict[int, str], gt: list[np.ndarray], pred: list[tuple[np.ndarray, str, str]]) -> dict[str, int]:
    """Labelled polygons segmented (IoU >= 0.5 with one stored outline) and classified right."""
    seg = right_m = right_a = 0
    used: set[int] = set()
    for k, label in truth.items():
        g = gt[k]
        best, best_iou = -1, 0.0
        for j, (m, _lab, _asg) in enumerate(pred):
            if j in used:
                continue
            inter = float((m & g).sum())
            if inter == 0:
                continue
            iou = inter / float((m | g).sum())
            if iou > best_iou:
                best, best_iou = j, iou
        if best >= 0 and best_iou >= 0.5:
            used.add(best)
            seg += 1
            right_m += pred[best][1] == label
            right_a += pred[best][2] == label
    return {"segmented": seg, "right_model": right_m, "right_assigned": right_a}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, required=True, help="the Q-band classifier folder")
    ap.add_argument("--segmenter", default="default")
    ap.add_argument("--data", type=Path, default=Path("/work/data"))
    ap.add_argument("--split", default="test")
    ap.add_argument("--min-ncc", type=float, default=0.9)
    ap.add_argument("--min-margin", type=float, default=0.02)
    ap.add_argument("--labels", type=Path, help="cache of the pairing's labels (read if there, else written)")
    ap.add_argument("--labels-only", action="store_true", help="pair crops and polygons, write --labels, stop")
    ap.add_argument("--source-frame-labels", type=int, default=10,
                    help="a frame with at least this many labels is the crops' source; elsewhere a label is "
                         "reported apart (a lone pairing in a frame the crops were not cut from can be chance)")
    ap.add_argument("--limit", type=int)
    ap.add_argument("--images", nargs="+", help="only these images of the split (e.g. the crops' source frames)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    meta_root, crop_root = args.data / "bioimlab-metaphase", args.data / "bioimlab"
    rows = [r for r in csv.DictReader((meta_root / "manifest.csv").open()) if r["split"] == args.split]
    rows = [r for r in rows if not args.images or Path(r["image"]).stem in args.images]
    rows = rows[:args.limit] if args.limit else rows
    crops_by_cell: dict[str, list[dict[str, str]]] = {}
    for r in csv.DictReader((crop_root / "manifest.csv").open()):
        crops_by_cell.setdefault(r["cell"], []).append(r)
    cache: dict[str, dict] = {}
    if args.labels and args.labels.is_file():
        cache = json.loads(args.labels.read_text())
    t0 = time.perf_counter()
    for r in rows:  # the pairing: a class per polygon where a crop lays back onto it
        name = Path(r["image"]).stem
        if name in cache:
            continue
        img = np.asarray(Image.open(meta_root / r["image"]).convert("L"), dtype=np.float32)
        gt_inst = read_labelme(meta_root / r["annotation"], img.shape)
        crops = [(Image.open(crop_root / c["path"]).convert("L"), c["label"])
                 for c in crops_by_cell.get(r["classification_cell"], [])]
        t1 = time.perf_counter()
        truth, info = pair_crops(img, gt_inst, crops, args.min_ncc, args.min_margin)
        cache[name] = {"labels": {str(k): v for k, v in truth.items()}, "annotated": len(gt_inst),
                       "crops": len(crops), **info, "seconds": time.perf_counter() - t1}
        print(name, {k: v for k, v in cache[name].items() if k != "labels"}, "labelled", len(truth), flush=True)
        if args.labels:
            args.labels.write_text(json.dumps(cache, indent=1))
    if args.labels_only:
        return
    settings = load_settings({"model": str(args.model), "device": "cpu", "segmenter": args.segmenter})
    totals = dict(images=0, annotated=0, with_class=0, segmented=0, right_model=0, right_assigned=0,
                  direct_right_model=0, direct_right_assigned=0)
    per_image = []
    with tempfile.TemporaryDirectory(prefix="cb-bioimlab-e2e-") as tmp:
        database = db.connect(Path(tmp) / "e2e.sqlite")
        predictor = load_predictor(database, settings)
        for r in rows:
            name = Path(r["image"]).stem
            shape = np.asarray(Image.open(meta_root / r["image"])).shape[:2]
            gt_inst = read_labelme(meta_root / r["annotation"], shape)
            gt = full_masks(gt_inst, shape)
            truth = {int(k): v for k, v in cache[name]["labels"].items()}
            pred = run_case(database, Path(tmp), f"E2E-{name}", meta_root / r["image"], predictor, settings)
            got = score(truth, gt, pred)
            direct = score(truth, gt, run_case(database, Path(tmp), f"E2E-GT-{name}", meta_root / r["image"],
                                               predictor, settings, AnnotationSegmenter(gt_inst)))
            row = {"image": name, "annotated": len(gt), "with_class": len(truth), **got,
                   "direct_segmented": direct["segmented"], "direct_right_model": direct["right_model"],
                   "direct_right_assigned": direct["right_assigned"]}
            per_image.append(row)
            for key in totals:
                totals[key] += 1 if key == "images" else row[key]
            print(row, flush=True)
        database.dispose()
    n = max(1, totals["with_class"])
    source = [r for r in per_image if r["with_class"] >= args.source_frame_labels]
    ns = max(1, sum(r["with_class"] for r in source))
    source_frames = {"images": [r["image"] for r in source], "with_class": sum(r["with_class"] for r in source),
                     **{f"share_{k}": sum(r[k] for r in source) / ns
                        for k in ("segmented", "right_model", "right_assigned", "direct_right_model",
                                  "direct_right_assigned")}}
    out = {"date": datetime.now(UTC).isoformat(timespec="minutes"), "cpu": cpu_name(), "model": str(args.model),
           "segmenter": args.segmenter, "split": args.split, "min_ncc": args.min_ncc,
           "min_margin": args.min_margin, "seconds": time.perf_counter() - t0, **totals,
           "share_segmented": totals["segmented"] / n,
           "share_segmented_and_right_model": totals["right_model"] / n,
           "share_segmented_and_right_assigned": totals["right_assigned"] / n,
           "direct_share_right_model": totals["direct_right_model"] / n,
           "direct_share_right_assigned": totals["direct_right_assigned"] / n,
           "source_frames": source_frames, "per_image": per_image}
    print(json.dumps({k: v for k, v in out.items() if k != "per_image"}, indent=2))
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
