"""`chromobatch demo` (what `make demo` runs): the main job end to end on built-in defaults.

Synthetic cases (normal and abnormal karyotypes; one delivered as whole metaphase images, as a scanner
writes them, the rest as chromosome crops) are written into an incoming folder, the watcher
processes them once with the shipped default model into a SQLite database, and a table of the cases with
their suggested karyotypes and report paths is returned for printing.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

from chromobatch.config import Settings
from chromobatch.errors import ChromobatchError
from chromobatch.store.db import Case, connect
from chromobatch.synth.cases import generate_case

log = logging.getLogger(__name__)

#: Case plan of the demo: (case id, karyotype of each cell); cells beyond the list repeat the last entry.
DEMO_CASES: list[tuple[str, list[str]]] = [
    ("DEMO-01", ["46,XY"]),
    ("DEMO-02", ["46,XX"]),
    ("DEMO-03", ["47,XY,+21"]),
    ("DEMO-04", ["47,XX,+18"]),
    ("DEMO-05", ["45,X"]),
    ("DEMO-06", ["47,XXY", "47,XXY", "46,XY"]),
    ("DEMO-07", ["46,XY"]),
]
#: Cases delivered as whole metaphase images (one per cell, as a scanner writes them), not as crops: the
#: watcher detects, segments and counts them before classifying.
METAPHASE_CASES = {"DEMO-07"}
MARKER = ".chromobatch-demo"


@dataclass
class DemoRow:
    case_id: str
    truth: str
    suggested: str | None
    status: str
    cells: int
    chromosomes: int
    report: str | None


def _fresh_folder(folder: Path) -> None:
    """Start from an empty demo folder; only a folder the demo made itself is ever wiped."""
    if folder.exists() and any(folder.iterdir()):
        if not (folder / MARKER).exists():
            raise ChromobatchError(f"{folder} exists and was not made by `chromobatch demo`; not touching it",
                                   hint="Pass --out with a new or empty folder.")
        shutil.rmtree(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / MARKER).write_text("made by chromobatch demo; safe to delete\n")


def run_demo(out: Path, settings: Settings, *, cells: int = 3, seed: int = 0, fmt: str = "png") -> list[DemoRow]:
    from chromobatch.service.watch import watch

    out = out.resolve()
    _fresh_folder(out)
    incoming = out / "incoming"
    incoming.mkdir()
    truths: dict[str, str] = {}
    for i, (case_id, plan) in enumerate(DEMO_CASES):
        kts = [plan[min(k, len(plan) - 1)] for k in range(cells)]
        whole = case_id in METAPHASE_CASES
        case = generate_case(incoming, case_id, cells=cells, fmt="png" if whole or fmt == "mixed" and not i % 2
                             else ("dicom" if fmt == "mixed" else fmt), karyotype=kts, seed=seed + i,
                             metaphase="flat" if whole else None)
        truths[case_id] = json.loads((case / "truth.json").read_text())["karyotype"]
        (case / "READY").touch()
    db_path = out / "demo.sqlite"
    cfg = Settings(**{**settings.as_dict(), "db": str(db_path), "processed_dir": str(out / "processed"),
                      "failed_dir": str(out / "failed"), "reports_dir": str(out / "reports"), "workers": 1})
    code = watch(incoming, cfg, once=True, reports_dir=out / "reports")
    if code != 0:
        raise ChromobatchError(f"the watcher exited with code {code}")
    database = connect(db_path)
    rows = []
    try:
        with database.session() as s:
            for case_id, truth in truths.items():
                found = s.query(Case).filter_by(case_id=case_id).one_or_none()
                if found is None:
                    rows.append(DemoRow(case_id, truth, None, "missing", 0, 0, None))
                    continue
                n = sum(len(c.chromosomes) for c in found.cells)
                reports = sorted((out / "reports").glob(f"{case_id}*.pdf"))
                rows.append(DemoRow(case_id, truth, found.karyotype, found.status, len(found.cells), n,
                                    str(reports[0]) if reports else None))
    finally:
        database.dispose()
    return rows
