"""The watcher: readiness, the job queue (claim, enqueue, heartbeat reclaim, retries) and real watcher processes.

Unit tests run in-process with a stand-in process function; the end-to-end tests start `chromobatch watch`
as real subprocesses with the real pipeline and a tiny random model, on a real watched folder.
"""

from __future__ import annotations

import os
import re
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from helpers import Watcher, chromosome_array, write_png
from sqlalchemy import func, select
from typer.testing import CliRunner

from chromobatch.cli.main import app
from chromobatch.config import load_settings
from chromobatch.errors import EmptyCase, InvalidCaseId
from chromobatch.service.casefolders import ERROR_FILE, move_case, resolve_paths
from chromobatch.service.readiness import ReadyTracker
from chromobatch.service.scanner import Scanner
from chromobatch.service.stopping import StopFlag
from chromobatch.service.watch import watch
from chromobatch.service.worker import Worker
from chromobatch.store import db, jobs

# --------------------------------------------------------------------------------------------------
# helpers


def make_case(root: Path, name: str, n: int = 3, *, seed: int = 0, ready: bool = False) -> Path:
    case = root / name
    for k in range(n):
        write_png(case / "cell1" / f"k{k}.png", chromosome_array(18 + 6 * k, 8, seed=seed * 100 + k))
    if ready:
        (case / "READY").write_text("")
    return case


def wait_for(cond: Callable[[], bool], timeout: float, what: str, interval: float = 0.1) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def fake_result(case_dir: Path) -> SimpleNamespace:
    return SimpleNamespace(case_id=case_dir.name, status="done", n_chromosomes=1, n_cells=1, karyotype="46,XX",
                           timings={"total": 0.0}, report_path=None, rejected={})


def settings_for(db_path: str | Path, **extra: Any) -> Any:
    values = {"db": str(db_path), "quiet_seconds": 0.2, "heartbeat_seconds": 0.1, "stale_after_seconds": 0.5,
              "max_attempts": 3}
    values.update(extra)
    return load_settings(values)


def job_rows(database: db.Database) -> list[tuple[str, str, str | None, int]]:
    with database.session() as s:
        return [(cid, j.state, j.worker, j.attempts) for j, cid in
                s.execute(select(db.Job, db.Case.case_id).join(db.Case).order_by(db.Job.id))]


# --------------------------------------------------------------------------------------------------
# folders: readiness, moves


def test_ready_tracker_marker_quiet_and_empty(layout: SimpleNamespace) -> None:
    inc = layout.incoming
    tracker = ReadyTracker(inc, quiet_seconds=0.3)
    make_case(inc, "MARKED", ready=True)
    make_case(inc, "QUIET")
    (inc / "EMPTY").mkdir()
    (inc / ".hidden").mkdir()
    ready, pending = tracker.scan()
    assert [p.name for p in ready] == ["MARKED"] and pending == 1  # QUIET: never ready on first sight
    time.sleep(0.35)
    ready, pending = tracker.scan()
    assert [p.name for p in ready] == ["QUIET"] and pending == 0
    assert tracker.scan() == ([], 0)  # each folder is reported once
    write_png(inc / "QUIET" / "cell1" / "late.png", chromosome_array(30, 8))  # content changed: judged again
    assert tracker.scan() == ([], 1)
    time.sleep(0.35)
    assert [p.name for p in tracker.scan()[0]] == ["QUIET"]


def test_move_case_never_overwrites(layout: SimpleNamespace) -> None:
    dest = layout.processed
    first = move_case(make_case(layout.incoming, "C1"), dest)
    second = move_case(make_case(layout.incoming, "C1", seed=1), dest)
    assert first == dest / "C1" and second == dest / "C1.1"
    assert len(list((dest / "C1.1" / "cell1").iterdir())) == 3
    assert move_case(layout.incoming / "C1", dest) is None  # gone


def test_relative_dirs_are_beside_incoming(layout: SimpleNamespace) -> None:
    paths = resolve_paths(layout.incoming, settings_for(layout.root / "x.sqlite"))
    assert paths.processed == layout.root / "processed" and paths.failed == layout.root / "failed"
    assert paths.reports == layout.root / "reports"


# --------------------------------------------------------------------------------------------------
# queue: enqueue, claim, heartbeat reclaim


