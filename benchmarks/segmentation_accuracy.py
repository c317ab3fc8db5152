"""Segmenters on the real bioimlab-metaphase split: instance F1 / AP at IoU 0.5, count error, time per image,
the learned one and the classical baseline side by side in one run; and the figures for docs.

    nice .venv/bin/python benchmarks/segmentation_accuracy.py --data /work/data/bioimlab-metaphase \
        [--split test] [--model models/segmenter] [--threads 1 2] [--json out.json] [--figures docs/img]

Every image of the split (768 x 576) goes through `segment` (the whole segmenter: for the learned one the
width estimate, network, watershed and cluster flags) and is scored against its labelme polygons
(`segment.metrics`). Time per image is `segment` alone (decoding excluded), median over the split after a
warm-up image, for each thread count asked for, as wall-clock and as CPU seconds of the process (on a
shared, loaded machine the wall clock measures the neighbours too; with one thread CPU seconds are what
an idle core would take, roughly). The figures: the test image nearest the median F1 with
predicted outlines (green: matched a polygon at IoU >= 0.5, red: not; orange fill: flagged cluster; blue
dotted: annotated polygons left unmatched), and the real G-band example segmented (no ground truth).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from common import cpu_name  # noqa: E402

from chromobatch.segment.base import Instance  # noqa: E402
from chromobatch.segment.data import load_set, read_image  # noqa: E402
from chromobatch.segment.factory import load_segmenter  # noqa: E402
from chromobatch.segment.metrics import SetScore, iou_matrix, score_image  # noqa: E402

GBAND_EXAMPLE = REPO.parent / "shared" / "data" / "metaphase-examples" / "iroh-A-gband.png"


def _timed(seg, items: list) -> tuple[list, dict[str, float]]:
    preds, times, cpu = [], [], []
    seg.segment(items[0].grey)  # warm-up
    for a in items:
        t0, c0 = time.perf_counter(), time.process_time()
        preds.append(seg.segment(a.grey))
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return preds, {"median": float(np.median(times)), "mean": float(np.mean(times)),
                   "cpu_median": float(np.median(cpu))}


def run(name: str, items: list, threads: list[int]) -> dict:
    """Score (and time) the segmenter with the first thread count; time it again with the others."""
    out: dict = {"segmenter": name, "seconds": {}}
    seg = load_segmenter(name, threads=threads[0])
    preds, out["seconds"][threads[0]] = _timed(seg, items)
    s = SetScore([score_image(p, a.instances, a.name) for p, a in zip(preds, items, strict=True)])
    out["summary"] = s.summary()
    out["per_image"] = [{"name": i.name, "annotated": i.n_gt, "count": i.count, "tp": i.tp, "predicted": i.n_pred,
                         "f1": 2 * i.tp / max(1, i.n_pred + i.n_gt)} for i in s.images]
    out["label"] = f"{seg.name} {seg.version}"
    for t in threads[1:]:
        out["seconds"][t] = _timed(load_segmenter(name, threads=t), items)[1]
    out["preds"] = preds
    return out


def outline_figure(grey: np.ndarray, pred: list[Instance], gt: list[Instance] | None, path: Path,
                   title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from skimage.measure import find_contours

    matched_pred: set[int] = set()
    matched_gt: set[int] = set()
    if gt:
        iou = iou_matrix(pred, gt)
        for i in np.argsort([-p.score for p in pred]):
            row = np.where([j in matched_gt for j in range(len(gt))], -1, iou[i])
            j = int(np.argmax(row)) if len(gt) else -1
            if j >= 0 and row[j] >= 0.5:
                matched_pred.add(int(i))
                matched_gt.add(j)
    h, w = grey.shape
    fig, ax = plt.subplots(figsize=(w / 100, h / 100 + 0.35), dpi=100)
    ax.imshow(grey, cmap="gray", vmin=0, vmax=255)
    for i, p in enumerate(pred):
        x0, y0, _, _ = p.box
        colour = "lime" if (gt is None or i in matched_pred) else "red"
        if p.cluster > 1:
            colour = "orange"
            ys, xs = np.nonzero(p.mask)
            ax.scatter(xs + x0, ys + y0, s=0.3, c="orange", alpha=0.25, linewidths=0)
            ax.text(x0, y0 - 2, f"~{p.cluster}", color="orange", fontsize=7)
        for c in find_contours(np.pad(p.mask, 1).astype(float), 0.5):
            ax.plot(c[:, 1] - 1 + x0, c[:, 0] - 1 + y0, color=colour, linewidth=0.8)
    if gt:
        for j, g in enumerate(gt):
            if j in matched_gt:
                continue
            x0, y0, _, _ = g.box
            for c in find_contours(np.pad(g.mask, 1).astype(float), 0.5):
                ax.plot(c[:, 1] - 1 + x0, c[:, 0] - 1 + y0, color="deepskyblue", linewidth=0.8, linestyle=":")
    ax.set_title(title, fontsize=8)
    ax.axis("off")
    fig.tight_layout(pad=0.1)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=Path("/work/data/bioimlab-metaphase"))
    ap.add_argument("--split", default="test")
    ap.add_argument("--model", default="default", help="learned segmenter folder (default: models/segmenter)")
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--json", type=Path)
    ap.add_argument("--limit", type=int, help="only the first N images (a quick try)")
    ap.add_argument("--figures", type=Path, help="folder for segmentation_test_example.png and the G-band figure")
    args = ap.parse_args()
    items = load_set(args.data, args.split, limit=args.limit)
    results = [run(args.model, items, args.threads), run("classical", items, args.threads)]
    import os

    print(f"# {datetime.now(UTC):%Y-%m-%d %H:%M} UTC, {cpu_name()}, {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.1f} at the end")
    print(f"# {args.data} split {args.split}: {len(items)} images, {sum(len(a.instances) for a in items)} polygons\n")
    print("| segmenter | F1@0.5 | precision | recall | AP@0.5 | exact count | count within +-1 | mean abs count error "
          "| flagged clusters | " + " | ".join(f"s/image wall, CPU ({t} thr)" for t in args.threads) + " |")
    print("|---" * (9 + len(args.threads)) + "|")
    for r in results:
        s = r["summary"]
        print(f"| {r['label']} | {s['f1']:.3f} | {s['precision']:.3f} | {s['recall']:.3f} | {s['ap50']:.3f} | "
              f"{s['exact_count']:.1%} | {s['count_within_1']:.1%} | {s['mean_abs_count_error']:.2f} | "
              f"{s['flagged_clusters']} | "
              + " | ".join(f"{sec['median']:.2f}, {sec['cpu_median']:.2f}"
                           for sec in (r["seconds"][t] for t in args.threads))
              + " |")
    if args.json:
        args.json.write_text(json.dumps([{k: v for k, v in r.items() if k != "preds"} for r in results], indent=1,
                                        default=str))
    if args.figures:
        learned = results[0]
        f1s = [p["f1"] for p in learned["per_image"]]
        k = int(np.argmin(np.abs(np.array(f1s) - np.median(f1s))))
        a = items[k]
        row = learned["per_image"][k]
        outline_figure(a.grey, learned["preds"][k], a.instances, args.figures / "segmentation_test_example.png",
                       f"{a.name} (test, Q-band shown inverted): {learned['label']}, F1@0.5 {row['f1']:.2f}, "
                       f"counted {row['count']} of {row['annotated']} annotated\n"
                       "green: matched at IoU >= 0.5, red: not matched, "
                       "blue dotted: annotated but missed, orange: flagged cluster (~N)")
        if GBAND_EXAMPLE.is_file():
            grey = read_image(GBAND_EXAMPLE)
            seg = load_segmenter(args.model, threads=args.threads[0])
            pred = seg.segment(grey)
            count = sum(p.cluster for p in pred)
            clusters = sum(1 for p in pred if p.cluster > 1)
            outline_figure(grey, pred, None, args.figures / "segmentation_gband_example.png",
                           f"iroh-A-gband.png (real G-band, no ground truth): {learned['label']}\n{len(pred)} "
                           f"objects, {clusters} flagged clusters (orange, ~N), count {count}")
            print(f"\nG-band example: {len(pred)} objects, {clusters} clusters, count {count}, "
                  f"scale factor {getattr(seg, 'last_timing', {}).get('factor')}")


if __name__ == "__main__":
    main()
