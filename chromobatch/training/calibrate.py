"""Fitting a model's size prior on labelled cells and tuning its weight (`chromobatch calibrate`, and the
end of `chromobatch train`).

Why apart from chromobatch.ml.sizeprior: applying a prior is inference (pure numpy, in ml); fitting one
needs training records and a model folder to write, which is training's business.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from chromobatch import NUM_CLASSES
from chromobatch.ml.folders import attach_size_prior, load_model
from chromobatch.ml.sizeprior import MAX_BROAD, MIN_CELL, MIN_PER_CLASS, MIN_STD, WEIGHTS, SizePrior, ink, relative_inks
from chromobatch.training.records import Record, cell_median_lengths

log = logging.getLogger(__name__)


def record_relative_inks(records: Sequence[Record], min_cell: int = MIN_CELL) -> np.ndarray:
    """log relative ink of every record (NaN where its cell is unknown or too small)."""
    return relative_inks([ink(r.crop) for r in records], [r.cell_key for r in records], min_cell)


def fit(records: Sequence[Record], min_cell: int = MIN_CELL, rel: np.ndarray | None = None) -> SizePrior | None:
    """Per-class statistics from labelled training records in known cells.

    A class with fewer than MIN_PER_CLASS measured crops (say Y in mostly female data) gets a broad Gaussian
    (all classes' mean and spread), so it is neither favoured nor ruled out; with more than MAX_BROAD such
    classes there is too little data and the result is None.
    """
    r = record_relative_inks(records, min_cell) if rel is None else rel
    y = np.array([rec.label for rec in records])
    measured = np.isfinite(r)
    if not measured.any():
        log.info("size prior not fitted: no crop in a known cell with %d or more chromosomes", min_cell)
        return None
    broad_mean, broad_std = float(r[measured].mean()), max(float(r[measured].std()), MIN_STD)
    mean, std, broad = [], [], []
    for k in range(NUM_CLASSES):
        v = r[(y == k) & measured]
        if v.size < MIN_PER_CLASS:
            broad.append(k)
            mean.append(broad_mean)
            std.append(broad_std)
        else:
            mean.append(float(v.mean()))
            std.append(max(float(v.std()), MIN_STD))
    if len(broad) > MAX_BROAD:
        log.info("size prior not fitted: %d classes have fewer than %d measured crops", len(broad), MIN_PER_CLASS)
        return None
    if broad:
        log.info("size prior: %d class(es) with too few measured crops get a broad Gaussian", len(broad))
    return SizePrior(mean=tuple(mean), std=tuple(std), weight=0.0, min_cell=min_cell)


def tune_weight(prior: SizePrior, probs: np.ndarray, rel: np.ndarray, labels: np.ndarray,
                grid: Sequence[float] = WEIGHTS) -> tuple[float, dict[float, float]]:
    """The grid weight with the best validation accuracy (ties: the smaller weight) and every weight's accuracy."""
    y = np.asarray(labels)
    accs = {float(w): float((prior.apply(probs, rel, w).argmax(1) == y).mean()) for w in grid}
    best = max(accs.values())
    return min(w for w, a in accs.items() if a == best), accs


def calibrate(model_folder: str | Path, train_records: Sequence[Record], val_records: Sequence[Record], *,
              device: str = "cpu", min_cell: int = MIN_CELL) -> dict[str, Any]:
    """Fit the size prior on the training cells, tune its weight on the validation cells, store it in the
    model folder (or remove it when weight 0 is best). Returns what was measured (also in metrics.size_prior)."""
    prior = fit(train_records, min_cell)
    val = [r for r in val_records if r.cell_key]
    if prior is None or not val:
        info: dict[str, Any] = {"weight": 0.0, "reason": "too few measured training cells" if prior is None
                                else "no validation records with known cells"}
        attach_size_prior(model_folder, None, info)
        return info
    lm = load_model(model_folder, device=device)
    # without rel_inks, predict gives the image probabilities even when the folder has a prior already
    probs, _ = lm.predict([r.crop for r in val], cell_median_lengths(val) if lm.spec.mode == "cell" else None)
    rel = record_relative_inks(val, min_cell)
    weight, accs = tune_weight(prior, probs, rel, np.array([r.label for r in val]))
    info = {"weight": weight, "val_n": len(val), "val_measured": int(np.isfinite(rel).sum()),
            "val_accuracy_by_weight": {f"{w:g}": round(a, 5) for w, a in accs.items()},
            "val_accuracy_without": round(accs[0.0], 5), "val_accuracy_with": round(accs[weight], 5),
            "train_n": len(train_records)}
    attach_size_prior(model_folder, SizePrior(prior.mean, prior.std, weight, min_cell) if weight > 0 else None, info)
    log.info("size prior: weight %.2f, validation accuracy %.4f -> %.4f (%d crops)", weight, accs[0.0],
             accs[weight], len(val))
    return info
