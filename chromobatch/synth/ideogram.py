"""The GRCh38 ideogram that synthetic chromosomes are drawn from: cytoband tables at 400, 550 and 850 bands.

The tables are vendored in ``chromobatch/data/cytoband`` (NCBI via eweitz/ideogram, CC0); a chromosome's
length is its ISCN length, its centromere sits at the ``acen`` bands and its band pattern follows ``gieStain``.
"""

from __future__ import annotations

import csv
import functools
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from chromobatch import CLASSES, normalise_label
from chromobatch.errors import ConfigError

DATA_DIR = Path(__file__).resolve().parents[1] / "data" / "cytoband"
RESOLUTIONS: tuple[int, ...] = (400, 550, 850)
ACROCENTRIC = frozenset({"13", "14", "15", "21", "22"})


@dataclass(frozen=True)
class Band:
    """One cytoband of the ideogram; start/stop are ISCN length units from pter."""

    name: str
    stain: str
    start: float
    stop: float

    @property
    def arm(self) -> str:
        return self.name[:1]


@functools.cache
def _ideogram(resolution: int) -> dict[str, tuple[Band, ...]]:
    if resolution not in RESOLUTIONS:
        raise ConfigError(f"band resolution must be one of {RESOLUTIONS}, got {resolution!r}")
    path = DATA_DIR / f"ncbi_GRCh38_{resolution}band_cytoband.tsv"
    bands: dict[str, list[Band]] = {c: [] for c in CLASSES}
    with path.open(newline="") as fh:
        for row in csv.reader(fh, delimiter="\t"):
            if not row or row[0].startswith("#"):
                continue
            label = normalise_label(row[0])
            bands[label].append(Band(row[3], row[4], float(row[5]), float(row[6])))
    for label, items in bands.items():
        if not items or not any(b.stain == "acen" for b in items):
            raise ConfigError(f"cytoband table {path.name} lacks chromosome {label} or its centromere")
        items.sort(key=lambda b: b.start)
    return {label: tuple(items) for label, items in bands.items()}


def load_ideogram(resolution: int = 400) -> dict[str, list[Band]]:
    """The GRCh38 ideogram at 400, 550 or 850 bands: class name -> bands from pter to qter (cached)."""
    return {label: list(bands) for label, bands in _ideogram(resolution).items()}


def iscn_length(label: str, resolution: int = 400) -> float:
    """Total ISCN length of a chromosome (the same at every band level)."""
    return _ideogram(resolution)[check_label(label)][-1].stop


@dataclass(frozen=True)
class BandedChromosome:
    """One chromosome's bands as arrays, the form the renderer samples along the axis."""

    label: str
    length: float
    starts: np.ndarray
    stains: tuple[str, ...]
    names: tuple[str, ...]
    centromere: float  # p/q boundary
    acen_half: float  # half the extent of the acen bands


@functools.cache
def banded_chromosome(label: str, resolution: int) -> BandedChromosome:
    """The bands of chromosome ``label`` (a class name) at one band level (cached)."""
    bands = _ideogram(resolution)[label]
    acen = [b for b in bands if b.stain == "acen"]
    p_acen = [b for b in acen if b.arm == "p"]
    centromere = p_acen[-1].stop if p_acen else acen[0].start
    return BandedChromosome(label, bands[-1].stop, np.array([b.start for b in bands]),
                            tuple(b.stain for b in bands), tuple(b.name for b in bands), centromere,
                            (acen[-1].stop - acen[0].start) / 2)


def check_label(label: str | int) -> str:
    """The class name of ``label`` (1-22, X, Y; chr prefixes allowed), or a ConfigError."""
    try:
        return normalise_label(label)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
