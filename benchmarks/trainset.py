"""Building the training set from the database: `retrain.build_training_set` over N labelled chromosomes.

    .venv/bin/python benchmarks/trainset.py [--n 10000] [--db PATH_OR_URL] [--repeats 3]

The database rows are generated quickly (bulk inserts of cases, cells, chromosomes with PNG crops of
realistic sizes, one imported label each plus a reviewed correction for every tenth) and are not timed;
only the build is timed: one query for the cases, one streamed query for chromosome + newest label,
PNG decoding, patient-level split. Target: under 30 s for 10,000 chromosomes.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from sqlalchemy import insert, select

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from common import cpu_name  # noqa: E402

from chromobatch import CLASSES  # noqa: E402
from chromobatch.intake.imaging import encode_png  # noqa: E402
from chromobatch.registry.retrain import build_training_set  # noqa: E402
from chromobatch.store import db  # noqa: E402

TARGET_S = 30.0


def crop_pool(size: int = 256, seed: int = 0) -> list[bytes]:
    """Banded rods 20-140 px long, 8-16 px wide: the size range of normalised crops at ~550 bands."""
    rng = np.random.default_rng(seed)
    pool = []
    for _ in range(size):
        length, width = int(rng.integers(20, 140)), int(rng.integers(8, 16))
        img = np.full((length + 8, width + 8), 245, np.uint8)
        body = np.full((length, width), 150.0)
        for start in range(0, length, 10):
            body[start:start + 5] = 60
        img[4:4 + length, 4:4 + width] = np.clip(body + rng.normal(0, 4, body.shape), 0, 255).astype(np.uint8)
        pool.append(encode_png(img))
    return pool


def populate(database: db.Database, n: int, *, per_cell: int = 46, cells_per_case: int = 3) -> None:
    """n labelled chromosomes in cases of 3 cells x 46; half the cases carry a DICOM PatientID (two per patient)."""
    pool = crop_pool()
    n_cases = -(-n // (per_cell * cells_per_case))
    now = datetime.now(UTC)
    with database.session() as s:
        s.execute(insert(db.Case), [
            {"case_id": f"BENCH{i:05d}", "source_path": f"/bench/{i}", "status": "done", "received_at": now,
             "meta": {"dicom": {"PatientID": f"PAT{i // 4:05d}"}} if i % 2 else {}} for i in range(n_cases)])
        case_pks = [pk for (pk,) in s.execute(select(db.Case.id).order_by(db.Case.id))]
        s.execute(insert(db.Cell), [{"case_pk": pk, "name": f"cell{c:02d}", "index": c}
                                    for pk in case_pks for c in range(cells_per_case)])
        cells = s.execute(select(db.Cell.id, db.Cell.case_pk).order_by(db.Cell.id)).all()
        rows = []
        for k in range(n):
            cell_id, case_pk = cells[k // per_cell]
            rows.append({"case_pk": case_pk, "cell_id": cell_id, "source_file": f"c{k % per_cell:02d}.png",
                         "sha256": f"{k:064x}", "width": 10, "height": 40, "polarity": "dark_on_light",
                         "crop_png": pool[k % len(pool)], "created_at": now})
        for start in range(0, n, 2000):
            s.execute(insert(db.Chromosome), rows[start:start + 2000])
        ids = [cid for (cid,) in s.execute(select(db.Chromosome.id).order_by(db.Chromosome.id))]
        s.execute(insert(db.Label), [{"chromosome_id": cid, "label": CLASSES[i % len(CLASSES)], "source": "imported",
                                      "created_at": now} for i, cid in enumerate(ids)])
        first = dict(s.execute(select(db.Label.chromosome_id, db.Label.id)).all())
        s.execute(insert(db.Label), [{"chromosome_id": cid, "label": CLASSES[(i + 1) % len(CLASSES)],
                                      "source": "reviewed", "reviewer": "bench", "supersedes_id": first[cid],
                                      "created_at": now} for i, cid in enumerate(ids) if i % 10 == 0])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=10_000, help="labelled chromosomes")
    ap.add_argument("--db", default=None, help="SQLite path or PostgreSQL URL (default: a temporary SQLite file; "
                                               "a PostgreSQL database must be empty and migrated)")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        target = args.db or os.path.join(tmp, "bench.sqlite")
        database = db.connect(target)
        t0 = time.perf_counter()
        populate(database, args.n)
        print(f"generated {args.n} labelled chromosomes in {time.perf_counter() - t0:.1f}s ({database.dialect})")
        times = []
        for _ in range(args.repeats):
            t = time.perf_counter()
            ts = build_training_set(database)
            times.append(time.perf_counter() - t)
        database.dispose()
    assert len(ts.train) + len(ts.val) == args.n
    best, median = min(times), sorted(times)[len(times) // 2]
    print(f"training set: {len(ts.train)} train / {len(ts.val)} val chromosomes, {ts.n_patients} patients "
          f"({ts.n_val_patients} validate)")
    print(f"build: best {best:.2f}s, median {median:.2f}s over {args.repeats} runs "
          f"({args.n / best:.0f} chromosomes/s); target < {TARGET_S:.0f}s: {'met' if median < TARGET_S else 'MISSED'}")
    print(f"machine: {cpu_name()}, {os.cpu_count()} cores; load average {os.getloadavg()[0]:.1f}; "
          f"{datetime.now(UTC):%Y-%m-%d}")


if __name__ == "__main__":
    main()
