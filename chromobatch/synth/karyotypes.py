"""Karyotypes of synthetic cells: the ISCN names the generator knows and the labels of one cell of each."""

from __future__ import annotations

from collections import Counter

from chromobatch import CLASSES
from chromobatch.errors import ConfigError


def _karyotype(extra: tuple[str, ...], sex: str) -> list[str]:
    autosomes = [str(i) for i in range(1, 23)]
    labels = [a for a in autosomes for _ in range(2)] + list(extra) + list(sex)
    return sorted(labels, key=lambda c: (CLASSES.index(c)))


#: Karyotype name (ISCN) -> labels of one cell, sorted by class.
KARYOTYPES: dict[str, list[str]] = {
    "46,XX": _karyotype((), "XX"),
    "46,XY": _karyotype((), "XY"),
    "47,XX,+13": _karyotype(("13",), "XX"),
    "47,XY,+13": _karyotype(("13",), "XY"),
    "47,XX,+18": _karyotype(("18",), "XX"),
    "47,XY,+18": _karyotype(("18",), "XY"),
    "47,XX,+21": _karyotype(("21",), "XX"),
    "47,XY,+21": _karyotype(("21",), "XY"),
    "45,X": _karyotype((), "X"),
    "47,XXX": _karyotype((), "XXX"),
    "47,XXY": _karyotype((), "XXY"),
    "47,XYY": _karyotype((), "XYY"),
}
NORMAL_KARYOTYPES: tuple[str, ...] = ("46,XX", "46,XY")
ABNORMAL_KARYOTYPES: tuple[str, ...] = tuple(k for k in KARYOTYPES if k not in NORMAL_KARYOTYPES)


def karyotype_labels(name: str) -> list[str]:
    """Labels of one cell with this karyotype (a fresh list, sorted by class)."""
    if name not in KARYOTYPES:
        raise ConfigError(f"unknown karyotype {name!r}; known: {', '.join(KARYOTYPES)}")
    return list(KARYOTYPES[name])


def normal_partner(name: str) -> str:
    """The normal cell line that usually accompanies an abnormal one in a mosaic (same sex)."""
    return "46,XY" if "Y" in name.split(",")[1] else "46,XX"


def case_karyotype(cell_karyotypes: list[str]) -> str:
    """Case-level ISCN: the karyotype, or for mosaics ``mos 47,XXY[2]/46,XY[1]`` (normal line last)."""
    counts = Counter(cell_karyotypes)
    if len(counts) == 1:
        return cell_karyotypes[0]
    order = sorted(counts, key=lambda k: (k in NORMAL_KARYOTYPES, -counts[k], cell_karyotypes.index(k)))
    return "mos " + "/".join(f"{k}[{counts[k]}]" for k in order)


def patient_sex(cell_karyotypes: list[str]) -> str:
    """DICOM PatientSex: M when any cell line has a Y."""
    return "M" if any("Y" in k.split(",")[1] for k in cell_karyotypes) else "F"


