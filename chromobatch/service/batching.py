"""Several waiting cases, one forward pass: what a GPU needs to be kept busy by a queue of small cases.

The worker claims up to `cases_per_pass` queued jobs at once, scans each folder here (and cuts its whole
metaphases), and primes the predictor with all their crops in one batched pass (`Predictor.prime`, per
stain model). Each case then runs the ordinary pipeline with its scanned folder: its own transaction, its own
job, committed exactly once; its `predict` call finds its crops' probabilities instead of running the
network. A case that cannot be scanned here is left to its own pipeline run, which reports it as usual.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from chromobatch.config import Settings
from chromobatch.errors import ChromobatchError
from chromobatch.intake.scan import ScannedCase
from chromobatch.ml.predict import Predictor
from chromobatch.ml.preprocess import chromosome_length
from chromobatch.service.pipeline import scan_input
from chromobatch.store.db import Database

log = logging.getLogger(__name__)

#: settings.batch_cases = 0 (auto): this many cases per pass on a GPU; on the CPU one case already fills a batch.
GPU_CASES_PER_PASS = 8


def cases_per_pass(settings: Settings, predictor: Any) -> int:
    if settings.batch_cases > 0:
        return settings.batch_cases
    device = getattr(getattr(predictor, "model", None), "device", None)
    return GPU_CASES_PER_PASS if getattr(device, "type", "cpu") == "cuda" else 1


def scan_and_prime(database: Database, folders: dict[int, Path], predictor: Predictor,
                   settings: Settings) -> dict[int, ScannedCase]:
    """Scan each folder (key: the job id) and predict all their crops in one pass per stain model.

    Returns the scanned cases to hand to the pipeline; a folder that fails to scan is left out."""
    scanned: dict[int, ScannedCase] = {}
    groups: dict[int, tuple[Predictor, list[np.ndarray], list[float | None]]] = {}
    for key, folder in folders.items():
        try:
            case = scan_input(database, Path(folder), settings, mapper=predictor.renderer.map)
        except (ChromobatchError, OSError) as exc:
            log.info("case folder %s is left to its own run (%s)", Path(folder).name, exc)
            continue
        scanned[key] = case
        model = predictor.for_polarity(case.meta.get("polarity"))
        _, crops, medians = groups.setdefault(id(model), (model, [], []))
        by_cell: dict[str, list[float]] = defaultdict(list)
        for a in case.accepted:
            by_cell[a.cell].append(chromosome_length(a.crop))
        for a in case.accepted:
            crops.append(a.crop)
            # cell-mode models: the folder's median; a case whose cell also holds stored crops gets another
            # median in the pipeline and simply misses its primed result (predicted there as usual)
            medians.append(float(np.median(by_cell[a.cell])) if model.model.spec.mode == "cell" else None)
    for model, crops, medians in groups.values():
        if crops:
            model.prime(crops, medians)
            log.debug("one forward pass for %d crops of %d cases", len(crops), len(scanned))
    return scanned


def forget(predictor: Predictor, scanned: dict[int, ScannedCase]) -> None:
    """After the batch: drop primed results no case took (from each stain model that was primed)."""
    seen = set()
    for case in scanned.values():
        model = predictor.for_polarity(case.meta.get("polarity"))
        if id(model) not in seen:
            seen.add(id(model))
            model.forget_primed()