def _concurrent(n: int, fn: Callable[[int], Any]) -> list[Any]:
    out: list[Any] = [None] * n
    barrier = threading.Barrier(n)

    def run(i: int) -> None:
        barrier.wait()
        out[i] = fn(i)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


def _claim_race(url: str, incoming: Path) -> None:
    database = db.Database(url)
    for i in range(24):
        jobs.enqueue(database, make_case(incoming, f"Q{i:02d}", n=1))
    databases = [db.Database(url) for _ in range(4)]

    def claimer(i: int) -> list[int]:
        got = []
        while (job := jobs.claim(databases[i], f"w{i}")) is not None:
            got.append(job.id)
        return got

    claimed = _concurrent(4, claimer)
    flat = [j for got in claimed for j in got]
    assert len(flat) == len(set(flat)) == 24, claimed
    assert {state for _, state, _, _ in job_rows(database)} == {"running"}
    # the same folder queued by several watchers at once: one job
    case = make_case(incoming, "SAME", n=1)
    results = _concurrent(4, lambda i: jobs.enqueue(databases[i], case))
    assert sorted(r.action for r in results) == ["active", "active", "active", "queued"]
    for d in databases + [database]:
        d.dispose()


def test_claim_and_enqueue_race_sqlite(sqlite_path: Path, layout: SimpleNamespace) -> None:
    db.connect(sqlite_path).dispose()
    _claim_race(db.resolve_url(sqlite_path), layout.incoming)


@pytest.mark.postgres
def test_claim_and_enqueue_race_postgres(pg_url: str, layout: SimpleNamespace) -> None:
    db.upgrade(pg_url)
    _claim_race(pg_url, layout.incoming)


def test_heartbeat_expired_job_is_reclaimed(sqlite_path: Path, layout: SimpleNamespace) -> None:
    settings = settings_for(sqlite_path, max_attempts=2)
    database = db.connect(sqlite_path)
    paths = resolve_paths(layout.incoming, settings)
    case = make_case(layout.incoming, "STALE")
    jobs.enqueue(database, case)
    assert jobs.claim(database, "dead-worker") is not None  # ... and that worker dies: no heartbeats
    alive = Worker(database, settings, paths, process=lambda *a, **k: fake_result(case), name="alive")
    assert alive.reclaim(force=True) == []  # heartbeat still fresh
    time.sleep(0.6)
    [r] = alive.reclaim(force=True)
    assert (r.state, r.worker) == ("queued", "dead-worker")
    assert jobs.claim(database, "dead-again") is not None  # attempt 2 of 2 dies too
    time.sleep(0.6)
    [r] = alive.reclaim(force=True)
    assert r.state == "failed"
    assert job_rows(database) == [("STALE", "failed", None, 2)]
    assert (paths.failed / "STALE" / ERROR_FILE).is_file() and not case.exists()
    with database.session() as s:
        row = s.query(db.Case).one()
        assert row.status == "failed" and "heartbeat" in row.error
    database.dispose()


def test_heartbeat_keeps_a_slow_case_alive(sqlite_path: Path, layout: SimpleNamespace) -> None:
    settings = settings_for(sqlite_path)
    database = db.connect(sqlite_path)
    paths = resolve_paths(layout.incoming, settings)
    case = make_case(layout.incoming, "SLOW")
    jobs.enqueue(database, case)
    other = Worker(database, settings, paths, process=fake_result, name="other")
    reclaimed: list[Any] = []

    def slow(database: db.Database, case_dir: Path, **_: Any) -> SimpleNamespace:
        time.sleep(1.0)  # twice stale_after; the heartbeat thread keeps the job ours
        reclaimed.extend(other.reclaim(force=True))
        return fake_result(case_dir)

    assert Worker(database, settings, paths, process=slow, name="busy").step()
    assert reclaimed == [] and job_rows(database) == [("SLOW", "done", "busy", 1)]
    assert (paths.processed / "SLOW").is_dir()
    database.dispose()


# --------------------------------------------------------------------------------------------------
# worker outcomes: retries, bad input, leftovers


