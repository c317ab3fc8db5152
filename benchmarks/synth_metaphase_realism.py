"""Realism check of the synthetic metaphases: the classical segmenter's scores on real and synthetic spreads.

    .venv/bin/python benchmarks/synth_metaphase_realism.py [--images 12]

Why: a synthetic set that is far easier (or harder) than real spreads would mislead segmenter training and
tests. The same untrained classical baseline (chromobatch.segment.classical, threshold + watershed) is run on
the first ``--images`` bioimlab-metaphase test images (labelme polygons) and on as many synthetic Q- and
G-band spreads (default rates, exact masks); similar F1 and count errors mean similar difficulty for it.
Needs ../shared/data extracted to /work/data (bioimlab-metaphase); says so and stops when it is absent.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import os
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from common import cpu_name  # noqa: E402

from chromobatch.segment.base import Instance  # noqa: E402
from chromobatch.segment.classical import ClassicalSegmenter  # noqa: E402
from chromobatch.segment.data import normalise_metaphase, read_image  # noqa: E402
from chromobatch.segment.metrics import ImageScore, read_labelme, score_image  # noqa: E402
from chromobatch.synth.metaphase import render_metaphase  # noqa: E402
from chromobatch.synth.render import seeded_rng  # noqa: E402

DATA = Path("/work/data/bioimlab-metaphase")


def summary(tag: str, scores: list[ImageScore]) -> str:
    tp = sum(s.tp for s in scores)
    f1 = 2 * tp / (sum(s.n_pred for s in scores) + sum(s.n_gt for s in scores))
    err = np.array([s.count_error for s in scores])
    return (f"{tag}: {len(scores)} images, F1@0.5 {f1:.3f}, count exact {np.mean(err == 0):.2f}, "
            f"within 1 {np.mean(np.abs(err) <= 1):.2f}, MAE {np.mean(np.abs(err)):.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=12)
    ap.add_argument("--data", type=Path, default=DATA)
    args = ap.parse_args()
    if not (args.data / "manifest.csv").is_file():
        sys.exit(f"{args.data}/manifest.csv not found: extract ../shared/data/bioimlab-metaphase.tar.gz first")
    print(f"machine: {cpu_name()}, {os.cpu_count()} cores; date {dt.date.today()}")
    seg = ClassicalSegmenter()
    rows = [r for r in csv.DictReader((args.data / "manifest.csv").open()) if r["split"] == "test"][:args.images]
    real = []
    for r in rows:
        grey = read_image(args.data / r["image"])
        real.append(score_image(seg.segment(grey), read_labelme(args.data / r["annotation"], grey.shape)))
    print(summary(f"real bioimlab-metaphase test (first {len(rows)})", real))
    for stain in ("Q", "G"):
        scores = []
        for seed in range(args.images):
            m = render_metaphase(seeded_rng(seed, 404), stain=stain)
            gt = [Instance(mask=mk, box=b) for mk, b in zip(m.masks, m.boxes, strict=True)]
            scores.append(score_image(seg.segment(normalise_metaphase(m.image)), gt))
        print(summary(f"synthetic {stain}-band (default rates)", scores))


if __name__ == "__main__":
    main()
