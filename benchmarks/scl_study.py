"""SCL at equal steps (issue 18): plain focal loss vs the paper's SCL at several λ1, several seeds, two backbones.

    .venv/bin/python benchmarks/scl_study.py run --g612 /work/data/g612/manifest.csv \
        --bioimlab /work/data/bioimlab/manifest.csv --out /work/runs/scl_study [--steps 400] [--shard 0/2]
    .venv/bin/python benchmarks/scl_study.py table --out /work/runs/scl_study [--json summary.json]
    .venv/bin/python benchmarks/scl_study.py tsne --out /work/runs/scl_study --g612 ... --png docs/img/scl_tsne.png

Every run trains on the g612 train split with `chromobatch.training.train` (the same sampler: two batches of
24 chromosomes, one per class, per step; the same number of steps and images per step; the same learning
rate schedule; best-by-validation model kept, no early stop), then scores the image model alone (no size
prior: the loss is what is compared) on g612 val, g612 test and the bioimlab Q-band test split (another
lab's material and stain: the paper's "external" generalisation). The only thing that differs between
the runs of one backbone and seed is λ1, the weight of the contrastive loss (plain: λ1 = 0).

Restartable: a run whose result.json exists is skipped. `--shard K/N` runs every N-th run starting at K, so
two processes with one thread each use two cores (one thread per run: on 2 cores two single-thread runs
did about 1.5x the work of one two-thread run).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from common import cpu_name  # noqa: E402

from chromobatch.ml.runtime import native_bf16  # noqa: E402
from chromobatch.training.config import TrainConfig  # noqa: E402
from chromobatch.training.evaluate import evaluate  # noqa: E402
from chromobatch.training.loop import train  # noqa: E402
from chromobatch.training.records import Record, load_records  # noqa: E402

LOSSES = {"plain": 0.0, "scl0.1": 0.1, "scl0.3": 0.3, "scl1.0": 1.0}


def run_names(backbones: list[str], seeds: list[int]) -> list[tuple[str, str, str, int]]:
    """(name, backbone, loss, seed), seed-major so that a cut-off study has every loss at the first seeds."""
    return [(f"{b}-{loss}-s{s}", b, loss, s) for s in seeds for b in backbones for loss in LOSSES]


def precision_for(backbone: str) -> str:
    """bf16 where the CPU has it natively and it measured faster for this backbone (resnet18: 0.39 vs 0.56-0.68
    s/step at one thread); mobilenetv3's depthwise convolutions were slower in bf16 here (0.46-0.67 vs 0.36-0.50)."""
    if backbone.startswith("resnet") and native_bf16(torch.device("cpu")):
        return "bf16"
    return "fp32"