def test_retries_then_failed_and_bad_input_fails_at_once(sqlite_path: Path, layout: SimpleNamespace) -> None:
    settings = settings_for(sqlite_path, max_attempts=3)
    database = db.connect(sqlite_path)
    paths = resolve_paths(layout.incoming, settings)
    calls: Counter[str] = Counter()

    def flaky(database: db.Database, case_dir: Path, **_: Any) -> SimpleNamespace:
        calls[case_dir.name] += 1
        if case_dir.name == "BUG":
            raise RuntimeError("boom")
        if case_dir.name == "EMPTY":
            raise EmptyCase("case EMPTY has no valid chromosome image")
        if case_dir.name == "FLAKY" and calls["FLAKY"] < 3:
            raise RuntimeError("transient")
        return fake_result(case_dir)

    for name in ("BUG", "EMPTY", "FLAKY"):
        jobs.enqueue(database, make_case(layout.incoming, name, n=1))
    worker = Worker(database, settings, paths, process=flaky, name="w")
    while worker.step():
        pass
    assert calls == {"BUG": 3, "EMPTY": 1, "FLAKY": 3}
    assert job_rows(database) == [("BUG", "failed", "w", 3), ("EMPTY", "failed", "w", 1), ("FLAKY", "done", "w", 3)]
    assert sorted(p.name for p in paths.failed.iterdir()) == ["BUG", "EMPTY"]
    assert "RuntimeError: boom" in (paths.failed / "BUG" / ERROR_FILE).read_text()
    assert (paths.processed / "FLAKY").is_dir() and not any(layout.incoming.iterdir())
    with database.session() as s:
        cases = {c.case_id: c for c in s.query(db.Case)}
        assert cases["BUG"].status == "failed" and "boom" in cases["BUG"].error
        assert cases["FLAKY"].source_path == str(paths.processed / "FLAKY")
    database.dispose()


def test_invalid_name_and_folder_left_behind(sqlite_path: Path, layout: SimpleNamespace) -> None:
    settings = settings_for(sqlite_path, stale_after_seconds=0.001, heartbeat_seconds=0.0005, quiet_seconds=0.0)
    database = db.connect(sqlite_path)
    paths = resolve_paths(layout.incoming, settings)
    with pytest.raises(InvalidCaseId):
        jobs.enqueue(database, make_case(layout.incoming, "bad name"))
    # a worker died between its commit (job done) and moving the folder:
    case = make_case(layout.incoming, "DONE1")
    jobs.enqueue(database, case)
    job = jobs.claim(database, "w")
    assert job is not None
    jobs.finish_done(database, job.id, "w")
    scanner = Scanner(database, settings, paths)
    scanner.scan()
    assert scanner.scan() == 0
    assert (paths.failed / "bad name" / ERROR_FILE).is_file()
    assert (paths.processed / "DONE1").is_dir() and not any(layout.incoming.iterdir())
    assert job_rows(database) == [("DONE1", "done", "w", 1)]  # no second job
    # the same case dropped again later (new content) is a new job
    make_case(layout.incoming, "DONE1", seed=5)
    scanner.scan()
    scanner.scan()
    assert [r[1] for r in job_rows(database)] == ["done", "queued"]
    database.dispose()


def test_sigterm_finishes_the_current_case(sqlite_path: Path, layout: SimpleNamespace) -> None:
    """In-process watch(): the signal arrives mid-case; that case completes, the rest stays queued."""
    settings = settings_for(sqlite_path, stale_after_seconds=0.001, heartbeat_seconds=0.0005, quiet_seconds=0.0)
    for i in range(3):
        make_case(layout.incoming, f"T{i}", n=1, ready=True)
    seen: list[str] = []

    def process(database: db.Database, case_dir: Path, **_: Any) -> SimpleNamespace:
        seen.append(case_dir.name)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.3)
        return fake_result(case_dir)

    assert watch(layout.incoming, settings, process=process, stop=StopFlag()) == 0
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handlers restored
    database = db.connect(sqlite_path)
    assert [r[:2] for r in job_rows(database)] == [("T0", "done"), ("T1", "queued"), ("T2", "queued")]
    assert seen == ["T0"] and (layout.processed / "T0").is_dir()
    database.dispose()


