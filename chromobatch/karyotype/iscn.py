"""Per-cell karyotypes and the case's suggested ISCN karyotype.

Clonality rule (ISCN): a gain counts as clonal when seen in at least 2 cells, a loss in at least 3 cells.
Non-clonal changes are reported as findings but do not enter the karyotype.

Incomplete input: a cell one of whose files could not be used may lack a chromosome that the lab did
image, so its losses are never reported without that mark (in the cell's karyotype, in the findings, and
in the case's suggested karyotype).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from chromobatch import CLASSES

AUTOSOMES = CLASSES[:22]
MIN_CELLS_GAIN = 2
MIN_CELLS_LOSS = 3


@dataclass
class CellKaryotype:
    cell: str
    count: int
    sex: str
    gains: list[str] = field(default_factory=list)
    losses: list[str] = field(default_factory=list)
    #: Files of this cell that could not be used (a missing chromosome may be one of them).
    files_not_used: int = 0
    #: Chromosomes (estimated) in objects of a whole metaphase that could not be separated with confidence:
    #: kept for review, not classified, so a missing chromosome may be in one of them too.
    clustered: int = 0

    @property
    def iscn(self) -> str:
        return format_karyotype(self.count, self.sex, self.gains, self.losses)

    @property
    def shown(self) -> str:
        """The ISCN text as reports show it: marked when the cell's input was incomplete."""
        return (self.iscn + (f" {INCOMPLETE_MARK}" if self.files_not_used else "")
                + (f" {cluster_note(self.clustered)}" if self.clustered else ""))

    @property
    def unsure(self) -> bool:
        """A loss in this cell may be a chromosome that was not classified (a file not used, a cluster)."""
        return bool(self.files_not_used or self.clustered)


INCOMPLETE_MARK = "(incomplete input)"


def incomplete_note(files: int) -> str:
    """What the case's suggested karyotype carries when files of the case could not be used."""
    return f"(incomplete input: {files} file{'s' * (files != 1)} not used)"


def cluster_note(chromosomes: int) -> str:
    """What a karyotype carries when chromosomes sit in clusters that were kept for review, not classified."""
    return f"(cluster: about {chromosomes} chromosome{'s' * (chromosomes != 1)} not classified)"


def format_karyotype(count: int, sex: str, gains: list[str], losses: list[str]) -> str:
    """ISCN order: count, sex chromosomes, then autosomal changes by chromosome number."""
    changes = sorted([(int(c), "+" + c) for c in gains] + [(int(c), "-" + c) for c in losses])
    return ",".join([str(count), sex or "-"] + [text for _, text in changes])


def cell_karyotype(cell: str, labels: list[str]) -> CellKaryotype:
    counts = Counter(labels)
    sex = "X" * counts.get("X", 0) + "Y" * counts.get("Y", 0)
    gains: list[str] = []
    losses: list[str] = []
    for c in AUTOSOMES:
        k = counts.get(c, 0)
        gains += [c] * max(k - 2, 0)
        losses += [c] * max(2 - k, 0)
    return CellKaryotype(cell=cell, count=len(labels), sex=sex, gains=gains, losses=losses)


def _sex_changes(sex: str, baseline: str) -> tuple[list[str], list[str]]:
    """Sex chromosomes gained and lost relative to the case's baseline complement."""
    have, base = Counter(sex), Counter(baseline)
    return list((have - base).elements()), list((base - have).elements())


