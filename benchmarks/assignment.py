"""Karyotype-aware assignment on real cells: accuracy with and without it, abnormal-count calls.

    .venv/bin/python benchmarks/assignment.py --model models/default \
        --manifest /work/data/g612/manifest.csv [--tune-split val] [--split test]

The gain and loss penalties are chosen on the --tune-split cells (never on the test cells), then the test
cells are scored: top-1 accuracy of the raw model and after assignment, the share of cells whose karyotype
comes out exactly right, and per cell whether an abnormal chromosome count (45, 47, ... or an unusual sex
complement) is found (exactly, or as some abnormal count), missed, or falsely alarmed in a normal cell.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from collections import defaultdict
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from chromobatch import CLASSES  # noqa: E402
from chromobatch.intake.imaging import load_chromosome  # noqa: E402
from chromobatch.karyotype.assign import DEFAULT_GAIN_PENALTY, DEFAULT_LOSS_PENALTY, assign_cell  # noqa: E402
from chromobatch.karyotype.iscn import cell_karyotype  # noqa: E402
from chromobatch.ml.folders import load_model  # noqa: E402
from chromobatch.ml.preprocess import chromosome_length  # noqa: E402
from chromobatch.ml.sizeprior import ink, relative_inks  # noqa: E402


def load_cells(manifest: Path, split: str) -> dict[str, tuple[list[np.ndarray], list[str]]]:
    cells: dict[str, tuple[list[np.ndarray], list[str]]] = defaultdict(lambda: ([], []))
    with manifest.open() as f:
        for row in csv.DictReader(f):
            if row["split"] != split:
                continue
            crop, _ = load_chromosome(manifest.parent / row["path"])
            key = f"{row.get('patient', '')}/{row['cell']}"
            cells[key][0].append(crop)
            cells[key][1].append(row["label"])
    return dict(cells)


def predict_cells(model_dir: Path, cells: dict[str, tuple[list[np.ndarray], list[str]]]) -> dict[str, np.ndarray]:
    model = load_model(model_dir)
    out = {}
    for key, (crops, _) in cells.items():
        med = float(np.median([chromosome_length(c) for c in crops]))
        meds = [med] * len(crops) if model.spec.mode == "cell" else None
        rel = (relative_inks([ink(c) for c in crops], [key] * len(crops), model.size_prior.min_cell)
               if model.size_prior is not None else None)  # the model's size prior, as the pipeline uses it
        out[key] = model.predict(crops, meds, rel_inks=rel)[0]
    return out


def is_abnormal(labels: list[str]) -> bool:
    kt = cell_karyotype("c", labels)
    return kt.count != 46 or bool(kt.gains or kt.losses) or kt.sex not in ("XX", "XY")


def score(cells: dict, probs: dict, penalties: tuple[float, float] | None) -> dict:
    """Per-chromosome accuracy and per-cell karyotype calls; penalties None = the raw top-1 labels."""
    correct = total = exact_cells = 0
    calls = {"found_exact": 0, "found_count_only": 0, "missed": 0, "false_alarms": 0, "abnormal_cells": 0,
             "normal_cells": 0}
    for key, (_, truth) in cells.items():
        p = probs[key]
        if penalties is None:
            labels = [CLASSES[i] for i in p.argmax(1)]
        else:
            labels = assign_cell(p, gain_penalty=penalties[0], loss_penalty=penalties[1]).labels
        correct += sum(a == b for a, b in zip(labels, truth, strict=True))
        total += len(truth)
        same = cell_karyotype("c", labels).iscn == cell_karyotype("c", truth).iscn
        exact_cells += int(same)
        t_ab, c_ab = is_abnormal(truth), is_abnormal(labels)
        if t_ab:
            calls["abnormal_cells"] += 1
            if c_ab and same:
                calls["found_exact"] += 1
            elif c_ab:
                calls["found_count_only"] += 1
            else:
                calls["missed"] += 1
        else:
            calls["normal_cells"] += 1
            calls["false_alarms"] += int(c_ab)
    return {"accuracy": correct / max(total, 1), "n": total, "cells": len(cells),
            "cell_karyotype_exact": exact_cells / max(len(cells), 1), **calls}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=REPO / "models" / "default")
    ap.add_argument("--manifest", type=Path, required=True)
    ap.add_argument("--split", default="test")
    ap.add_argument("--tune-split", default="val")
    ap.add_argument("--gains", default="1,2,4,8")
    ap.add_argument("--losses", default="0,1,2,4,8")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    t0 = time.time()
    grid = [(float(g), float(loss)) for g in args.gains.split(",") for loss in args.losses.split(",")]
    tune = load_cells(args.manifest, args.tune_split)
    tune_probs = predict_cells(args.model, tune)
    tuning = {pen: score(tune, tune_probs, pen) for pen in grid}
    # chosen on the tuning cells only: most cells with exactly the right karyotype, then accuracy
    best = max(grid, key=lambda pen: (tuning[pen]["cell_karyotype_exact"], tuning[pen]["accuracy"]))
    test = load_cells(args.manifest, args.split)
    test_probs = predict_cells(args.model, test)
    result = {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"), "model": str(args.model),
        "manifest": str(args.manifest), "split": args.split, "cells": len(test),
        "tuned_on": args.tune_split, "gain_penalty": best[0], "loss_penalty": best[1],
        "tuning": {f"gain={g},loss={loss}": v for (g, loss), v in tuning.items()},
        "raw": score(test, test_probs, None), "assigned": score(test, test_probs, best),
        "assigned_defaults": score(test, test_probs, (DEFAULT_GAIN_PENALTY, DEFAULT_LOSS_PENALTY)),
        "seconds": round(time.time() - t0, 1),
    }
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
