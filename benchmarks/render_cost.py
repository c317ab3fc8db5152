"""What preparing one chromosome costs before the network sees it: `render` (upright turn + canvas) and the
size prior's `ink`, at this checkout against an earlier commit's code, interleaved in one run.

    .venv/bin/python benchmarks/render_cost.py --baseline 0f4855b [--data /work/data/g612] [--split test]
        [--rounds 5] [--json out.json]

The baseline's `chromobatch/ml/geometry.py`, `ml/preprocess.py` and `ml/sizeprior.py` are read from git
and loaded as separate modules beside today's, so both run in the same process on the same decoded crops
(g612 split, as the pipeline stores them); rounds alternate between the two and the best round of each is
reported, in microseconds per crop. It also checks that both give the same canvases and inks, to the bit:
a faster render that moved a pixel would change what the classifier sees.
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import subprocess
import sys
import time
import types
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from common import cpu_name  # noqa: E402

from chromobatch.ml import preprocess, sizeprior  # noqa: E402
from chromobatch.ml.folders import read_meta  # noqa: E402


def baseline_modules(commit: str) -> tuple[types.ModuleType, types.ModuleType]:
    """The commit's render and ink, as modules of their own (geometry first: the other two import it)."""
    loaded: dict[str, types.ModuleType] = {}
    for name in ("geometry", "preprocess", "sizeprior"):
        source = subprocess.run(["git", "show", f"{commit}:chromobatch/ml/{name}.py"], cwd=REPO, check=True,
                                capture_output=True, text=True).stdout
        source = source.replace("from chromobatch.ml.geometry import", "from baseline_geometry import")
        spec = importlib.util.spec_from_loader(f"baseline_{name}", loader=None)
        assert spec is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[f"baseline_{name}"] = module
        exec(compile(source, f"{commit}:chromobatch/ml/{name}.py", "exec"), module.__dict__)  # noqa: S102
        loaded[name] = module
    return loaded["preprocess"], loaded["sizeprior"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--baseline", required=True, help="git commit whose ml/ code is the baseline")
    ap.add_argument("--data", type=Path, default=Path("/work/data/g612"))
    ap.add_argument("--split", default="test")
    ap.add_argument("--model", type=Path, default=REPO / "models" / "default")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    rows = [r for r in csv.DictReader((args.data / "manifest.csv").open()) if r["split"] == args.split]
    crops = [np.asarray(Image.open(args.data / r["path"]).convert("L")) for r in rows]
    fields = {k: v for k, v in read_meta(args.model)["preprocess"].items() if k != "version"}
    old_pre, old_size = baseline_modules(args.baseline)
    specs = {"baseline": old_pre.PreprocessSpec(**fields), "now": preprocess.PreprocessSpec(**fields)}
    render = {"baseline": old_pre.render, "now": preprocess.render}
    ink = {"baseline": old_size.ink, "now": sizeprior.ink}
    canvases = {k: np.stack([render[k](c, specs[k]) for c in crops]) for k in render}
    inks = {k: np.array([ink[k](c) for c in crops]) for k in ink}
    same = bool(np.array_equal(canvases["baseline"], canvases["now"]))
    same_ink = bool(np.array_equal(inks["baseline"], inks["now"]))
    times: dict[str, dict[str, list[float]]] = {k: {"render": [], "ink": []} for k in render}
    for _ in range(args.rounds):
        for k in ("baseline", "now"):
            t = time.perf_counter()
            for c in crops:
                render[k](c, specs[k])
            times[k]["render"].append((time.perf_counter() - t) / len(crops) * 1e6)
            t = time.perf_counter()
            for c in crops:
                ink[k](c)
            times[k]["ink"].append((time.perf_counter() - t) / len(crops) * 1e6)
    best = {k: {part: min(v) for part, v in parts.items()} for k, parts in times.items()}
    out = {"date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"), "cpu": cpu_name(), "baseline": args.baseline,
           "crops": len(crops), "split": args.split, "canvases_identical": same, "inks_identical": same_ink,
           "us_per_crop": best,
           "speedup": {part: best["baseline"][part] / best["now"][part] for part in ("render", "ink")},
           "rounds_us": times, "uptime": subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()}
    print(json.dumps({k: v for k, v in out.items() if k != "rounds_us"}, indent=2))
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
