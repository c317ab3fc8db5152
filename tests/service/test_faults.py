"""Issue 13's faults, each reproduced: nothing dropped without a trace, transient faults retried, readiness.

Real parts throughout: real SQLite files (on a real full file system where the fault is a full disk), the
real pipeline with a tiny random model, real `chromobatch watch` subprocesses.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import sqlite3
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
from helpers import Watcher, chromosome_array, write_png
from sqlalchemy import select
from sqlalchemy.exc import OperationalError
from test_watch import job_rows, make_case, settings_for, wait_for
from typer.testing import CliRunner

from chromobatch.cli.main import app
from chromobatch.faults import transient_reason
from chromobatch.service.casefolders import ERROR_FILE, resolve_paths
from chromobatch.service.readiness import ReadyTracker
from chromobatch.service.scanner import Scanner
from chromobatch.service.worker import Worker
from chromobatch.store import db, jobs


def truncated_png(path: Path, arr: object) -> bytes:
    """Write a PNG cut in half (a copy that broke off); return the whole file's bytes."""
    write_png(path, arr)  # type: ignore[arg-type]
    whole = path.read_bytes()
    path.write_bytes(whole[: len(whole) // 2])
    return whole


def normal_case(root: Path, name: str, *, cells: int = 2, per_cell: int = 4, seed: int = 0) -> Path:
    case = root / name
    for c in range(cells):
        for k in range(per_cell):
            write_png(case / f"cell{c + 1}" / f"k{k}.png", chromosome_array(20 + 5 * k, 8, seed=seed + 10 * c + k))
    return case


# --------------------------------------------------------------------------------------------------
# 1. a rejected file is visible in the log, status, review, the case summary and the report


def test_truncated_crop_is_named_everywhere(sqlite_path: Path, layout: SimpleNamespace,
                                            watcher_env: dict[str, str], watchers: list[Watcher]) -> None:
    case = normal_case(layout.incoming, "TRUNC1")
    truncated_png(case / "cell2" / "k3.png", chromosome_array(30, 8, seed=99))
    (case / "labels.csv").write_text("file,label\ncell1/k0.png,1\ncell1/nothere.png,2\n")
    (case / "READY").write_text("")
    w = Watcher(layout.root, "trunc", [str(layout.incoming), "--db", str(sqlite_path), "--once"], watcher_env)
    watchers.append(w)
    assert w.proc.wait(timeout=120) == 0, w.text()[-3000:]
    log_text = w.text()
    assert "case TRUNC1: file not used: cell2/k3.png:" in log_text  # one line per rejected file, with the reason
    assert "labels.csv: cell1/nothere.png is not a stored chromosome of the case" in log_text

    database = db.connect(sqlite_path)
    with database.session() as s:
        row = s.execute(select(db.Case).where(db.Case.case_id == "TRUNC1")).scalar_one()
        summary, karyotype = row.summary, row.karyotype
        label_problems = row.meta.get("label_problems")
    database.dispose()
    cells = {c["cell"]: c for c in summary["cells"]}
    assert "incomplete_input" in cells["cell2"]["flags"] and cells["cell2"]["rejected_files"] == ["cell2/k3.png"]
    assert "(incomplete input)" in cells["cell2"]["karyotype"]
    assert "incomplete_input" not in cells["cell1"]["flags"] and "incomplete" not in cells["cell1"]["karyotype"]
    assert karyotype.endswith("(incomplete input: 1 file not used)")
    assert any(f.startswith("incomplete input: 1 file not used (in 1/2 cells)") for f in summary["findings"])
    assert label_problems == ["labels.csv: cell1/nothere.png is not a stored chromosome of the case"]

    status = CliRunner().invoke(app, ["status", "--db", str(sqlite_path)])
    assert status.exit_code == 0, status.output
    assert "files not used (recent cases):" in status.output
    assert "TRUNC1" in status.output and "cell2/k3.png:" in status.output

    review = CliRunner().invoke(app, ["review", "TRUNC1", "--db", str(sqlite_path)])
    assert review.exit_code == 0, review.output
    assert "files not used (1)" in review.output and "cell2/k3.png:" in review.output

    from pypdf import PdfReader

    text = " ".join(page.extract_text() for page in PdfReader(layout.reports / "TRUNC1.pdf").pages)
    text = " ".join(text.split())
    assert "Files not used" in text and "cell2/k3.png" in text
    assert "incomplete input" in text


def test_stray_file_and_empty_folder_are_told(sqlite_path: Path, layout: SimpleNamespace,
                                              caplog: pytest.LogCaptureFixture) -> None:
    database = db.connect(sqlite_path)
    settings = settings_for(sqlite_path, quiet_seconds=0.2)
    scanner = Scanner(database, settings, resolve_paths(layout.incoming, settings))
    write_png(layout.incoming / "loose.png", chromosome_array(30, 8))
    (layout.incoming / "EMPTY1").mkdir()
    caplog.set_level(logging.INFO, logger="chromobatch.service")  # the scanner and readiness both speak here
    for _ in range(4):
        scanner.scan()
        time.sleep(0.25)
    database.dispose()
    assert not (layout.incoming / "loose.png").exists()
    assert (layout.failed / "loose.png").is_file()
    reason = (layout.failed / f"loose.png.{ERROR_FILE}").read_text()
    assert "loose.png is a file, not a case folder" in reason
    assert sum("loose.png is a file, not a case folder" in r.getMessage() for r in caplog.records) == 1
    assert sum("incoming folder EMPTY1 is empty" in r.getMessage() for r in caplog.records) == 1  # once
    assert (layout.incoming / "EMPTY1").is_dir()  # the lab may be about to copy into it


# --------------------------------------------------------------------------------------------------
# 3. transient faults: a full disk for the database and for the reports


@contextlib.contextmanager
def small_fs(path: Path, size: str = "16m") -> Iterator[Path]:
    path.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs to fill (needs root): {done.stderr.decode().strip()[:200]}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def fill(fs: Path) -> Path:
    """Fill a file system to the last byte; returns the filler file (delete it to give the space back)."""
    filler = fs / "filler"
    chunk = b"\0" * (1 << 20)
    with filler.open("wb", buffering=0) as fh:
        for size in (1 << 20, 4096, 1):
            try:
                while True:
                    fh.write(chunk[:size])
            except OSError as exc:
                assert exc.errno == errno.ENOSPC
    return filler


def test_full_disk_for_database_and_reports_loses_nothing(tmp_path: Path, tiny_model_dir: Path,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    dbfs = tmp_path / "dbfs"
    repfs = tmp_path / "repfs"
    with small_fs(dbfs), small_fs(repfs):
        incoming = tmp_path / "incoming"
        incoming.mkdir()
        sqlite_path = dbfs / "cases.sqlite"
        settings = settings_for(sqlite_path, model=str(tiny_model_dir), device="cpu")
        paths = resolve_paths(incoming, settings, reports_dir=repfs / "reports")
        database = db.connect(sqlite_path)
        case = normal_case(incoming, "FULL1", cells=2, per_cell=20)
        assert jobs.enqueue(database, case).action == "queued"
        worker = Worker(database, settings, paths)
        worker.load()
        job = jobs.claim(database, worker.name)
        assert job is not None
        with sqlite3.connect(sqlite_path) as raw:  # an empty WAL: the next commit needs new disk space
            raw.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        db_filler, rep_filler = fill(dbfs), fill(repfs)
        caplog.set_level(logging.INFO)
        thread = threading.Thread(target=worker.handle, args=(job,))
        thread.start()
        wait_for(lambda: sum("transient fault" in r.getMessage() for r in caplog.records) >= 2, 30,
                 "the worker retrying the transient fault")
        assert thread.is_alive()  # still holding the case: not failed, not given up
        assert [r[1] for r in job_rows(database)] == ["running"]
        db_filler.unlink()  # space for the database comes back; the reports' disk stays full
        thread.join(timeout=60)
        assert not thread.is_alive()
        assert job_rows(database) == [("FULL1", "done", worker.name, 1)]  # one attempt: none was spent
        assert (tmp_path / "processed" / "FULL1").is_dir() and not (tmp_path / "failed").exists()
        assert not (paths.reports / "FULL1.pdf").exists()
        info = jobs.queue_status(database)
        assert info["reports_missing"] == 1 and info["missing_reports"][0]["case_id"] == "FULL1"
        assert "No space left on device" in info["missing_reports"][0]["error"]
        out = CliRunner().invoke(app, ["status", "--db", str(sqlite_path)])
        assert "reports missing: 1 case(s)" in out.output and "FULL1" in out.output

        rep_filler.unlink()  # the reports' disk has space again: the idle worker renders what is missing
        wait_for(lambda: worker.render_due_reports(force=True) == 1, 30, "the missing report rendered", 0.5)
        assert (paths.reports / "FULL1.pdf").stat().st_size > 1000
        assert jobs.queue_status(database)["reports_missing"] == 0
        with database.session() as s:
            row = s.execute(select(db.Case).where(db.Case.case_id == "FULL1")).scalar_one()
            assert row.status == "done" and row.report_error is None and row.report_path is not None
            assert s.query(db.Chromosome).filter_by(case_pk=row.id).count() == 40  # stored once, all of them
        database.dispose()


def test_transient_reason_tells_a_passing_fault_from_a_bug(tmp_path: Path) -> None:
    path = tmp_path / "x.sqlite"
    sqlite3.connect(path).execute("CREATE TABLE t (a)").connection.close()
    ro = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    with pytest.raises(sqlite3.OperationalError) as raw:
        ro.execute("INSERT INTO t VALUES (1)")
    wrapped = OperationalError("INSERT", {}, raw.value)
    assert "readonly database" in (transient_reason(wrapped) or "")
    assert "No space left" in (transient_reason(OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "/r/a.pdf")) or "")
    with pytest.raises(sqlite3.OperationalError) as bug:  # also an OperationalError, but it never passes
        ro.execute("SELECT nosuch FROM t")
    assert transient_reason(OperationalError("SELECT", {}, bug.value)) is None
    assert transient_reason(ValueError("a bug")) is None
    assert transient_reason(OSError(errno.ENOENT, "gone")) is None


# --------------------------------------------------------------------------------------------------
# 4. readiness: `ready` waits for the marker however long the copy pauses; a changing folder is not moved


def test_ready_mode_never_takes_a_folder_without_its_marker(layout: SimpleNamespace) -> None:
    tracker = ReadyTracker(layout.incoming, quiet_seconds=0.1, readiness="ready")
    make_case(layout.incoming, "SLOW1")
    for _ in range(4):
        assert tracker.scan() == ([], 0)  # quiet for long enough, still not ready; not pending either
        time.sleep(0.15)
    (layout.incoming / "SLOW1" / "READY").write_text("")
    assert [p.name for p in tracker.scan()[0]] == ["SLOW1"]
    quiet = ReadyTracker(layout.incoming, quiet_seconds=10, readiness="quiet")
    make_case(layout.incoming, "MARKED", ready=True)
    assert quiet.scan()[0] == []  # quiet mode: the marker alone does not make a folder ready


def test_slow_copy_with_long_pauses_in_ready_mode(sqlite_path: Path, layout: SimpleNamespace,
                                                 watcher_env: dict[str, str], watchers: list[Watcher]) -> None:
    env = dict(watcher_env, CHROMOBATCH_QUIET_SECONDS="0.5")
    w = Watcher(layout.root, "ready", [str(layout.incoming), "--db", str(sqlite_path), "--readiness", "ready"], env)
    watchers.append(w)
    wait_for(lambda: "worker" in w.text() and "ready" in w.text(), 60, "the watcher ready")
    case = layout.incoming / "SLOW2"
    for c in range(3):  # three cells, a pause three times the quiet period after each
        for k in range(3):
            write_png(case / f"cell{c + 1}" / f"k{k}.png", chromosome_array(20 + 4 * k, 8, seed=10 * c + k))
        time.sleep(1.5)
    database = db.connect(sqlite_path)
    assert job_rows(database) == []  # no marker yet: nothing was taken, however quiet the folder was
    (case / "READY").write_text("")
    wait_for(lambda: (layout.processed / "SLOW2").is_dir(), 60, "the case processed")
    assert w.stop() == 0
    assert job_rows(database)[0][:2] == ("SLOW2", "done") and len(job_rows(database)) == 1
    with database.session() as s:
        row = s.execute(select(db.Case).where(db.Case.case_id == "SLOW2")).scalar_one()
        assert len(row.cells) == 3 and not row.rejected
    assert not (layout.processed / "SLOW2.1").exists()
    database.dispose()


def test_delivery_still_changing_is_not_moved_and_a_file_that_arrives_whole_is_taken_up(
        sqlite_path: Path, layout: SimpleNamespace, tiny_model_dir: Path) -> None:
    """The copy goes on while the case is processed: a truncated file is rejected at first; the folder stays,
    is queued again, and the whole file is used (its rejection removed) before the folder is moved."""
    case = normal_case(layout.incoming, "GROW1", cells=1, per_cell=3)
    whole = truncated_png(case / "cell1" / "k9.png", chromosome_array(40, 8, seed=7))
    (case / "READY").write_text("")
    settings = settings_for(sqlite_path, model=str(tiny_model_dir), device="cpu")
    database = db.connect(sqlite_path)
    paths = resolve_paths(layout.incoming, settings)
    scanner = Scanner(database, settings, paths)
    calls: list[int] = []

    from chromobatch.registry.register import load_predictor
    from chromobatch.service.pipeline import process_case

    def copy_goes_on(database: db.Database, case_dir: Path, **kw: object) -> object:
        result = process_case(database, case_dir, **kw)  # type: ignore[arg-type]
        if not calls:
            (case_dir / "cell1" / "k9.png").write_bytes(whole)  # the copy of that file finishes meanwhile
        calls.append(1)
        return result

    worker = Worker(database, settings, paths, process=copy_goes_on, predictor=load_predictor(database, settings))
    scanner.scan()
    assert worker.step()
    assert (layout.incoming / "GROW1").is_dir() and not (layout.processed / "GROW1").exists()
    with database.session() as s:
        assert [r.source_file for r in s.execute(select(db.RejectedFile)).scalars()] == ["cell1/k9.png"]
    wait_for(lambda: scanner.scan() == 0 and jobs.outstanding(database) == 1, 10, "the folder queued again")
    assert worker.step()
    assert (layout.processed / "GROW1").is_dir() and len(calls) == 2
    with database.session() as s:
        assert s.execute(select(db.RejectedFile)).first() is None
        assert {c.source_file for c in s.execute(select(db.Chromosome)).scalars()} == {
            "cell1/k0.png", "cell1/k1.png", "cell1/k2.png", "cell1/k9.png"}
        row = s.execute(select(db.Case)).scalar_one()
        assert "incomplete" not in (row.karyotype or "")
    assert [r[1] for r in job_rows(database)] == ["done", "done"]
    database.dispose()