def test_status_command(sqlite_path: Path, layout: SimpleNamespace) -> None:
    database = db.connect(sqlite_path)
    jobs.enqueue(database, make_case(layout.incoming, "S1", n=1))
    jobs.enqueue(database, make_case(layout.incoming, "S2", n=1))
    job = jobs.claim(database, "w")
    assert job is not None
    jobs.record_failure(database, job.id, "w", "it broke", max_attempts=1)
    info = jobs.queue_status(database)
    assert info["queue_depth"] == 1 and info["jobs"]["failed"] == 1 and info["failed"][0]["error"] == "it broke"
    assert info["active_model"] is None and {c["case_id"] for c in info["recent_cases"]} == {"S1", "S2"}
    database.dispose()
    out = CliRunner().invoke(app, ["status", "--db", str(sqlite_path)])
    assert out.exit_code == 0, out.output
    assert "1 queued, 0 running, 0 done, 1 failed" in out.output and "it broke" in out.output


# --------------------------------------------------------------------------------------------------
# real watcher processes


def check_each_case_once(database: db.Database, expect_done: set[str], expect_failed: set[str],
                         processed: Path, failed: Path) -> None:
    """One done (or failed) job per case, one prediction per chromosome and model, folders moved."""
    with database.session() as s:
        states: dict[str, Counter[str]] = {}
        for cid, state in s.execute(select(db.Case.case_id, db.Job.state).join(db.Job)):
            states.setdefault(cid, Counter())[state] += 1
        assert {c for c, n in states.items() if n["done"] == 1 and sum(n.values()) == 1} == expect_done, states
        assert {c for c, n in states.items() if n["done"] == 0 and n["failed"] == 1} == expect_failed, states
        dupes = s.execute(select(db.Prediction.chromosome_id, db.Prediction.model_version_id, func.count())
                          .group_by(db.Prediction.chromosome_id, db.Prediction.model_version_id)
                          .having(func.count() > 1)).all()
        assert dupes == []
        per_case = dict(s.execute(select(db.Case.case_id, func.count(db.Prediction.id))
                                  .join(db.Chromosome, db.Chromosome.case_pk == db.Case.id)
                                  .join(db.Prediction, db.Prediction.chromosome_id == db.Chromosome.id)
                                  .group_by(db.Case.case_id)).all())
        chroms = dict(s.execute(select(db.Case.case_id, func.count(db.Chromosome.id))
                                .join(db.Chromosome, db.Chromosome.case_pk == db.Case.id)
                                .group_by(db.Case.case_id)).all())
        for cid in expect_done:
            assert per_case[cid] == chroms[cid] > 0, cid
    assert {p.name for p in processed.iterdir()} == expect_done
    assert expect_failed <= {p.name for p in failed.iterdir()}


@pytest.mark.slow
def test_watch_batch_of_50_cases(sqlite_path: Path, layout: SimpleNamespace, watcher_env: dict[str, str],
                                 watchers: list[Watcher]) -> None:
    """50 cases: waiting at start, dropped at once, with READY markers, copied slowly, bad; SIGTERM -> 0."""
    inc = layout.incoming
    done: set[str] = set()
    for i in range(18):  # waiting before the watcher starts; some with a READY marker
        done.add(make_case(inc, f"PRE{i:02d}", n=2, seed=i, ready=i % 5 == 0).name)
    (inc / "EMPTY01").mkdir()
    (inc / "EMPTY01" / "a.png").write_bytes(b"not an image")
    make_case(inc, "bad name", n=1)
    mixed = make_case(inc, "MIXED01", n=2, seed=99)
    (mixed / "cell1" / "broken.png").write_bytes(b"\x89PNG broken")
    done.add("MIXED01")
    watchers.append(Watcher(layout.root, "w", [str(inc), "--db", str(sqlite_path)], watcher_env))

    slow_names = [f"SLOW{i}" for i in range(4)]

    def slow_copy(name: str, seed: int) -> None:
        for k in range(5):  # one file every 0.25 s (< quiet 1.2 s), no READY marker
            write_png(inc / name / "cell1" / f"k{k}.png", chromosome_array(16 + 5 * k, 8, seed=seed + k))
            time.sleep(0.25)

    copiers = [threading.Thread(target=slow_copy, args=(n, 500 + 10 * i)) for i, n in enumerate(slow_names)]
    for t in copiers:
        t.start()
    for i in range(24):  # dropped at once while the watcher starts
        done.add(make_case(inc, f"DROP{i:02d}", n=2, seed=200 + i, ready=i % 4 == 0).name)
    (inc / "EMPTY02").mkdir()
    (inc / "EMPTY02" / "notes.txt").write_text("no images here")
    (inc / "EMPTY02" / "x.tif").write_bytes(b"II*\x00garbage")
    for t in copiers:
        t.join()
    done |= set(slow_names)
    assert len(done) + 3 == 50
    wait_for(lambda: not any(inc.iterdir()), 150, "the incoming folder to empty", interval=0.5)
    database = db.connect(sqlite_path)
    wait_for(lambda: jobs.outstanding(database) == 0, 20, "the queue to drain")
    assert watchers[0].stop() == 0, watchers[0].text()[-3000:]
    check_each_case_once(database, done, {"EMPTY01", "EMPTY02"}, layout.processed, layout.failed)
    assert (layout.failed / "bad name" / ERROR_FILE).is_file()
    assert {p.stem for p in (layout.root / "reports").glob("*.pdf")} == done
    with database.session() as s:
        n = dict(s.execute(select(db.Case.case_id, func.count(db.Chromosome.id)).join(db.Chromosome)
                           .group_by(db.Case.case_id)).all())
        assert all(n[name] == 5 for name in slow_names), n  # never read half-written
        mixed_row = s.query(db.Case).filter_by(case_id="MIXED01").one()
        assert [r.source_file for r in mixed_row.rejected] == ["cell1/broken.png"]
    log_text = watchers[0].text()
    assert "Traceback" not in log_text
    # a queued line (the scanner's) and an outcome line (the worker's) per case
    assert log_text.count("chromobatch.service.scanner: case ") + log_text.count(
        "chromobatch.service.worker: case ") >= 50
    database.dispose()


