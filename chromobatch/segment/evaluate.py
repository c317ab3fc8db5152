"""Measuring a segmenter on an annotated split: the figures of docs/results.md (instance F1, precision,
recall and AP at IoU 0.5, exact / within +-1 count rates, mean absolute count error) and the time per image."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from chromobatch.segment.base import Segmenter
from chromobatch.segment.data import load_set
from chromobatch.segment.metrics import SetScore, score_image


def evaluate_segmenter(seg: Segmenter, data: Path, split: str | None = "test",
                       limit: int | None = None) -> dict[str, Any]:
    """Segment every image of the split, score it against its polygons; time covers `segment` only."""
    items = load_set(Path(data), split, limit=limit)
    scores = []
    seconds = 0.0
    for a in items:
        t0 = time.perf_counter()
        inst = seg.segment(a.grey)
        seconds += time.perf_counter() - t0
        scores.append(score_image(inst, a.instances, a.name))
    s = SetScore(scores)
    return {"segmenter": f"{seg.name} {seg.version}".strip(), "data": str(data), "split": split,
            "summary": s.summary(), "seconds_per_image": seconds / max(1, len(items)),
            "per_image": [{"name": i.name, "annotated": i.n_gt, "predicted": i.n_pred, "tp": i.tp,
                           "count": i.count, "flagged": i.flagged} for i in scores]}
