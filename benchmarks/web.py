"""The web review's latency: the cell view of a 46-chromosome cell, a label change, the case list at 10,000 cases.

    .venv/bin/python benchmarks/web.py [--repeats 20] [--cases 10000]

On a fresh SQLite file: one processed case of one cell with 46 synthetic chromosomes (chromobatch.synth, as
benchmarks/report.py builds it: rotated crops, predictions, 2 low-confidence), a reviewer account, and
--cases more cases (the newest 200 with a cell of 46 chromosomes and predictions each, so that the first page
of the list counts real prediction rows). Requests go through the whole application in process (FastAPI's
TestClient: session cookie, CSRF check, routing, templates, SQL), not over a socket.

Timed, median of --repeats (after one warm-up request each, not counted):
* cell view: GET /cells/{pk} (layout from report.layout, every placement, the page), goal <= 300 ms: the first
  view of the cell (the process's cache of upright crops emptied before each request) and a view again (what
  the reviewer waits for after each change: the page reloads);
* thumbnail: GET /chromosomes/{pk}/image.png (one chromosome turned upright), for the browser's 46 requests;
* label change: POST /cases/{pk}/labels (optimistic check, a Label row, commit), goal <= 100 ms;
* case list: GET / with --cases cases (first page of 100), goal < 500 ms; and the POST /search by case ID.
Also the CPU seconds of this process per request, which stay meaningful when other work shares the cores.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from common import cpu_name  # noqa: E402
from report import build_case  # noqa: E402

from chromobatch.store import db  # noqa: E402

PASSWORD = "benchmark password"


def add_cases(database: db.Database, n: int, with_cells: int = 200) -> None:
    """n more cases, the newest `with_cells` of them with one cell of 46 chromosomes and their predictions."""
    from sqlalchemy import insert

    t0 = db.utcnow() - timedelta(days=1)
    summary = {"cells": [{"cell": "cell01", "count": 46, "karyotype": "46,XX", "flags": []},
                         {"cell": "cell02", "count": 47, "karyotype": "47,XX,+21", "flags": ["count_anomaly"]}],
               "modal_number": 46, "karyotype": "46,XX", "findings": ["gain of 21 in 1/2 cells (non-clonal)"]}
    rows = [{"case_id": f"LAB{k:06d}", "source_path": f"/incoming/LAB{k:06d}", "status": "done", "meta": {},
             "summary": summary, "karyotype": "46,XX", "received_at": t0 + timedelta(seconds=k),
             "processed_at": t0 + timedelta(seconds=k + 30), "review_state": "unreviewed"} for k in range(n)]
    png = bytes.fromhex("89504e470d0a1a0a")  # never decoded by the list
    with database.session() as s:
        s.execute(insert(db.Case), rows)
        mv = s.query(db.ModelVersion).first()
        assert mv is not None
        newest = [pk for (pk,) in s.query(db.Case.id).filter(db.Case.case_id.like("LAB%"))
                  .order_by(db.Case.received_at.desc()).limit(with_cells)]
        for pk in newest:
            cell = db.Cell(case_pk=pk, name="cell01", index=0)
            s.add(cell)
            s.flush()
            chroms = [{"case_pk": pk, "cell_id": cell.id, "source_file": f"cell01/c{k:02d}.png",
                       "sha256": hashlib.sha256(f"{pk}-{k}".encode()).hexdigest(), "width": 10, "height": 40,
                       "polarity": "dark_on_light", "crop_png": png, "created_at": t0} for k in range(46)]
            s.execute(insert(db.Chromosome), chroms)
        ids = [cid for (cid,) in s.query(db.Chromosome.id).join(db.Case, db.Case.id == db.Chromosome.case_pk)
               .filter(db.Case.case_id.like("LAB%"))]
        s.execute(insert(db.Prediction), [
            {"chromosome_id": cid, "model_version_id": mv.id, "label": "1", "assigned_label": "1",
             "confidence": 0.3 if cid % 23 == 0 else 0.95, "probabilities": [0.04] * 24,
             "flags": ["low_confidence"] if cid % 23 == 0 else [], "created_at": t0} for cid in ids])


def timed(fn: Callable[[], Any], repeats: int) -> tuple[float, float, float]:
    """(median ms, min ms, median CPU ms) of `repeats` calls after one warm-up call."""
    fn()
    wall, cpu = [], []
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        wall.append((time.perf_counter() - t0) * 1000)
        cpu.append((time.process_time() - c0) * 1000)
    return statistics.median(wall), min(wall), statistics.median(cpu)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--cases", type=int, default=10_000)
    args = parser.parse_args()

    from fastapi.testclient import TestClient

    from chromobatch.web import pages
    from chromobatch.web.app import WebOptions, create_app
    from chromobatch.web.users import add_user

    with tempfile.TemporaryDirectory() as tmp:
        database = db.connect(Path(tmp) / "bench.sqlite")
        build_case(database, 1)
        add_user(database, "bench", "reviewer", PASSWORD)
        with database.session() as s:
            case = s.query(db.Case).filter_by(case_id="BENCH20").one()
            case_pk = case.id
            cell_pk = s.query(db.Cell.id).filter_by(case_pk=case_pk).scalar()
            chroms = [c for (c,) in s.query(db.Chromosome.id).filter_by(cell_id=cell_pk).order_by(db.Chromosome.id)]
        assert len(chroms) == 46
        app = create_app(database, WebOptions(reports_dir=Path(tmp) / "reports", secret="bench"))
        client = TestClient(app, follow_redirects=False)
        csrf = re.search(r'name="csrf-token" content="([^"]+)"', client.get("/login").text).group(1)  # type: ignore
        r = client.post("/login", data={"username": "bench", "password": PASSWORD, "csrf_token": csrf})
        assert r.status_code == 303
        csrf = re.search(r'name="csrf-token" content="([^"]+)"', client.get("/").text).group(1)  # type: ignore

        def cell_view() -> None:
            r = client.get(f"/cells/{cell_pk}")
            assert r.status_code == 200 and r.text.count('class="chrom') == 46

        def cell_view_cold() -> None:
            pages._UPRIGHT.clear()  # as the first view of a cell: every crop decoded and turned upright
            cell_view()

        def thumb() -> None:
            assert client.get(f"/chromosomes/{chroms[5]}/image.png").status_code == 200

        labels = iter(["7", "8"] * (args.repeats + 2))

        def label_change() -> None:
            with database.session() as s:
                seen = s.query(db.Label.id).filter_by(chromosome_id=chroms[0]).order_by(db.Label.id.desc()).first()
            r = client.post(f"/cases/{case_pk}/labels", headers={"X-CSRF-Token": csrf, "Accept": "application/json"},
                            data={"chromosome": chroms[0], "label": next(labels), "seen": seen[0] if seen else ""})
            assert r.status_code == 200 and r.json()["conflict"] is False, r.text

        results = {"cell_view_cold": timed(cell_view_cold, args.repeats), "cell_view": timed(cell_view, args.repeats),
                   "thumbnail": timed(thumb, args.repeats),
                   "label_change": timed(label_change, args.repeats)}
        t0 = time.perf_counter()
        add_cases(database, args.cases)
        build_s = time.perf_counter() - t0

        def case_list() -> None:
            r = client.get("/")
            assert r.status_code == 200 and f"{args.cases + 1} case(s)" in r.text

        def search() -> None:
            r = client.post("/search", data={"q": "LAB00999", "csrf_token": csrf})
            assert r.status_code == 200 and "10 case(s)" in r.text

        results["case_list"] = timed(case_list, args.repeats)
        results["search"] = timed(search, args.repeats)
        database.dispose()

    print(f"machine: {cpu_name()}; {args.cases + 1} cases ({build_s:.1f}s to add); median of {args.repeats}")
    goals = {"cell_view_cold": "<= 300 ms", "cell_view": "<= 300 ms", "label_change": "<= 100 ms",
             "case_list": "< 500 ms"}
    print("| request | median | fastest | CPU (median) | goal |")
    print("|---|---|---|---|---|")
    names = {"cell_view_cold": "cell view, 46 chromosomes, first view (GET /cells/{pk}, no crop turned yet)",
             "cell_view": "cell view, 46 chromosomes, again (GET /cells/{pk}, after a change: crops turned before)",
             "thumbnail": "one thumbnail (GET /chromosomes/{pk}/image.png)",
             "label_change": "label change committed (POST /cases/{pk}/labels)",
             "case_list": f"case list, {args.cases + 1:,} cases (GET /)",
             "search": f"search by case ID, {args.cases + 1:,} cases (POST /search)"}
    for key, (med, best, cpu) in results.items():
        print(f"| {names[key]} | {med:.1f} ms | {best:.1f} ms | {cpu:.1f} ms | {goals.get(key, '')} |")
    print(json.dumps({k: {"median_ms": round(v[0], 1), "min_ms": round(v[1], 1), "cpu_ms": round(v[2], 1)}
                      for k, v in results.items()}))


if __name__ == "__main__":
    main()
