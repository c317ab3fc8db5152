"""Whole metaphase input: segmentation time per 768 x 576 metaphase, and whole cases as chromosomes/s
next to the crop pipeline's, measured in one run on this machine.

    .venv/bin/python benchmarks/metaphase.py [--cells 20] [--segmenter default] [--json out.json]

1. Segmentation: every segmenter asked for (the shipped learned one and the classical baseline) on the
   same synthetic G-band spreads (768 x 576, touching and overlapping pairs at the generator's default
   rates), seconds per image (median and mean after one warm-up image).
2. Whole case: one case of N whole metaphases (`process_case` with the report: decode, detect, segment,
   cut, classify, assign, commit, PDF with karyograms and outlined metaphases) against one case of N cells
   delivered as crops (the same pipeline without segmentation, same report), into fresh SQLite files,
   chromosomes per second each, with the shipped classifier.
"""

from __future__ import annotations

import argparse
import json
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
from chromobatch.registry.register import DEFAULT_MODEL_DIR, load_predictor  # noqa: E402
from chromobatch.segment.factory import load_segmenter  # noqa: E402
from chromobatch.service.pipeline import process_case  # noqa: E402
from chromobatch.store import db  # noqa: E402
from chromobatch.synth.cases import generate_case  # noqa: E402
from chromobatch.synth.metaphase import render_metaphase  # noqa: E402


def write_metaphase_case(root: Path, name: str, cells: int, seed: int) -> tuple[Path, list[np.ndarray]]:
    case = root / name
    case.mkdir(parents=True)
    images = []
    for i in range(cells):
        m = render_metaphase(np.random.default_rng(seed + i), karyotype="46,XY" if i % 2 else "46,XX")
        Image.fromarray(m.image).save(case / f"cell{i + 1:02d}.png")
        images.append(m.image)
    return case, images


def time_segmenter(name: str, images: list[np.ndarray]) -> dict[str, float]:
    seg = load_segmenter(name, threads=1)  # as the pipeline loads it
    seg.segment(images[0])  # warm-up
    times = []
    for img in images:
        t = time.perf_counter()
        seg.segment(img)
        times.append(time.perf_counter() - t)
    return {"median_s": float(np.median(times)), "mean_s": float(np.mean(times)), "images": len(times)}


def run_case(case: Path, db_path: Path, reports: Path, segmenter: str) -> dict[str, float]:
    settings = load_settings({"model": str(DEFAULT_MODEL_DIR), "device": "cpu", "segmenter": segmenter})
    database = db.connect(db_path)
    predictor = load_predictor(database, settings)
    t = time.perf_counter()
    result = process_case(database, case, predictor=predictor, settings=settings, reports_dir=reports)
    seconds = time.perf_counter() - t
    database.dispose()
    return {"seconds": seconds, "chromosomes": result.n_chromosomes, "cells": result.n_cells,
            "chromosomes_per_s": result.n_chromosomes / seconds, **{f"t_{k}": v for k, v in result.timings.items()}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cells", type=int, default=20)
    ap.add_argument("--segmenter", action="append", help="segmenters to time (default: default and classical)")
    ap.add_argument("--case-segmenter", default="default", help="segmenter for the whole-case run")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    names = args.segmenter or ["default", "classical"]
    with tempfile.TemporaryDirectory(prefix="cb-metaphase-bench-") as tmp:
        root = Path(tmp)
        meta_case, images = write_metaphase_case(root / "in", "METABENCH", args.cells, seed=1000)
        crop_case = generate_case(root / "in", "CROPBENCH", cells=args.cells, fmt="png",
                                  karyotype=["46,XY" if i % 2 else "46,XX" for i in range(args.cells)], seed=7)
        seg = {n: time_segmenter(n, images) for n in names}
        crops = run_case(crop_case, root / "crops.sqlite", root / "reports", args.case_segmenter)
        whole = run_case(meta_case, root / "meta.sqlite", root / "reports", args.case_segmenter)
    out = {"date": datetime.now(UTC).isoformat(timespec="minutes"), "cpu": cpu_name(), "cells": args.cells,
           "segmentation": seg, "crop_case": crops, "metaphase_case": whole,
           "ratio_metaphase_to_crops": whole["chromosomes_per_s"] / crops["chromosomes_per_s"]}
    print(json.dumps(out, indent=2))
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