@pytest.mark.slow
def test_kill_9_then_restart(sqlite_path: Path, layout: SimpleNamespace, watcher_env: dict[str, str],
                             watchers: list[Watcher]) -> None:
    inc = layout.incoming
    names = {make_case(inc, f"K{i:02d}", n=3, seed=i, ready=True).name for i in range(10)}
    first = Watcher(layout.root, "first", [str(inc), "--db", str(sqlite_path)], watcher_env)
    watchers.append(first)
    database = db.connect(sqlite_path)

    def n_done() -> int:
        return sum(1 for r in job_rows(database) if r[1] == "done")

    wait_for(lambda: n_done() >= 3, 60, "three cases done")
    first.proc.kill()  # SIGKILL, somewhere in the middle of a case
    first.proc.wait()
    assert n_done() < 10
    # the restart: two worker processes (SQLite, one file) under one supervisor, --once
    second = Watcher(layout.root, "second", [str(inc), "--db", str(sqlite_path), "--once", "--workers", "2"],
                     watcher_env)
    watchers.append(second)
    assert second.proc.wait(timeout=90) == 0, second.text()[-3000:]
    check_each_case_once(database, names, set(), layout.processed, layout.failed)
    assert "worker processes ended with codes [0, 0]" in second.text()
    assert {p.stem for p in (layout.root / "reports").glob("*.pdf")} == names  # even when killed mid-report
    database.dispose()


@pytest.mark.slow
@pytest.mark.postgres
def test_two_watchers_on_postgres_split_the_queue(pg_url: str, layout: SimpleNamespace,
                                                  watcher_env: dict[str, str], watchers: list[Watcher]) -> None:
    """Two separate watchers (inotify and polling) on one database and folder: no case twice."""
    db.upgrade(pg_url)
    inc = layout.incoming
    env = dict(watcher_env, CHROMOBATCH_DB=pg_url)
    watchers.append(Watcher(layout.root, "a", [str(inc)], env))
    watchers.append(Watcher(layout.root, "b", [str(inc), "--poll", "0.3"], env))
    wait_for(lambda: all(re.search(r"worker \S+ ready", w.text()) for w in watchers), 90, "both workers ready",
             interval=0.3)
    names = {make_case(inc, f"PG{i:02d}", n=2, seed=i).name for i in range(12)}
    wait_for(lambda: not any(inc.iterdir()), 90, "the incoming folder to empty", interval=0.3)
    database = db.Database(pg_url)
    wait_for(lambda: jobs.outstanding(database) == 0, 20, "the queue to drain")
    for w in watchers:
        assert w.stop() == 0, w.text()[-3000:]
    check_each_case_once(database, names, set(), layout.processed, layout.failed)
    rows = job_rows(database)
    assert len(rows) == 12 and len({r[2] for r in rows}) == 2, rows  # the work was split
    database.dispose()