def do_run(name: str, backbone: str, loss: str, seed: int, args: argparse.Namespace,
           g612: list[Record], bio_test: list[Record]) -> dict[str, Any]:
    out = args.out / name
    cfg = TrainConfig(backbone=backbone, input_size=args.input_size, preprocess="fit", orient="upright",
                      steps=args.steps, no_scl=loss == "plain", lambda_con=LOSSES[loss] or None, seed=seed,
                      device="cpu", val_every=args.val_every, patience=0, checkpoint_every=10**9,
                      size_prior=False, precision=precision_for(backbone))
    t = time.perf_counter()
    res = train(cfg, [r for r in g612 if r.split in ("train", "val")], out / "model", progress=False)
    train_s = time.perf_counter() - t
    scores: dict[str, Any] = {}
    for label, records, split in (("g612_val", g612, "val"), ("g612_test", g612, "test"),
                                  ("bioimlab_test", bio_test, "test")):
        m = evaluate(out / "model", records, split=split, size_prior=False)
        scores[label] = {"accuracy": m["accuracy"], "n": m["n"]}
    result = {"name": name, "backbone": backbone, "loss": loss, "lambda_con": LOSSES[loss], "seed": seed,
              "steps": res.steps_done, "best_step": res.best_step, "input_size": args.input_size,
              "precision": cfg.precision, "threads": torch.get_num_threads(), "train_s": round(train_s, 1),
              "best_val_during_training": res.best_val_accuracy, "scores": scores,
              "machine": cpu_name(), "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
              "torch": torch.__version__, "python": platform.python_version()}
    (out / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def cmd_run(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    k, n = (int(x) for x in args.shard.split("/"))
    todo = [r for i, r in enumerate(run_names(args.backbones, args.seeds)) if i % n == k
            and not (args.out / r[0] / "result.json").is_file()]
    print(f"shard {k}/{n}: {len(todo)} runs to do", flush=True)
    if not todo:
        return
    t = time.perf_counter()
    g612 = load_records(args.g612, splits=["train", "val", "test"])
    bio_test = load_records(args.bioimlab, splits=["test"])
    print(f"loaded {len(g612)} g612 and {len(bio_test)} bioimlab test crops in {time.perf_counter() - t:.0f}s",
          flush=True)
    for name, backbone, loss, seed in todo:
        r = do_run(name, backbone, loss, seed, args, g612, bio_test)
        print(f"{name}: train {r['train_s']:.0f}s " + " ".join(f"{k} {v['accuracy']:.4f}"
                                                                for k, v in r["scores"].items()), flush=True)


def load_results(out: Path) -> list[dict[str, Any]]:
    return [json.loads(p.read_text()) for p in sorted(out.glob("*/result.json"))]


def summarise(results: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per (backbone, loss): mean, sample standard deviation and min-max of each score over the seeds."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in results:
        groups.setdefault(f"{r['backbone']} {r['loss']}", []).append(r)
    out: dict[str, dict[str, Any]] = {}
    for key, rs in groups.items():
        row: dict[str, Any] = {"seeds": sorted(r["seed"] for r in rs), "steps": sorted({r["steps"] for r in rs}),
                               "train_s_mean": round(statistics.mean(r["train_s"] for r in rs), 1),
                               "precision": sorted({r["precision"] for r in rs})}
        for score in ("g612_val", "g612_test", "bioimlab_test"):
            xs = [100 * r["scores"][score]["accuracy"] for r in rs]
            row[score] = {"mean": round(statistics.mean(xs), 2),
                          "sd": round(statistics.stdev(xs), 2) if len(xs) > 1 else None,
                          "min": round(min(xs), 2), "max": round(max(xs), 2), "values": [round(x, 2) for x in xs]}
        out[key] = row
    return out


def cmd_table(args: argparse.Namespace) -> None:
    summary = summarise(load_results(args.out))
    print("| backbone | loss (λ1) | seeds | g612 val | g612 test | bioimlab test (Q-band) | train s/run |")
    print("|---|---|---|---|---|---|---|")
    for key in sorted(summary, key=lambda k: (k.split()[0], list(LOSSES).index(k.split()[1]))):
        row = summary[key]
        cells = [f"{row[s]['mean']:.2f} ± {row[s]['sd'] or 0:.2f} ({row[s]['min']:.1f}-{row[s]['max']:.1f})"
                 for s in ("g612_val", "g612_test", "bioimlab_test")]
        b, loss = key.split()
        print(f"| {b} | {loss} ({LOSSES[loss]}) | {len(row['seeds'])} | " + " | ".join(cells)
              + f" | {row['train_s_mean']:.0f} |")
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2) + "\n")


def cmd_tsne(args: argparse.Namespace) -> None:
    """t-SNE of the g612 test embeddings of the plain run and the best-by-validation SCL run (same backbone and
    seed), side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from sklearn.manifold import TSNE

    from chromobatch import CLASSES
    from chromobatch.ml.folders import load_model

    results = [r for r in load_results(args.out) if r["backbone"] == args.backbone and r["seed"] == args.seed]
    plain = next(r for r in results if r["loss"] == "plain")
    scl = max((r for r in results if r["loss"] != "plain"), key=lambda r: r["scores"]["g612_val"]["accuracy"])
    records = load_records(args.g612, splits=["test"])
    rng = np.random.default_rng(0)
    pick = sorted(rng.choice(len(records), min(args.n, len(records)), replace=False))
    crops = [records[i].crop for i in pick]
    y = np.array([records[i].label for i in pick])
    fig, axes = plt.subplots(1, 2, figsize=(13, 6.2))
    cmap = plt.get_cmap("tab20", 24)
    for ax, r in zip(axes, (plain, scl), strict=True):
        lm = load_model(args.out / r["name"] / "model")
        _, emb = lm.predict(crops, None)
        xy = TSNE(n_components=2, init="pca", random_state=0, perplexity=30).fit_transform(emb)
        for c in range(24):
            sel = y == c
            ax.scatter(xy[sel, 0], xy[sel, 1], s=5, color=cmap(c), label=CLASSES[c])
            if sel.any():
                cx, cy = np.median(xy[sel], axis=0)
                ax.text(cx, cy, CLASSES[c], fontsize=8, weight="bold", ha="center", va="center")
        acc = 100 * r["scores"]["g612_test"]["accuracy"]
        ax.set_title(f"{r['backbone']} {r['loss']} (λ1 = {r['lambda_con']}), seed {r['seed']}: "
                     f"g612 test {acc:.1f}%", fontsize=10)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(f"t-SNE of the embeddings of {len(pick)} g612 test crops after {plain['steps']} steps")
    fig.tight_layout()
    args.png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.png, dpi=110)
    print(f"wrote {args.png}: plain {plain['name']} vs {scl['name']}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    run = sub.add_parser("run")
    run.add_argument("--g612", type=Path, required=True)
    run.add_argument("--bioimlab", type=Path, required=True)
    run.add_argument("--steps", type=int, default=400)
    run.add_argument("--val-every", type=int, default=100)
    run.add_argument("--input-size", type=int, default=64)
    run.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    run.add_argument("--backbones", nargs="+", default=["resnet18", "mobilenetv3_large_100"])
    run.add_argument("--threads", type=int, default=1)
    run.add_argument("--shard", default="0/1")
    table = sub.add_parser("table")
    table.add_argument("--json", type=Path)
    tsne = sub.add_parser("tsne")
    tsne.add_argument("--g612", type=Path, required=True)
    tsne.add_argument("--backbone", default="resnet18")
    tsne.add_argument("--seed", type=int, default=0)
    tsne.add_argument("--n", type=int, default=1500)
    tsne.add_argument("--png", type=Path, required=True)
    for p in (run, table, tsne):
        p.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    {"run": cmd_run, "table": cmd_table, "tsne": cmd_tsne}[args.cmd](args)


if __name__ == "__main__":
    main()
