"""How models/default was trained (see models/default/README.md and docs/results.md).

resnet18 (96 px by default; 128 px for 2026.11.26.5), crops oriented upright, g612 train split + a synthetic
G-band set (chromobatch.synth generate_dataset, 300 cells, randomly rotated: the orientation step makes them
upright), plain focal loss with the paper's paired sampler (SCL trained worse at the CPU budget and half a
point behind at the GPU budget; --scl trains with it), best step by the g612 validation split.

The shipped 2026.11.26.5 is one run of this script on a GPU (benchmarks/gpu_session.sh, "plain128"):

    python3 benchmarks/train_default.py --g612 G612/manifest.csv --synth-dir SYNTH --out RUN --device cuda \
        --preprocess fit --lr 1e-3 --input-size 128 --time-budget 6.5 --steps 200000 --val-every 500 \
        --checkpoint-every 5000 --val-limit 0 --half --no-size-prior

The earlier CPU-trained models: stage 1 (1,500 steps from random init), then stage 2 (a warm start from
stage 1's model: fresh Adam, warm-up and cosine again, 2,500 more steps). The synthetic set is generated
when SYNTH_DIR has no manifest yet.

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/train_default.py \\
        --g612 /work/data/g612/manifest.csv --synth-dir /work/runs/synth300 --out /work/runs/default_b/model
    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/train_default.py \\
        --g612 /work/data/g612/manifest.csv --synth-dir /work/runs/synth300 --out /work/runs/default_c/model \\
        --init-from models/default --steps 2500
"""
import argparse
import logging
from dataclasses import replace
from pathlib import Path

from chromobatch.synth.cases import generate_dataset
from chromobatch.training.config import TrainConfig  # noqa: E402
from chromobatch.training.loop import train
from chromobatch.training.records import load_records

logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
ap.add_argument("--g612", required=True, help="g612 manifest.csv (train and val splits are used)")
ap.add_argument("--synth-dir", required=True, help="folder of the synthetic set (generated when missing)")
ap.add_argument("--out", required=True, help="model folder to write")
ap.add_argument("--steps", type=int, default=1500)
ap.add_argument("--lr", type=float, default=1e-3)
ap.add_argument("--init-from", default=None, help="warm start from this model folder")
ap.add_argument("--preprocess", default="fixed", help="fixed, cell or fit")
ap.add_argument("--size-power", type=float, default=1.0, help="fixed/cell size-range compression")
ap.add_argument("--scl", action="store_true", help="train with SCL (the paper's loss) instead of plain focal")
ap.add_argument("--lambda-con", type=float, default=None, help="with --scl: the weight λ1 of L_con (default 1; "
                "0.1 tied plain in the equal-step study, docs/results.md)")
ap.add_argument("--input-size", type=int, default=96)
ap.add_argument("--time-budget", type=float, default=None, help="minutes the training loop may run")
ap.add_argument("--device", default="auto")
ap.add_argument("--seed", type=int, default=0)
ap.add_argument("--val-every", type=int, default=250)
ap.add_argument("--checkpoint-every", type=int, default=250)
ap.add_argument("--val-limit", type=int, default=2000, help="validation subset size; 0 = the whole split")
ap.add_argument("--half", action="store_true", help="store fp16 weights")
ap.add_argument("--no-size-prior", action="store_true", help="skip fitting the size prior (calibrate later)")
args = ap.parse_args()

synth_manifest = Path(args.synth_dir) / "manifest.csv"
if not synth_manifest.is_file():
    generate_dataset(Path(args.synth_dir), cells=300, seed=0, style="G", upright=False)
real = load_records(args.g612, splits=("train", "val"))
synth = [replace(r, split="train", patient="synth-" + r.patient) for r in
         load_records(synth_manifest, splits=("train", "val"))]
cfg = TrainConfig(backbone="resnet18", input_size=args.input_size, steps=args.steps, lr=args.lr,
                  val_every=args.val_every, checkpoint_every=args.checkpoint_every, val_limit=args.val_limit or None,
                  patience=0, no_scl=not args.scl, lambda_con=args.lambda_con if args.scl else None, orient="upright",
                  init_from=args.init_from,
                  preprocess=args.preprocess, size_power=args.size_power, seed=args.seed, device=args.device,
                  half_weights=args.half, size_prior=not args.no_size_prior,
                  time_budget_s=None if args.time_budget is None else 60 * args.time_budget)
print(train(cfg, real + synth, args.out, progress=False), flush=True)
