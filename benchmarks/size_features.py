"""Which size measurement, relative to the cell, best complements a fit-preprocessed image model?

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/size_features.py --model models/default \
        --manifest /work/data/g612/manifest.csv --json size-features.json

For each candidate measurement m (crop's longest side; length after turning upright; chromosome area;
ink = integrated darkness, `chromobatch.ml.sizeprior.ink`), log(m / median m of the cell) gets a Gaussian per
class (a full covariance for combinations) fitted on the train split; the image model's log-probabilities
plus weight x that log-likelihood are scored on the val split for every weight, and the weight best on val
(ties: the smaller) is then scored on the test split. The model's own size prior, if any, is not used.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from chromobatch.ml.folders import load_model  # noqa: E402
from chromobatch.ml.geometry import background_level, chromosome_mask, upright  # noqa: E402
from chromobatch.ml.sizeprior import WEIGHTS, ink, relative_inks  # noqa: E402
from chromobatch.training.records import load_records  # noqa: E402

FEATURES = ("longest_side", "upright_length", "area", "ink")
COMBOS = (("longest_side",), ("upright_length",), ("area",), ("ink",), ("upright_length", "ink"),
          ("upright_length", "area", "ink"), FEATURES)


def measure(crop: np.ndarray) -> list[float]:
    bg, noise = background_level(crop)
    return [float(max(crop.shape)), float(upright(crop)[0].shape[0]),
            float(chromosome_mask(crop, bg, noise).sum()), ink(crop)]


def relative_to_cell(values: np.ndarray, cells: list[str]) -> np.ndarray:
    """log(value / cell median) per column, as the size prior computes it for ink; NaN for non-positive values."""
    return np.stack([relative_inks(col, cells, min_cell=1) for col in values.T], axis=1)


def gaussian_ll(rel: np.ndarray, y: np.ndarray, train: np.ndarray) -> np.ndarray:
    ok = np.isfinite(rel).all(1)
    ll = np.zeros((len(y), 24))
    d = rel.shape[1]
    for k in range(24):
        z = rel[train & ok & (y == k)]
        mean = z.mean(0)
        cov = np.cov(z.T).reshape(d, d) + 1e-4 * np.eye(d)
        diff = np.where(ok[:, None], rel - mean, 0.0)
        ll[:, k] = -0.5 * np.einsum("ni,ij,nj->n", diff, np.linalg.inv(cov), diff) - 0.5 * np.linalg.slogdet(cov)[1]
    ll[~ok] = 0.0
    return ll


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=REPO / "models" / "default")
    ap.add_argument("--manifest", type=Path, required=True)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    t0 = time.time()
    recs = load_records(args.manifest)
    y = np.array([r.label for r in recs])
    split = np.array([r.split for r in recs])
    rel = relative_to_cell(np.array([measure(r.crop) for r in recs]), [r.cell_key for r in recs])
    model = load_model(args.model)
    probs = np.zeros((len(recs), 24))
    scored = np.flatnonzero(np.isin(split, ["val", "test"]))
    probs[scored] = model.predict([recs[i].crop for i in scored], batch_size=128)[0]  # image model alone
    logp = np.log(np.clip(probs, 1e-12, None))
    val, test = split == "val", split == "test"

    def acc(score: np.ndarray, mask: np.ndarray) -> float:
        return float((score[mask].argmax(1) == y[mask]).mean())

    rows = {"image model alone": {"weight": 0.0, "val": acc(logp, val), "test": acc(logp, test)}}
    for combo in COMBOS:
        ll = gaussian_ll(rel[:, [FEATURES.index(f) for f in combo]], y, split == "train")
        by_w = {w: acc(logp + w * ll, val) for w in WEIGHTS}
        best = min(w for w, a in by_w.items() if a == max(by_w.values()))
        rows[" + ".join(combo)] = {"weight": best, "val": by_w[best], "test": acc(logp + best * ll, test)}
    result = {"date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"), "model": str(args.model),
              "manifest": str(args.manifest), "n_val": int(val.sum()), "n_test": int(test.sum()), "rows": rows,
              "seconds": round(time.time() - t0, 1)}
    for name, r in rows.items():
        print(f"{name:<40} weight {r['weight']:<4g} val {100 * r['val']:.2f}%  test {100 * r['test']:.2f}%")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