def summarise(cells: list[CellKaryotype], *, case_files_not_used: int = 0) -> dict[str, Any]:
    """Counts per cell, modal number, clonal abnormalities and the suggested karyotype.

    case_files_not_used: rejected files that belong to no analysed cell (their cell is unknown, or every
    file of a cell was rejected); they mark the case's karyotype as incomplete too.
    """
    if not cells:
        return {"cells": [], "modal_number": None, "karyotype": None, "findings": ["no cells analysed"]}
    counts = Counter(c.count for c in cells)
    modal = max(counts.items(), key=lambda kv: (kv[1], kv[0] == 46))[0]
    sexes = Counter(c.sex for c in cells)
    # The baseline sex complement: the most frequent two-chromosome complement, else the most frequent.
    normal_sexes = {s: n for s, n in sexes.items() if s in ("XX", "XY")}
    baseline = max(normal_sexes.items(), key=lambda kv: kv[1])[0] if normal_sexes else sexes.most_common(1)[0][0]

    events: list[tuple[str, ...]] = []  # per cell: its changes as tokens like "+21", "-7", "+X", "-X"
    for c in cells:
        sex_gain, sex_loss = _sex_changes(c.sex, baseline)
        tokens = (["+" + g for g in c.gains] + ["-" + x for x in c.losses]
                  + ["+" + g for g in sex_gain] + ["-" + x for x in sex_loss])
        events.append(tuple(sorted(tokens)))
    seen = Counter(tok for ev in events for tok in set(ev))
    clonal = {tok for tok, n in seen.items()
              if (tok[0] == "+" and n >= MIN_CELLS_GAIN) or (tok[0] == "-" and n >= MIN_CELLS_LOSS)}
    if len(cells) == 1:
        clonal = set(seen)  # one cell: report what it shows; clonality cannot be established

    # A count change seen in enough cells is clonal even when the extra chromosome is identified differently
    # from cell to cell: it is reported as an unidentified marker (+mar), as ISCN does.
    extra = [c.count - _clone_count(baseline, [t for t in ev if t in clonal]) for c, ev in zip(cells, events,
                                                                                                    strict=True)]
    marker_cells = sum(1 for d in extra if d > 0)
    clones: Counter[str] = Counter()
    for ev, d in zip(events, extra, strict=True):
        kept = [t for t in ev if t in clonal]
        markers = d if d > 0 and (marker_cells >= MIN_CELLS_GAIN or len(cells) == 1) else 0
        clones[_clone_karyotype(baseline, kept, markers)] += 1
    findings = []
    for tok, n in sorted(seen.items(), key=lambda kv: (-kv[1], kv[0])):
        what = _describe(tok)
        status = "clonal" if tok in clonal else "non-clonal"
        unsure = sum(1 for c, ev in zip(cells, events, strict=True) if c.unsure and tok in ev)
        if tok[0] == "-" and unsure:
            status += f"; {unsure} of these cell{'s' * (unsure != 1)} with incomplete input or clusters"
        findings.append(f"{what} in {n}/{len(cells)} cells ({status})")
    missing_cells = sum(1 for d in extra if d < 0)
    if missing_cells >= MIN_CELLS_LOSS:
        findings.append(f"fewer chromosomes than the karyotype shows, losses of varying identity, in "
                        f"{missing_cells}/{len(cells)} cells")
    if marker_cells >= MIN_CELLS_GAIN:
        findings.append(f"extra chromosome of varying identity in {marker_cells}/{len(cells)} cells (+mar)")
    if len(cells) == 1:
        findings.append("single cell analysed: clonality not established")
    not_used = sum(c.files_not_used for c in cells) + case_files_not_used
    if not_used:
        short = sum(1 for c in cells if c.files_not_used)
        findings.append(f"incomplete input: {not_used} file{'s' * (not_used != 1)} not used"
                        + (f" (in {short}/{len(cells)} cells)" if short else "")
                        + "; a chromosome missing from a cell may be one of them")
    clustered = sum(c.clustered for c in cells)
    if clustered:
        findings.append(f"clusters kept for review: about {clustered} chromosome{'s' * (clustered != 1)} in "
                        f"{sum(1 for c in cells if c.clustered)}/{len(cells)} cells not classified")
    normal_kt = _clone_karyotype(baseline, [])
    if len(clones) == 1:
        karyotype = next(iter(clones))
    else:
        ordered = sorted(clones.items(), key=lambda kv: (kv[0] == normal_kt, -kv[1], kv[0]))
        karyotype = "mos " + "/".join(f"{kt}[{n}]" for kt, n in ordered)
    if not_used:
        karyotype += " " + incomplete_note(not_used)
    if clustered:
        karyotype += " " + cluster_note(clustered)
    return {
        "cells": [{"cell": c.cell, "count": c.count, "karyotype": c.shown, "sex": c.sex, "gains": c.gains,
                   "losses": c.losses, "files_not_used": c.files_not_used, "clustered": c.clustered}
                  for c in cells],
        "modal_number": modal,
        "counts": dict(sorted(counts.items())),
        "karyotype": karyotype,
        "findings": findings,
        "files_not_used": not_used,
        "clustered": clustered,
    }


def _clone_count(baseline: str, tokens: list[str]) -> int:
    return int(_clone_karyotype(baseline, tokens).split(",", 1)[0])


def _clone_karyotype(baseline: str, tokens: list[str], markers: int = 0) -> str:
    sex = Counter(baseline)
    gains, losses = [], []
    for t in tokens:
        sign, what = t[0], t[1:]
        if what in ("X", "Y"):
            if sign == "+":
                sex[what] += 1
            else:
                sex[what] -= 1
        elif sign == "+":
            gains.append(what)
        else:
            losses.append(what)
    sex_text = "X" * max(sex["X"], 0) + "Y" * max(sex["Y"], 0)
    count = 44 + len(sex_text) + len(gains) - len(losses) + markers
    text = format_karyotype(count, sex_text, gains, losses)
    return text + ",+mar" * markers


def _describe(token: str) -> str:
    sign, what = token[0], token[1:]
    if what in ("X", "Y"):
        return f"{'gain' if sign == '+' else 'loss'} of {what}"
    return f"{'trisomy' if sign == '+' else 'monosomy'} {what}"
