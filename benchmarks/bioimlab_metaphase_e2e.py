"""End to end on real Q-band metaphases: the share of chromosomes both segmented and classified right.

    .venv/bin/python benchmarks/bioimlab_metaphase_e2e.py --model models/qband [--segmenter default]
        [--data /work/data] [--split test] [--json out.json]

bioimlab-metaphase annotates every chromosome with a polygon but no class. The classification crops of
bioimlab metaphase N were cut from the same spread as `original_N`, so each crop is located in the image
by normalised cross-correlation (skimage.feature.match_template) and gives its class to the annotated
polygon its bright pixels cover most (one crop per polygon, best correlation first). Then each image goes
through the real pipeline as a one-cell case (`process_case`: detect, segment, cut, classify with the given
model and its size prior, per-cell assignment, commit) into a fresh SQLite file, and every stored
chromosome's outline is matched to the annotated polygons at IoU >= 0.5.

Reported: crops located (correlation >= --min-ncc, 0.8 by default: on this data the best match of a crop
reaches 0.85-0.92, not 1, at the best of the scales 0.7-1.0, so the crops were not cut from these exact
frames at this scale), annotated chromosomes with a class, the share of those
segmented (IoU >= 0.5) and the share both segmented and classified right, by the image model alone
(Prediction.label) and after the per-cell assignment (Prediction.assigned_label).
"""

from __future__ import annotations

import argparse
import csv
import json
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
from chromobatch.registry.register import load_predictor  # noqa: E402
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


