"""The worker: claims jobs, runs the pipeline on each, and moves the folder to processed/ or failed/.

Errors are told apart because their remedies differ (the overview is in chromobatch.service.watch): bad input
(chromobatch.errors.InputError) fails at once, since trying again cannot help; a transient fault
(chromobatch.faults) is waited out with backoff without spending an attempt, since it is the host's fault,
not the case's; anything else is a bug, retried up to settings.max_attempts in case it was bad luck. A heartbeat
thread keeps the job's heartbeat_at fresh, so a worker that was killed mid-case is noticed and its job queued
again by whoever looks next. Reports that are due are rendered when the worker is idle, as a step of their own.
"""

from __future__ import annotations

import ctypes
import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy.exc import SQLAlchemyError

from chromobatch.config import Settings
from chromobatch.errors import ChromobatchError, InputError, JobError
from chromobatch.faults import backoff, transient_reason
from chromobatch.service.casefolders import WatchPaths, move_case, write_error_file
from chromobatch.service.stopping import StopFlag
from chromobatch.store import jobs
from chromobatch.store.db import Database, utcnow
from chromobatch.store.states import JobState

log = logging.getLogger(__name__)

#: A transient fault (disk full, database locked or gone) is retried after 1 s, 2 s, 4 s, ... up to a minute.
TRANSIENT_FIRST_S = 1.0
TRANSIENT_CAP_S = 60.0
#: How often an idle worker looks for reports that are due (chromobatch.service.reports).
REPORT_CHECK_S = 2.0

#: What a worker runs on each case: pipeline.process_case, or a stand-in (tests, embedding).
ProcessFn = Callable[..., Any]


class _Heartbeat:
    """Keeps jobs.heartbeat_at fresh while the case is processed, so others know this worker lives."""

    def __init__(self, database: Database, job_id: int, worker: str, interval: float) -> None:
        self.database, self.job_id, self.worker = database, job_id, worker
        self.interval = max(0.05, interval)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"heartbeat-{job_id}", daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                if not jobs.heartbeat(self.database, self.job_id, self.worker):
                    log.warning("job %d is no longer held by this worker (its heartbeat expired)", self.job_id)
                    return
            except SQLAlchemyError as exc:
                log.warning("heartbeat of job %d failed: %s", self.job_id, exc)

    def __enter__(self) -> _Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def release_freed_memory() -> None:
    """Hand memory freed by a large case back to the OS (glibc keeps it otherwise: +300 MB idle after a
    500-cell case, docs/benchmarks.md). A no-op where the C library has no malloc_trim."""
    try:
        libc = ctypes.CDLL(None)
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return
    trim(0)


def default_worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"[:128]


