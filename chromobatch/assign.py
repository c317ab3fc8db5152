"""Karyotype-aware assignment of one cell's chromosomes to class slots.

A normal cell has two of each autosome and XX or XY. Each chromosome goes to one slot so that the total
-log probability is minimal; every class has its normal slots at no cost and one extra slot at a penalty,
so a real trisomy is kept when the scores support it. An autosome slot (or the first X) left empty costs a
loss penalty, so a chromosome is not pushed into a second X or a Y slot just because it looks a bit like
one; a real monosomy is kept when the scores support it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.optimize import linear_sum_assignment

from . import CLASS_INDEX, CLASSES

#: Slots per class at no cost: two of each autosome; X twice and Y once (XX, XY and XXY need no extra).
FREE_SLOTS = {**{c: 2 for c in CLASSES[:22]}, "X": 2, "Y": 1}
#: Default cost (in nats) of placing a chromosome in a class's extra slot (a gain); chosen on the g612
#: validation cells (benchmarks/assignment.py, docs/results.md).
DEFAULT_GAIN_PENALTY = 8.0
#: Default cost (in nats) of leaving an autosome slot or the first X slot empty (a loss).
DEFAULT_LOSS_PENALTY = 8.0
#: Slots whose emptiness is normal: the second X (46,XY) and the Y (46,XX).
OPTIONAL_SLOTS = {("X", 1), ("Y", 0)}
EPS = 1e-6


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
    slot_class: list[int] = []
    slot_cost: list[float] = []  # cost of putting a chromosome there, on top of its -log p
    empty_cost: list[float] = []  # cost of leaving the slot empty
    for name in CLASSES:
        for k in range(FREE_SLOTS[name] + extra_slots):
            slot_class.append(CLASS_INDEX[name])
            gain = k >= FREE_SLOTS[name]
            slot_cost.append(gain_penalty * (k - FREE_SLOTS[name] + 1) if gain else 0.0)
            empty_cost.append(0.0 if gain or (name, k) in OPTIONAL_SLOTS else loss_penalty)
    if n == 0 or n > len(slot_class):
        return Assignment(labels=raw, changed=[False] * n, cost=0.0)
    neglog = -np.log(np.clip(probs, EPS, 1.0))
    real = neglog[:, slot_class] + np.asarray(slot_cost)[None, :]
    # Placeholder rows fill the slots no chromosome takes, at the cost of that slot staying empty.
    placeholders = np.tile(np.asarray(empty_cost), (len(slot_class) - n, 1))
    cost = np.vstack([real, placeholders])
    rows, cols = linear_sum_assignment(cost)
    labels = [""] * n
    for r, c in zip(rows, cols, strict=True):
        if r < n:
            labels[r] = CLASSES[slot_class[c]]
    keep = rows < n
    rows, cols = rows[keep], cols[keep]
    return Assignment(labels=labels, changed=[a != b for a, b in zip(labels, raw, strict=True)],
                      cost=float(cost[rows, cols].sum()))
