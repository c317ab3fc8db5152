"""Karyotype-aware assignment of one cell's chromosomes to class slots.

A normal cell has two of each autosome and XX or XY. Each chromosome goes to one slot so that the total
-log probability is minimal; every class has its normal slots at no cost and one extra slot at a penalty,
so a real trisomy is kept when the scores support it. An autosome slot (or the first X) left empty costs a
loss penalty, so a chromosome is not pushed into a second X or a Y slot just because it looks a bit like
one; a real monosomy is kept when the scores support it. The second sex chromosome takes one slot that may
hold an X or a Y, so XX and XY cost the same and an extra X or Y costs what a trisomy costs.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.optimize import linear_sum_assignment

from chromobatch import CLASS_INDEX, CLASSES

#: Default cost (in nats) of placing a chromosome in a class's extra slot (a gain); chosen on the g612
#: validation cells (benchmarks/assignment.py, docs/results.md).
DEFAULT_GAIN_PENALTY = 8.0
#: Default cost (in nats) of leaving an autosome slot or the first X slot empty (a loss).
DEFAULT_LOSS_PENALTY = 8.0
EPS = 1e-6
SEX_SECOND = -1  # the second sex-chromosome slot: an X or a Y, whichever the scores favour


def _slots(gain_penalty: float, loss_penalty: float, extra_slots: int) -> tuple[list[int], list[float], list[float]]:
    """(class of each slot, cost of filling it, cost of leaving it empty).

    Autosomes: two slots at no cost (empty: a loss) plus extra slots at a gain penalty. Sex chromosomes: the
    first X (empty: a loss), one second sex chromosome that may be X or Y (XX and XY cost the same; empty
    for 45,X), plus extra X and Y slots at the gain penalty, so 47,XXY costs what a trisomy costs.
    """
    cls: list[int] = []
    fill: list[float] = []
    empty: list[float] = []
    for name in CLASSES[:22]:
        for k in range(2 + extra_slots):
            cls.append(CLASS_INDEX[name])
            fill.append(gain_penalty * (k - 1) if k >= 2 else 0.0)
            empty.append(0.0 if k >= 2 else loss_penalty)
    cls += [CLASS_INDEX["X"], SEX_SECOND]
    fill += [0.0, 0.0]
    empty += [loss_penalty, 0.0]
    for name in ("X", "Y"):
        for k in range(extra_slots):
            cls.append(CLASS_INDEX[name])
            fill.append(gain_penalty * (k + 1))
            empty.append(0.0)
    return cls, fill, empty


@dataclass(frozen=True)
class Assignment:
    labels: list[str]
    #: True where the assigned class differs from the raw top-1 class.
    changed: list[bool]
    cost: float


def assign_cell(probs: np.ndarray, *, gain_penalty: float = DEFAULT_GAIN_PENALTY,
                loss_penalty: float = DEFAULT_LOSS_PENALTY, extra_slots: int = 1) -> Assignment:
    """probs [n, 24] (softmax, class order CLASSES) -> one class per chromosome."""
    probs = np.asarray(probs, dtype=np.float64)
    n = probs.shape[0]
    raw = [CLASSES[i] for i in probs.argmax(axis=1)] if n else []
    slot_class, fill, empty = _slots(gain_penalty, loss_penalty, extra_slots)
    if n == 0 or n > len(slot_class):
        return Assignment(labels=raw, changed=[False] * n, cost=0.0)
    neglog = -np.log(np.clip(probs, EPS, 1.0))
    x, y = CLASS_INDEX["X"], CLASS_INDEX["Y"]
    sex_second = np.minimum(neglog[:, x], neglog[:, y])
    columns = np.stack([sex_second if c == SEX_SECOND else neglog[:, c] for c in slot_class], axis=1)
    real = columns + np.asarray(fill)[None, :]
    # Placeholder rows fill the slots no chromosome takes, at the cost of that slot staying empty.
    placeholders = np.tile(np.asarray(empty), (len(slot_class) - n, 1))
    cost = np.vstack([real, placeholders])
    rows, cols = linear_sum_assignment(cost)
    labels = [""] * n
    for r, c in zip(rows, cols, strict=True):
        if r < n:
            k = slot_class[c]
            if k == SEX_SECOND:
                k = x if neglog[r, x] <= neglog[r, y] else y
            labels[r] = CLASSES[k]
    keep = rows < n
    return Assignment(labels=labels, changed=[a != b for a, b in zip(labels, raw, strict=True)],
                      cost=float(cost[rows[keep], cols[keep]].sum()))
