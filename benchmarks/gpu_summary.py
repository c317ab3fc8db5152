"""Summarise the runs of one lent-GPU session (benchmarks/gpu_session.sh): a table and a JSON file.

    python3 benchmarks/gpu_summary.py --runs RUNS_DIR --test MANIFEST --json OUT.json [--device cuda]

Per run folder: the best validation accuracy and its step, the steps made, training images/s, and the image
model's g612 test accuracy, macro recall and AUC (no size prior: that is fitted later, on this machine's CPU,
by `chromobatch calibrate`). Which run ships is decided by validation accuracy alone; the test figures are
printed for the ablation table.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from chromobatch.training.evaluate import evaluate


def summarise(run: Path, test: str | None, device: str) -> dict[str, Any]:
    row: dict[str, Any] = {"run": run.name}
    meta_path = run / "model.json"
    if not meta_path.is_file():
        row["error"] = "no model.json (the run failed; see its log)"
        return row
    meta = json.loads(meta_path.read_text())
    training = meta.get("training", {})
    cfg = training.get("config", {})
    row.update(
        val_accuracy=meta.get("metrics", {}).get("val_accuracy"),
        best_step=training.get("step"),
        steps_done=training.get("run", {}).get("steps_done"),
        images_per_second=training.get("run", {}).get("train_images_per_second"),
        seconds=training.get("run", {}).get("seconds"),
        scl=not cfg.get("no_scl", True),
        input_size=meta.get("input_size"),
        init_from=cfg.get("init_from"),
        lr=cfg.get("lr"),
    )
    if test:
        m = evaluate(run, test, split="test", device=device, size_prior=False)
        row.update(test_accuracy=m["accuracy"], test_recall_macro=m["recall_macro"], test_auc_macro=m["auc_macro"],
                   test_n=m["n"])
    return row


def pct(row: dict[str, Any], key: str) -> str:
    v = row.get(key)
    return "-" if v is None else f"{100 * v:.2f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", required=True, type=Path)
    ap.add_argument("--test", default=None, help="manifest with a test split (g612)")
    ap.add_argument("--json", required=True, type=Path)
    ap.add_argument("--device", default="cuda")
    args = ap.parse_args()
    rows = []
    for run in sorted(p for p in args.runs.iterdir() if p.is_dir()):
        try:
            rows.append(summarise(run, args.test, args.device))
        except Exception as exc:  # one broken run must not hide the others' results
            rows.append({"run": run.name, "error": f"{type(exc).__name__}: {exc}"})
    args.json.write_text(json.dumps(rows, indent=2))
    print(f"{'run':10s} {'scl':>4s} {'px':>4s} {'steps':>7s} {'img/s':>7s} {'val':>7s} {'@step':>6s} {'test':>7s} "
          f"{'recall':>7s} {'auc':>7s}")
    for r in rows:
        if "error" in r:
            print(f"{r['run']:10s} ERROR {r['error']}")
            continue

        print(f"{r['run']:10s} {str(r['scl'])[0]:>4s} {r['input_size']!s:>4s} {r['steps_done']!s:>7s} "
              f"{r['images_per_second'] or 0:7.0f} {pct(r, 'val_accuracy'):>7s} {r['best_step']!s:>6s} "
              f"{pct(r, 'test_accuracy'):>7s} {pct(r, 'test_recall_macro'):>7s} {pct(r, 'test_auc_macro'):>7s}")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
