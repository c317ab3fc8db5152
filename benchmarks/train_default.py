"""How models/default was trained (see models/default/README.md and docs/results.md).

resnet18 at 96 px, crops oriented upright, g612 train split + a synthetic G-band set (chromobatch.synth
generate_dataset, 300 cells, randomly rotated: the orientation step makes them upright), plain focal loss
with the paper's paired sampler (SCL trained worse at this CPU budget), 1500 steps, best step by the g612
validation split. Paths are arguments: G612_MANIFEST SYNTH_MANIFEST OUT_DIR.

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/train_default.py \
        /work/data/g612/manifest.csv /work/runs/synth300/manifest.csv /work/runs/default_b/model
"""
import logging
import sys
from dataclasses import replace

from chromobatch.data import load_records
from chromobatch.train import TrainConfig, train

logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
g612, synth_manifest, out = sys.argv[1:4]
real = load_records(g612, splits=("train", "val"))
synth = [replace(r, split="train", patient="synth-" + r.patient) for r in
         load_records(synth_manifest, splits=("train", "val"))]
cfg = TrainConfig(backbone="resnet18", input_size=96, steps=1500, val_every=250, checkpoint_every=250, patience=0,
                  no_scl=True, orient="upright")
print(train(cfg, real + synth, out, progress=False), flush=True)