def ncc_map(img: np.ndarray, crop: np.ndarray) -> np.ndarray:
    """Normalised cross-correlation of crop over img; windows of flat (black) background are set to -1,
    where match_template's denominator vanishes and gives values above 1."""
    from scipy import ndimage
    from skimage.feature import match_template

    res = match_template(img, crop)
    h, w = crop.shape
    mean = ndimage.uniform_filter(img, (h, w))
    sq = ndimage.uniform_filter(img * img, (h, w))
    sd = np.sqrt(np.clip(sq - mean * mean, 0, None))[h // 2:h // 2 + res.shape[0], w // 2:w // 2 + res.shape[1]]
    res[sd < 3.0] = -1.0
    return res


def classes_by_template(img: np.ndarray, crops: list[tuple[np.ndarray, str]], gt: list[np.ndarray],
                        min_ncc: float, scales: tuple[float, ...] = (0.7, 0.8, 0.9, 1.0)
                        ) -> tuple[dict[int, str], list[float]]:
    """Locate each crop (at the best of a few scales: the crops are not always at the image's scale); give
    its class to the polygon its bright pixels cover most; one crop per polygon, best correlation first."""
    from skimage.filters import threshold_otsu

    found = []
    nccs = []
    for crop0, label in crops:
        best = (-1.0, 0, 0, crop0)
        for sc in scales:
            h, w = max(4, round(crop0.shape[0] * sc)), max(4, round(crop0.shape[1] * sc))
            if h >= img.shape[0] or w >= img.shape[1]:
                continue
            crop = np.asarray(Image.fromarray(crop0).resize((w, h), Image.Resampling.BILINEAR), dtype=np.float32)
            res = ncc_map(img, crop)
            y, x = np.unravel_index(int(np.argmax(res)), res.shape)
            if res[y, x] > best[0]:
                best = (float(res[y, x]), int(y), int(x), crop)
        ncc, y, x, crop = best
        nccs.append(ncc)
        if ncc < min_ncc:
            continue
        fg = crop > max(20.0, float(threshold_otsu(crop)))
        placed = np.zeros(img.shape, dtype=bool)
        placed[y:y + crop.shape[0], x:x + crop.shape[1]] = fg
        cover = [float((placed & g).sum()) / max(1.0, float(g.sum())) for g in gt]
        k = int(np.argmax(cover)) if cover else -1
        if k >= 0 and cover[k] >= 0.5:
            found.append((ncc, k, label))
    out: dict[int, str] = {}
    for _ncc, k, label in sorted(found, reverse=True):
        out.setdefault(k, label)
    return out, nccs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, required=True, help="the Q-band classifier folder")
    ap.add_argument("--segmenter", default="default")
    ap.add_argument("--data", type=Path, default=Path("/work/data"))
    ap.add_argument("--split", default="test")
    ap.add_argument("--min-ncc", type=float, default=0.8)
    ap.add_argument("--limit", type=int)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    meta_root, crop_root = args.data / "bioimlab-metaphase", args.data / "bioimlab"
    rows = [r for r in csv.DictReader((meta_root / "manifest.csv").open()) if r["split"] == args.split]
    rows = rows[:args.limit] if args.limit else rows
    crops_by_cell: dict[str, list[dict[str, str]]] = {}
    for r in csv.DictReader((crop_root / "manifest.csv").open()):
        crops_by_cell.setdefault(r["cell"], []).append(r)
    settings = load_settings({"model": str(args.model), "device": "cpu", "segmenter": args.segmenter})
    totals = dict(images=0, annotated=0, with_class=0, crops=0, located=0, segmented=0, right_model=0,
                  right_assigned=0)
    per_image = []
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="cb-bioimlab-e2e-") as tmp:
        database = db.connect(Path(tmp) / "e2e.sqlite")
        predictor = load_predictor(database, settings)
        for r in rows:
            name = Path(r["image"]).stem
            img = np.asarray(Image.open(meta_root / r["image"]).convert("L"), dtype=np.float32)
            gt_inst = read_labelme(meta_root / r["annotation"], img.shape)
            gt = full_masks(gt_inst, img.shape)
            crops = [(np.asarray(Image.open(crop_root / c["path"]).convert("L"), dtype=np.float32), c["label"])
                     for c in crops_by_cell.get(r["classification_cell"], [])]
            truth, nccs = classes_by_template(img, crops, gt, args.min_ncc)
            case = Path(tmp) / "in" / f"E2E-{name}"
            case.mkdir(parents=True)
            shutil.copy(meta_root / r["image"], case / "cell01.png")
            (case / "input.txt").write_text("metaphase\n")
            process_case(database, case, predictor=predictor, settings=settings)
            with database.session() as s:
                got = s.query(db.Chromosome.polygon, db.Prediction.label, db.Prediction.assigned_label).join(
                    db.Prediction, db.Prediction.chromosome_id == db.Chromosome.id).join(
                    db.Case, db.Case.id == db.Chromosome.case_pk).filter(db.Case.case_id == case.name).all()
            pred = [(polygon_mask(p, img.shape), lab, asg) for p, lab, asg in got if p and len(p) >= 3]
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
            located = sum(1 for n in nccs if n == n and n >= args.min_ncc)
            per_image.append({"image": name, "annotated": len(gt), "crops": len(crops), "located": located,
                              "with_class": len(truth), "segmented": seg, "right_model": right_m,
                              "right_assigned": right_a, "median_ncc": float(np.nanmedian(nccs)) if nccs else None})
            for key, val in (("images", 1), ("annotated", len(gt)), ("with_class", len(truth)),
                             ("crops", len(crops)), ("located", located), ("segmented", seg),
                             ("right_model", right_m), ("right_assigned", right_a)):
                totals[key] += val
            print(per_image[-1], flush=True)
        database.dispose()
    n = max(1, totals["with_class"])
    out = {"date": datetime.now(UTC).isoformat(timespec="minutes"), "cpu": cpu_name(), "model": str(args.model),
           "segmenter": args.segmenter, "split": args.split, "seconds": time.perf_counter() - t0, **totals,
           "share_segmented": totals["segmented"] / n, "share_segmented_and_right_model": totals["right_model"] / n,
           "share_segmented_and_right_assigned": totals["right_assigned"] / n, "per_image": per_image}
    print(json.dumps({k: v for k, v in out.items() if k != "per_image"}, indent=2))
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