@dataclass
class Worker:
    """Claims jobs and runs the pipeline on them; `process` is the seam (pipeline.process_case by default)."""

    database: Database
    settings: Settings
    paths: WatchPaths
    process: ProcessFn | None = None
    predictor: Any = None
    name: str = field(default_factory=default_worker_name)
    stop: threading.Event = field(default_factory=StopFlag)
    #: Stop when the parent (a supervising watcher) goes away.
    watch_parent: bool = False
    _wake: threading.Event = field(default_factory=threading.Event, init=False, repr=False)
    _last_reclaim: float = field(default=0.0, init=False, repr=False)
    _last_reports: float = field(default=0.0, init=False, repr=False)

    def wake(self) -> None:
        self._wake.set()

    def load(self) -> None:
        """Load the model now, so a missing or broken one fails the start, not the first case."""
        if self.process is None:
            from chromobatch.registry.register import load_predictor
            from chromobatch.service.pipeline import process_case

            self.process = process_case
            if self.predictor is None:
                self.predictor = load_predictor(self.database, self.settings, self.settings.model or None)
                self.predictor.warm_up()  # the first case should not pay for the runtime's first pass

    def run(self, *, once: bool = False, scanning_done: Callable[[], bool] = lambda: True) -> None:
        """Work until stopped; with once, until nothing is queued or running any more."""
        self.load()
        parent = os.getppid() if self.watch_parent else None
        idle = 0.5 if self.settings.poll_seconds <= 0 else min(1.0, self.settings.poll_seconds)
        log.info("worker %s ready", self.name)
        faults = 0
        while not self.stop.is_set():
            if parent is not None and os.getppid() != parent:
                log.warning("worker %s: the supervising watcher is gone; stopping", self.name)
                break
            try:
                if self.step():
                    faults = 0
                    continue
                self.render_due_reports(force=once)
                faults = 0
                if once and scanning_done() and jobs.outstanding(self.database) == 0:
                    break
            except SQLAlchemyError as exc:
                faults += 1
                idle_now = backoff(faults, first=TRANSIENT_FIRST_S, cap=TRANSIENT_CAP_S)
                log.error("worker %s: %s (database %s); trying again in %.0fs", self.name,
                          transient_reason(exc) or f"database error: {type(exc).__name__}", self._where(),
                          idle_now)
            else:
                idle_now = idle
            self._wake.wait(idle_now)
            self._wake.clear()
        self.close()
        log.info("worker %s stopped", self.name)

    def close(self) -> None:
        """Stop the predictor's render processes now, not in the interpreter's exit hooks (where a signal
        arriving during the join is printed as a traceback)."""
        renderer = getattr(self.predictor, "renderer", None)
        if renderer is not None:
            renderer.close()

    def _where(self) -> str:
        """The database as it may be logged: a file path or a URL without its password."""
        from sqlalchemy.engine import make_url

        return make_url(self.database.url).render_as_string(hide_password=True).removeprefix("sqlite:///")

    def render_due_reports(self, *, force: bool = False) -> int:
        """Render reports that are due (a failed or interrupted rendering), a few at a time, when idle."""
        now = time.monotonic()
        if not force and now - self._last_reports < REPORT_CHECK_S:
            return 0
        self._last_reports = now
        from chromobatch.service.reports import render_and_record
        from chromobatch.store.reports import claim_due_reports

        done = 0
        for case_id in claim_due_reports(self.database, busy_after=self.settings.stale_after_seconds):
            if self.stop.is_set():
                break
            if render_and_record(self.database, case_id, self.paths.reports, claimed=True) is not None:
                log.info("case %s: report rendered (it was missing)", case_id)
                done += 1
        return done

    def step(self) -> bool:
        """Reclaim stale jobs, then claim and process one job; False when there was none."""
        self.reclaim()
        if self.stop.is_set():
            return False
        job = jobs.claim(self.database, self.name)
        if job is None:
            return False
        try:
            batch = [job] + self._claim_more()
            if len(batch) == 1:
                self.handle(job)
            else:
                self._handle_batch(batch)
        finally:
            release_freed_memory()
        return True

    def _claim_more(self) -> list[jobs.ClaimedJob]:
        """More waiting jobs to share one forward pass with (settings.batch_cases; pipeline runs only)."""
        from chromobatch.service.batching import cases_per_pass
        from chromobatch.service.pipeline import process_case

        if self.process is not process_case:
            return []
        more: list[jobs.ClaimedJob] = []
        while len(more) + 1 < cases_per_pass(self.settings, self.predictor) and not self.stop.is_set():
            job = jobs.claim(self.database, self.name)
            if job is None:
                break
            more.append(job)
        return more

    def _handle_batch(self, batch: list[jobs.ClaimedJob]) -> None:
        """Several claimed jobs: their crops predicted in one pass, then each case processed (and committed)
        on its own, in claim order. Every job's heartbeat runs for the whole batch."""
        from chromobatch.service.batching import forget, scan_and_prime

        heartbeats = [_Heartbeat(self.database, j.id, self.name, self.settings.heartbeat_seconds) for j in batch]
        for hb in heartbeats:
            hb.__enter__()
        scanned: dict[int, Any] = {}
        try:
            self._maybe_reload()
            try:
                scanned = scan_and_prime(self.database, {j.id: Path(j.path) for j in batch}, self.predictor,
                                         self.settings)
            except Exception as exc:  # noqa: BLE001 - each case still runs (and reports) on its own
                log.warning("batched prediction of %d cases failed (%s); predicting them one by one", len(batch),
                            exc)
            for j in batch:
                if self.stop.is_set():
                    jobs.release(self.database, j.id, self.name, "released on stop before it was processed")
                    continue
                self.handle(j, scanned=scanned.get(j.id))
        finally:
            forget(self.predictor, scanned)
            for hb in heartbeats:
                hb.__exit__()

    def reclaim(self, *, force: bool = False) -> list[jobs.ReclaimedJob]:
        now = time.monotonic()
        if not force and now - self._last_reclaim < min(1.0, self.settings.stale_after_seconds / 2):
            return []
        self._last_reclaim = now
        out = jobs.reclaim_stale(self.database, stale_after=self.settings.stale_after_seconds,
                                 max_attempts=self.settings.max_attempts)
        for r in out:
            if r.state == JobState.QUEUED:
                log.warning("case %s: job %d of worker %s lost its heartbeat; queued again", r.case_id, r.id,
                            r.worker)
            else:
                dest = self._move(Path(r.path), self.paths.failed, r.case_id)
                log.error("case %s: job %d lost its heartbeat on its last attempt; failed%s", r.case_id, r.id,
                          f", moved to {dest}" if dest else "")
                if dest is not None:
                    write_error_file(dest, f"case {r.case_id} failed: its worker died on every attempt")
        return out

    def _maybe_reload(self) -> None:
        reload = getattr(self.predictor, "maybe_reload", None)
        if reload is None:
            return
        try:
            reload(self.database)
        except (ChromobatchError, SQLAlchemyError, OSError) as exc:
            log.error("could not switch to the newly promoted model: %s; keeping the current one", exc)

    def _move(self, folder: Path, dest_root: Path, case_id: str) -> Path | None:
        try:
            dest = move_case(folder, dest_root)
        except JobError as exc:
            log.error("case %s: %s", case_id, exc)
            return None
        if dest is not None:
            jobs.set_case_location(self.database, case_id, dest)
        return dest

    def handle(self, job: jobs.ClaimedJob, scanned: Any = None) -> None:
        """Process one claimed job; every outcome is recorded on the job, none escapes but a stop.

        scanned: its folder as `_handle_batch` scanned it (handed to the pipeline, not scanned again)."""
        t0 = time.perf_counter()
        waited = (utcnow() - job.created_at).total_seconds() if job.created_at else 0.0
        self._maybe_reload()
        assert self.process is not None, "Worker.load() was not called"
        folder = Path(job.path)
        with _Heartbeat(self.database, job.id, self.name, self.settings.heartbeat_seconds):
            tries = 0
            while True:
                try:
                    extra = {"scanned": scanned} if scanned is not None else {}
                    result = self.process(self.database, folder, predictor=self.predictor, settings=self.settings,
                                          job_id=job.id, job_worker=self.name, reports_dir=self.paths.reports,
                                          **extra)
                    break
                except Exception as exc:  # noqa: BLE001 - a bad case or a bug must not kill the watcher
                    reason = transient_reason(exc)
                    if reason is None:
                        self._failed(job, folder, exc, time.perf_counter() - t0)
                        return
                    tries += 1
                    if not self._wait_transient(job, reason, tries):
                        return
        jobs.finish_done(self.database, job.id, self.name)
        if self._still_changing(job, folder):
            return
        dest = self._move(folder, self.paths.processed, job.case_id)
        timings = getattr(result, "timings", None) or {}
        parts = ", ".join(f"{k} {v:.2f}s" for k, v in timings.items() if k != "total")
        status = getattr(result, "status", "done")
        log.info("case %s: %s in %.2fs (waited %.1fs%s): %s chromosomes, %s cells, karyotype %s; folder -> %s "
                 "[job %d, attempt %d, %s]", job.case_id, status, time.perf_counter() - t0, waited,
                 f"; {parts}" if parts else "", getattr(result, "n_chromosomes", "?"),
                 getattr(result, "n_cells", "?"), getattr(result, "karyotype", None), dest or "(gone)",
                 job.id, job.attempts, self.name)

    def _wait_transient(self, job: jobs.ClaimedJob, reason: str, tries: int) -> bool:
        """Wait out a transient fault (backoff, capped) keeping the job; False when stopping meanwhile."""
        delay = backoff(tries, first=TRANSIENT_FIRST_S, cap=TRANSIENT_CAP_S)
        log.warning("case %s: transient fault: %s (database %s); trying again in %.0fs, the attempt is not "
                    "spent [job %d, try %d]", job.case_id, reason, self._where(), delay, job.id, tries)
        if not self.stop.wait(delay):
            return True
        try:  # stopping: hand the job back as it was, for whoever runs next
            jobs.release(self.database, job.id, self.name, f"released on stop after a transient fault: {reason}")
        except SQLAlchemyError as exc:
            log.warning("case %s: could not release job %d (%s); it is queued again when its heartbeat expires",
                        job.case_id, job.id, transient_reason(exc) or exc)
        return False

    def _still_changing(self, job: jobs.ClaimedJob, folder: Path) -> bool:
        """True (and the folder stays) when files changed after the job started: a delivery still arriving
        is taken up again by the next scan, with everything in it, instead of being moved half-way."""
        changed = jobs.last_change(folder)
        if changed is None or job.started_at is None or changed < job.started_at:
            return False
        log.warning("case %s: files changed while the case was processed; leaving the folder for the next scan "
                    "[job %d]", job.case_id, job.id)
        return True

    def _failed(self, job: jobs.ClaimedJob, folder: Path, exc: Exception, elapsed: float) -> None:
        permanent = isinstance(exc, InputError)
        if isinstance(exc, ChromobatchError):
            error = str(exc)
        else:
            error = f"{type(exc).__name__}: {exc}"
            log.error("case %s: unexpected error (a bug) in job %d", job.case_id, job.id, exc_info=exc)
        state = jobs.record_failure(self.database, job.id, self.name, error,
                                    max_attempts=self.settings.max_attempts, permanent=permanent)
        where = f"[job {job.id}, attempt {job.attempts}/{self.settings.max_attempts}, {self.name}]"
        if state == JobState.FAILED:
            if self._still_changing(job, folder):
                return
            dest = self._move(folder, self.paths.failed, job.case_id)
            if dest is not None:
                write_error_file(dest, f"case {job.case_id} failed: {error}")
            log.warning("case %s: failed after %.2fs: %s; folder -> %s %s", job.case_id, elapsed, error,
                        dest or "(gone)", where)
        elif state == JobState.QUEUED:
            log.warning("case %s: attempt failed after %.2fs, will retry: %s %s", job.case_id, elapsed, error,
                        where)
        elif state == JobState.DONE:  # the results were committed before the error: the case is finished
            self._move(folder, self.paths.processed, job.case_id)
            log.warning("case %s: done, but a later step failed: %s %s", job.case_id, error, where)
        else:
            log.warning("case %s: attempt failed (%s) but the job is no longer ours (%s) %s", job.case_id,
                        error, state, where)
