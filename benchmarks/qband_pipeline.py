"""The bioimlab test metaphases (and a few g612 test cells) through the pipeline, as a lab would deliver them.

    .venv/bin/python benchmarks/qband_pipeline.py --bioimlab /work/data/bioimlab/manifest.csv \\
        [--g612 /work/data/g612/manifest.csv --g612-cells 5] [--split test] [--json out.json]

Each metaphase becomes one case folder (`BIO<n>/cell01/*.bmp`, the files as they are: Q-band, bright on
black), each g612 cell one case of G-band TIFFs. Every case is processed by `service.pipeline.process_case`
with the model `registry.register.load_predictor` gives a fresh SQLite database without --model, so the
stain-aware choice decides which shipped model reads it (models/default for G-band, models/qband for
Q-band). Scored against the manifest's labels: top-1 of the model's own class (image model with its size
prior) and of the class after the per-cell karyotype-aware assignment, per stain, and which model read
each case.
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import sys
import tempfile
import time
from collections import Counter, defaultdict
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from chromobatch.config import load_settings  # noqa: E402
from chromobatch.registry.register import load_predictor  # noqa: E402
from chromobatch.service.pipeline import process_case  # noqa: E402
from chromobatch.store import db  # noqa: E402


def cells_of(manifest: Path, split: str) -> dict[str, list[tuple[Path, str]]]:
    """cell -> [(image file, label)] of one split."""
    cells: dict[str, list[tuple[Path, str]]] = defaultdict(list)
    with manifest.open() as f:
        for row in csv.DictReader(f):
            if row["split"] == split:
                cells[f"{row.get('patient') or ''}/{row['cell']}"].append((manifest.parent / row["path"], row["label"]))
    return dict(sorted(cells.items()))


def write_cases(root: Path, prefix: str, cells: dict[str, list[tuple[Path, str]]]) -> dict[str, dict[str, str]]:
    """One case folder per cell; returns case id -> {file name in the case: true label}."""
    truth: dict[str, dict[str, str]] = {}
    for i, (_, files) in enumerate(cells.items()):
        case_id = f"{prefix}{i:03d}"
        cell = root / case_id / "cell01"
        cell.mkdir(parents=True)
        truth[case_id] = {}
        for src, label in files:
            shutil.copyfile(src, cell / src.name)
            truth[case_id][f"cell01/{src.name}"] = label
    return truth


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bioimlab", type=Path, required=True)
    ap.add_argument("--g612", type=Path, default=None)
    ap.add_argument("--g612-cells", type=int, default=5)
    ap.add_argument("--split", default="test")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="qband-pipeline-"))
    truth = write_cases(work / "cases", "BIO", cells_of(args.bioimlab, args.split))
    stain_of = dict.fromkeys(truth, "Q")
    if args.g612 is not None:
        g = dict(list(cells_of(args.g612, args.split).items())[: args.g612_cells])
        g_truth = write_cases(work / "cases", "G612", g)
        truth.update(g_truth)
        stain_of.update(dict.fromkeys(g_truth, "G"))
    database = db.connect(work / "cases.sqlite")
    settings = load_settings({})
    predictor = load_predictor(database, settings)
    t0 = time.perf_counter()
    for case_id in truth:
        process_case(database, work / "cases" / case_id, predictor=predictor, settings=settings)
    seconds = time.perf_counter() - t0

    hits: dict[str, Counter[str]] = defaultdict(Counter)
    read_by: dict[str, Counter[str]] = defaultdict(Counter)
    cells_exact: Counter[str] = Counter()
    with database.session() as s:
        for case in s.query(db.Case):
            stain = stain_of[case.case_id]
            model = s.get(db.ModelVersion, case.model_version_id)
            assert model is not None
            read_by[stain][f"{model.name} {model.version} (summary stain {case.summary['model']['stain']})"] += 1
            rows = (s.query(db.Chromosome.source_file, db.Prediction.label, db.Prediction.assigned_label)
                    .join(db.Prediction, db.Prediction.chromosome_id == db.Chromosome.id)
                    .filter(db.Chromosome.case_pk == case.id, db.Prediction.model_version_id == case.model_version_id))
            exact = True
            for source, raw, assigned in rows:
                want = truth[case.case_id][source]
                hits[stain]["n"] += 1
                hits[stain]["raw"] += raw == want
                hits[stain]["assigned"] += assigned == want
                exact &= assigned == want
            cells_exact[stain] += exact
    out = {"date": datetime.now(UTC).isoformat(timespec="seconds"), "split": args.split, "seconds": round(seconds, 1),
           "by_stain": {st: {"cases": sum(read_by[st].values()), "chromosomes": h["n"],
                             "top1_model": round(h["raw"] / h["n"], 5), "top1_after_assignment":
                             round(h["assigned"] / h["n"], 5), "cells_all_correct": cells_exact[st],
                             "read_by": dict(read_by[st])} for st, h in sorted(hits.items())}}
    text = json.dumps(out, indent=2)
    print(text)
    if args.json is not None:
        args.json.write_text(text + "\n")
    database.dispose()
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
