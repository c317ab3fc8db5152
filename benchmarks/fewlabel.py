"""Few-label adaptation (issue 18): a G-band model fine-tuned on 5, 10 and 20 labelled Q-band metaphases.

    .venv/bin/python benchmarks/fewlabel.py run --bioimlab /work/data/bioimlab/manifest.csv \
        --start plain=/work/runs/scl_study/resnet18-plain-s0/model \
        --start scl=/work/runs/scl_study/resnet18-scl0.1-s0/model --out /work/runs/fewlabel [--steps 200]
    .venv/bin/python benchmarks/fewlabel.py table --out /work/runs/fewlabel

The case a lab meets: a model trained on another lab's material and a handful of reviewed cells of its own.
Each start model (trained on g612 with the plain loss or with SCL) is fine-tuned on the first N train
metaphases of a seeded shuffle of bioimlab (nested: the 5 are in the 10, the 10 in the 20), with the plain
focal loss and with the paper's SCL loss (λ1 = 1), the same steps, sampler, learning rate and frozen layers
(stem, layer1, layer2: a small set should move the upper layers only), no validation (a lab with five
metaphases has none to spare: the last step is kept), and scored on the bioimlab test split, image model
alone. Restartable: a run whose result.json exists is skipped.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from common import cpu_name  # noqa: E402

from chromobatch.ml.runtime import native_bf16  # noqa: E402
from chromobatch.training.config import TrainConfig  # noqa: E402
from chromobatch.training.evaluate import evaluate  # noqa: E402
from chromobatch.training.loop import train  # noqa: E402
from chromobatch.training.records import Record, load_records  # noqa: E402

SIZES = (5, 10, 20)
LOSSES = ("plain", "scl")
FREEZE = ("backbone.conv1", "backbone.bn1", "backbone.layer1", "backbone.layer2")


def first_metaphases(records: list[Record], n: int, seed: int = 0) -> list[Record]:
    """The train records of the first n metaphases (cells) of a seeded shuffle: nested across n."""
    cells = sorted({r.cell_key for r in records if r.split == "train"})
    order = [cells[i] for i in np.random.default_rng(seed).permutation(len(cells))]
    keep = set(order[:n])
    return [r for r in records if r.split == "train" and r.cell_key in keep]


def cmd_run(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    starts = dict(s.split("=", 1) for s in args.start)
    bio = load_records(args.bioimlab, splits=["train", "test"])
    test = [r for r in bio if r.split == "test"]
    for start_name, start in starts.items():
        base = evaluate(start, test, split="test", size_prior=False)
        print(f"{start_name} start ({start}): bioimlab test {base['accuracy']:.4f} before fine-tuning", flush=True)
        (args.out / f"start-{start_name}.json").parent.mkdir(parents=True, exist_ok=True)
        (args.out / f"start-{start_name}.json").write_text(json.dumps(
            {"start": start, "accuracy": base["accuracy"], "n": base["n"]}, indent=2) + "\n")
        for n in SIZES:
            recs = first_metaphases(bio, n, args.seed)
            for loss in LOSSES:
                name = f"{start_name}-{n}-{loss}"
                out = args.out / name
                if (out / "result.json").is_file():
                    continue
                meta = json.loads((Path(start) / "model.json").read_text())
                pre = meta["preprocess"]
                cfg = TrainConfig(
                    init_from=start, backbone=meta["backbone"], embed_dim=meta["embed_dim"],
                    input_size=pre["input_size"], preprocess=pre["mode"], orient=pre["orient"],
                    size_power=pre["size_power"], steps=args.steps, no_scl=loss == "plain",
                    lambda_con=1.0 if loss == "scl" else None, lr=args.lr, freeze=FREEZE, seed=args.seed,
                    device="cpu", val_every=10**9,
                    checkpoint_every=10**9, patience=0, size_prior=False,
                    precision="bf16" if native_bf16(torch.device("cpu")) else "fp32")
                t = time.perf_counter()
                res = train(cfg, recs, out / "model", progress=False)
                train_s = time.perf_counter() - t
                m = evaluate(out / "model", test, split="test", size_prior=False)
                result = {"name": name, "start": start, "start_name": start_name, "metaphases": n,
                          "crops": len(recs), "loss": loss, "steps": res.steps_done, "lr": args.lr,
                          "seed": args.seed, "precision": cfg.precision, "train_s": round(train_s, 1),
                          "bioimlab_test": m["accuracy"], "n_test": m["n"], "machine": cpu_name(),
                          "threads": torch.get_num_threads(),
                          "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")}
                (out / "result.json").write_text(json.dumps(result, indent=2) + "\n")
                print(f"{name}: {len(recs)} crops, {train_s:.0f}s, bioimlab test {m['accuracy']:.4f}", flush=True)


def cmd_table(args: argparse.Namespace) -> None:
    results = [json.loads(p.read_text()) for p in sorted(args.out.glob("*/result.json"))]
    starts = {p.stem.removeprefix("start-"): json.loads(p.read_text()) for p in sorted(args.out.glob("start-*.json"))}
    by: dict[tuple[str, int, str], dict[str, Any]] = {(r["start_name"], r["metaphases"], r["loss"]): r
                                                      for r in results}
    print("| start model (g612) | labelled metaphases (crops) | plain fine-tune | SCL fine-tune (λ1 = 1) "
          "| SCL - plain |")
    print("|---|---|---|---|---|")
    for s, info in starts.items():
        print(f"| {s} | 0 (as trained) | {100 * info['accuracy']:.2f}% | | |")
        for n in SIZES:
            p, c = by.get((s, n, "plain")), by.get((s, n, "scl"))
            if p is None and c is None:
                continue
            crops = (p or c or {}).get("crops", "?")
            cells = [f"{100 * r['bioimlab_test']:.2f}%" if r else "-" for r in (p, c)]
            diff = f"{100 * (c['bioimlab_test'] - p['bioimlab_test']):+.1f}" if p and c else ""
            print(f"| {s} | {n} ({crops}) | {cells[0]} | {cells[1]} | {diff} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    run = sub.add_parser("run")
    run.add_argument("--bioimlab", type=Path, required=True)
    run.add_argument("--start", action="append", required=True, help="NAME=MODEL_FOLDER (repeat)")
    run.add_argument("--steps", type=int, default=200)
    run.add_argument("--lr", type=float, default=5e-4)
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--threads", type=int, default=1)
    table = sub.add_parser("table")
    for p in (run, table):
        p.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    {"run": cmd_run, "table": cmd_table}[args.cmd](args)


if __name__ == "__main__":
    main()
