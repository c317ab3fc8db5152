"""Copy a trained model folder to models/default as the shipped model: fp16 weights, name, version, test metrics.

    .venv/bin/python benchmarks/ship_default.py RUN/model VERSION --eval g612_test=RUN/eval-g612.json \\
        --eval bioimlab_test=RUN/eval-bioimlab.json [--out models/default]
    # the Q-band model (models/qband/README.md):
    .venv/bin/python benchmarks/ship_default.py RUN/model VERSION --out models/qband --name chromobatch-qband \\
        --stain Q --eval bioimlab_test=RUN/eval-bioimlab.json

Only the summary metrics of each evaluation JSON (`chromobatch evaluate --json`) are kept; the card
(models/default/README.md) is written by hand from the same files.
"""
import argparse
import json
import shutil
from pathlib import Path

from chromobatch.ml.folders import load_model, save_model

KEEP = ("n", "accuracy", "top5_accuracy", "recall_macro", "auc_macro")

ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
ap.add_argument("model", type=Path)
ap.add_argument("version")
ap.add_argument("--eval", action="append", default=[], metavar="NAME=JSON")
ap.add_argument("--out", type=Path, default=Path("models/default"))
ap.add_argument("--name", default="chromobatch-default")
ap.add_argument("--stain", default="G", choices=("G", "Q"), help="the stain the model reads (model.json 'stain')")
args = ap.parse_args()

lm = load_model(args.model)
meta = dict(lm.meta)  # save_model rewrites the format fields (dtype, temperature, version) itself
meta.update(name=args.name, version=args.version, stain=args.stain)
metrics = dict(meta.get("metrics", {}))
for item in args.eval:
    name, path = item.split("=", 1)
    m = json.loads(Path(path).read_text())
    metrics[name] = {k: m[k] for k in KEEP if k in m}
meta["metrics"] = metrics
tmp = args.out.with_name(args.out.name + ".new")
shutil.rmtree(tmp, ignore_errors=True)
save_model(lm.net, meta, tmp, half=True)
args.out.mkdir(parents=True, exist_ok=True)
for f in ("model.safetensors", "model.json"):
    (tmp / f).replace(args.out / f)
shutil.rmtree(tmp)
print(f"shipped {args.model} as {args.out} ({(args.out / 'model.safetensors').stat().st_size / 1e6:.1f} MB)")
