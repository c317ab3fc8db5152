"""Report rendering time: a 20-cell case (46 synthetic chromosomes per cell) to PDF (+ Encapsulated PDF).

    .venv/bin/python benchmarks/report.py [--cells 20] [--repeats 3] [--png]

Crops come from chromobatch.synth (random angles, so every chromosome is rotated upright); they are stored
in a fresh SQLite file with predictions and a model version before the clock starts. Timed: the whole
`render_case_report` call (database read, PNG decoding, rotation, layout, PDF, DICOM). Target: < 10 s on
2 cores. Prints the best and median wall-clock seconds of the repeats, and the CPU seconds (this process),
which stay meaningful when other work shares the cores.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from common import cpu_name  # noqa: E402

from chromobatch import CLASSES  # noqa: E402
from chromobatch.intake.imaging import encode_png, normalise  # noqa: E402
from chromobatch.report.render import render_case_report  # noqa: E402
from chromobatch.store import db  # noqa: E402
from chromobatch.synth.render import render_cell  # noqa: E402


def build_case(database: db.Database, cells: int, seed: int = 0) -> None:
    """A processed DICOM case: `cells` cells of 46,XY with confident predictions (2 low-confidence per cell)."""
    rng = np.random.default_rng(seed)
    with database.session() as s:
        mv = db.ModelVersion(name="bench", version="1", backbone="resnet18", file="m",
                             sha256=hashlib.sha256(b"bench").hexdigest(), status="active")
        s.add(mv)
        s.flush()
        case = db.Case(case_id="BENCH20", source_path="/bench", status="done", input_format="dicom",
                       meta={"dicom": {"PatientID": "BENCH", "StudyInstanceUID": "1.2.826.0.1.3680043.8.498.9"}},
                       model_version_id=mv.id, karyotype="46,XY")
        s.add(case)
        s.flush()
        summary_cells = []
        for c in range(cells):
            cell = db.Cell(case_pk=case.id, name=f"cell{c + 1:02d}", index=c)
            s.add(cell)
            s.flush()
            labels, crops, _ = render_cell("46,XY", rng)
            for k, (lab, raw) in enumerate(zip(labels, crops, strict=True)):
                crop, pol = normalise(raw)
                png = encode_png(crop)
                chrom = db.Chromosome(case_pk=case.id, cell_id=cell.id, source_file=f"{cell.name}/{k:02d}.dcm",
                                      sha256=hashlib.sha256(png + bytes([c, k])).hexdigest(), width=crop.shape[1],
                                      height=crop.shape[0], polarity=pol, crop_png=png)
                s.add(chrom)
                s.flush()
                conf = 0.4 if k < 2 else 0.95
                probs = [0.0] * len(CLASSES)
                probs[CLASSES.index(lab)] = conf
                s.add(db.Prediction(chromosome_id=chrom.id, model_version_id=mv.id, label=lab, assigned_label=lab,
                                    confidence=conf, probabilities=probs,
                                    flags=["low_confidence"] if k < 2 else []))
            summary_cells.append({"cell": cell.name, "count": 46, "karyotype": "46,XY", "gains": [], "losses": [],
                                  "sex": "XY", "flags": []})
        case.summary = {"cells": summary_cells, "modal_number": 46, "karyotype": "46,XY", "findings": [],
                        "model": {"name": mv.name, "version": mv.version, "sha256": mv.sha256}}
        case.processed_at = db.utcnow()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--png", action="store_true", help="Also write the per-cell PNGs (timed).")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        database = db.connect(Path(tmp) / "bench.sqlite")
        t0 = time.perf_counter()
        build_case(database, args.cells)
        print(f"built {args.cells} cells x 46 synthetic chromosomes in {time.perf_counter() - t0:.1f}s")
        times, cpu = [], []
        for _ in range(args.repeats):
            t0, c0 = time.perf_counter(), time.process_time()
            result = render_case_report(database, "BENCH20", Path(tmp) / "BENCH20.pdf",
                                        png_dir=Path(tmp) if args.png else None)
            times.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
        size = result.pdf.stat().st_size
        database.dispose()
    print(f"cpu: {cpu_name()}, {os.cpu_count()} cores")
    print(f"report: {result.pages} pages, {size / 1e6:.1f} MB PDF, DICOM {'yes' if result.dicom else 'no'}")
    print(f"render seconds: best {min(times):.2f}, median {statistics.median(times):.2f} "
          f"({args.repeats} runs; target < 10 s); CPU seconds median {statistics.median(cpu):.2f}")
    print(f"load average (1 min) at the end: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
