"""`chromobatch watch`: process every case folder dropped into an incoming folder, once.

* A case is a direct sub-folder of incoming (hidden folders are ignored). It is *ready* when it holds a
  `READY` (or `ready.txt`) marker, or when nothing in it changed for settings.quiet_seconds, judged by file
  count, sizes and the newest ctime, seen unchanged on two scans in a row. So a slow copy (or an rsync with
  hidden temporary files) is never read half-written, and folders already waiting at start are taken.
  settings.readiness chooses: `either` (marker or quiet, the default), `quiet`, or `ready` (the marker
  only, however long a copy pauses). An empty folder is not a case yet (said once in the log); a file
  where a case folder was expected is moved to failed/ with the reason beside it. A folder whose files
  changed after its job started is not moved: the next scan queues it again, with everything in it.
* Change detection: watchdog's inotify observer wakes the scanner; `--poll SECONDS` (settings.poll_seconds
  > 0) scans every SECONDS instead, for network shares where inotify sees nothing. The scan is always the
  source of truth, the events only make it prompt.
* Ready folders become jobs (chromobatch.jobs); workers claim them, call the pipeline, and move the folder
  to processed/ (done or skipped) or failed/ (bad input, or max_attempts used up; the reason is also
  written to `chromobatch-error.txt` inside it). Folders are never deleted; a name clash gets a suffix
  (`CASE.1`, `CASE.2`, ...). Relative processed_dir, failed_dir and reports_dir settings are relative to
  the incoming folder's *parent* (`/data/incoming` -> `/data/processed`), which keeps them out of the
  watched tree; `--reports` on the command line is relative to the current directory.
* Bad input (chromobatch.errors.InputError: an empty case, an invalid folder name) fails at once; a
  transient fault (chromobatch.faults: a full disk, a locked or read-only database, a lost connection) is
  retried with exponential backoff (1 s doubling to 60 s) without spending an attempt; any other error (a
  bug) is retried up to settings.max_attempts. The report is a step of its own (chromobatch.reportstep):
  idle workers render the reports that are due, and `chromobatch status` lists those still missing.
  A worker killed mid-case leaves its job `running` with a heartbeat that stops; another worker (or the
  next start) re-queues it after settings.stale_after_seconds.
* `settings.workers` > 1 runs that many worker processes (this command again with --worker-only) while
  this process scans and supervises; separate watchers on one PostgreSQL database split the queue too.
* SIGTERM/SIGINT: finish the current case, then exit 0; a second signal stops at once (the case's
  transaction rolls back and its job is re-queued when its heartbeat expires).
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

from sqlalchemy.exc import SQLAlchemyError

from chromobatch.config import ENV_PREFIX, Settings
from chromobatch.errors import ChromobatchError, ConfigError, InputError, InvalidCaseId, JobError
from chromobatch.faults import backoff, transient_reason
from chromobatch.store import jobs
from chromobatch.store.db import Database, connect, utcnow

log = logging.getLogger(__name__)

MARKER_NAMES = frozenset({"ready", "ready.txt"})
ERROR_FILE = "chromobatch-error.txt"
#: A transient fault (disk full, database locked or gone) is retried after 1 s, 2 s, 4 s, ... up to a minute.
TRANSIENT_FIRST_S = 1.0
TRANSIENT_CAP_S = 60.0
#: How often an idle worker looks for reports that are due (`chromobatch.reportstep`).
REPORT_CHECK_S = 2.0
#: A child worker that dies sooner than this after its start counts as an immediate failure (maybe a broken
#: model or setting, maybe bad luck: an OOM kill, an operator's kill -9); it is restarted all the same. Not
#: 10 s: a worker's start (torch import, model load) alone took 15-20 s on a busy 2-core host, so a worker
#: that could never load its model did not look immediate, and the watcher restarted it forever.
CHILD_MIN_LIFETIME_S = 60.0
#: A dead worker process is restarted after 1 s, then 2 s, 4 s, ... (up to 30 s) while it keeps dying within
#: CHILD_MIN_LIFETIME_S of its start; a child that lived longer resets this.
CHILD_RESTART_DELAY_S = 1.0
CHILD_RESTART_DELAY_MAX_S = 30.0
#: This many immediate failures in a row of one worker process stop the whole watcher (exit 1).
CHILD_MAX_QUICK_FAILURES = 5

ProcessFn = Callable[..., Any]


# --------------------------------------------------------------------------------------------------
# Paths and folder moves


@dataclass(frozen=True)
class WatchPaths:
    incoming: Path
    processed: Path
    failed: Path
    reports: Path


def resolve_paths(incoming: str | Path, settings: Settings, reports_dir: str | Path | None = None) -> WatchPaths:
    """Absolute folders; relative settings are taken relative to the incoming folder's parent."""
    inc = Path(incoming).expanduser().resolve()
    if not inc.is_dir():
        raise InputError(f"incoming folder does not exist: {inc}", hint="Create it, or pass an existing folder.")

    def beside(value: str) -> Path:
        p = Path(value).expanduser()
        return (p if p.is_absolute() else inc.parent / p).resolve()

    reports = Path(reports_dir).expanduser().resolve() if reports_dir else beside(settings.reports_dir)
    paths = WatchPaths(inc, beside(settings.processed_dir), beside(settings.failed_dir), reports)
    for name in ("processed", "failed"):
        if getattr(paths, name) == inc:
            raise ConfigError(f"{name}_dir must differ from the incoming folder ({inc})")
    return paths


def move_case(folder: Path, dest_root: Path) -> Path | None:
    """Move a case folder under dest_root, adding `.N` on a name clash; None when the folder is gone."""
    try:
        dest_root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise JobError(f"cannot create {dest_root}: {exc.strerror or exc}") from exc
    for n in range(10_000):
        target = dest_root / (folder.name if n == 0 else f"{folder.name}.{n}")
        if os.path.lexists(target):
            continue
        try:
            os.rename(folder, target)
            return target
        except FileNotFoundError:
            return None
        except OSError as exc:
            if exc.errno in (errno.EEXIST, errno.ENOTEMPTY):
                continue  # another process took this name just now
            if exc.errno != errno.EXDEV:
                raise JobError(f"cannot move {folder} to {target}: {exc.strerror}") from exc
            if not folder.exists():
                return None
            return _move_across_filesystems(folder, target)
    raise JobError(f"cannot move {folder}: 10000 folders named {folder.name}.N already in {dest_root}")


def _move_across_filesystems(folder: Path, target: Path) -> Path:
    """Copy under a hidden name, rename into place, then remove the source: a kill leaves no half folder."""
    tmp = target.with_name(f".{target.name}.partial-{os.getpid()}")
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        if folder.is_dir():
            shutil.copytree(folder, tmp, symlinks=True)
            os.rename(tmp, target)
            shutil.rmtree(folder)
        else:  # a stray file where a case folder was expected
            shutil.copy2(folder, tmp)
            os.rename(tmp, target)
            folder.unlink()
    except (OSError, shutil.Error) as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if tmp.is_file():
            tmp.unlink()
        raise JobError(f"cannot move {folder} to {target}: {exc}") from exc
    return target


def _write_error_file(folder: Path, message: str) -> None:
    try:
        with (folder / ERROR_FILE).open("a", encoding="utf-8") as fh:
            fh.write(f"{utcnow().isoformat(timespec='seconds')} {message}\n")
    except OSError as exc:
        log.warning("cannot write %s into %s: %s", ERROR_FILE, folder, exc)


# --------------------------------------------------------------------------------------------------
# Readiness


@dataclass
class _Seen:
    sig: tuple[int, int, int]
    changed_at: float
    stable_scans: int = 0
    emitted: tuple[int, int, int] | None = None


def folder_signature(folder: Path) -> tuple[tuple[int, int, int], bool] | None:
    """((files, bytes, newest ctime ns), has READY marker); None when the folder vanished."""
    files = size = 0
    newest = 0
    marker = False
    try:
        newest = os.stat(folder).st_ctime_ns
        for dirpath, dirnames, filenames in os.walk(folder):
            top = dirpath == str(folder)
            for name in dirnames:
                try:
                    newest = max(newest, os.lstat(os.path.join(dirpath, name)).st_ctime_ns)
                except FileNotFoundError:
                    pass
            for name in filenames:
                try:
                    st = os.lstat(os.path.join(dirpath, name))
                except FileNotFoundError:
                    continue
                if top and name.lower() in MARKER_NAMES:
                    marker = True
                    continue
                files += 1
                size += st.st_size
                newest = max(newest, st.st_ctime_ns)
    except FileNotFoundError:
        return None
    return (files, size, newest), marker


class ReadyTracker:
    """Decides when a case folder is complete; reports each folder once per content state.

    readiness: `either` (a READY marker, or quiet for quiet_seconds), `quiet` (the quiet period only) or
    `ready` (only the marker, however long a copy pauses). What is not a case yet is said once in the log:
    an empty folder, a folder waiting for its marker, a file where a case folder was expected (`strays`,
    which the scanner moves to failed/ once it is quiet).
    """

    def __init__(self, incoming: Path, quiet_seconds: float, exclude: Iterable[Path] = (),
                 readiness: str = "either") -> None:
        self.incoming = incoming
        self.quiet = max(0.0, quiet_seconds)
        self.exclude = {Path(p) for p in exclude}
        self.readiness = readiness
        self._seen: dict[str, _Seen] = {}
        self._told: dict[str, tuple[str, tuple[int, int, int]]] = {}
        #: Plain files directly in incoming that stayed unchanged for the quiet period.
        self.strays: list[Path] = []

    def _tell(self, name: str, what: str, sig: tuple[int, int, int], level: int, message: str,
              *args: object) -> None:
        """Log `message` once per folder, kind of news and content state."""
        if self._told.get(name) != (what, sig):
            self._told[name] = (what, sig)
            log.log(level, message, *args)

    def _is_ready(self, seen: _Seen, marker: bool, now: float) -> bool:
        quiet = seen.stable_scans >= 1 and now - seen.changed_at >= self.quiet
        if self.readiness == "ready":
            return marker
        if self.readiness == "quiet":
            return quiet
        return marker or quiet

    def _stray(self, path: Path, now: float) -> None:
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return
        sig = (1, st.st_size, st.st_ctime_ns)
        seen = self._seen.get(path.name)
        if seen is None or seen.sig != sig:
            self._seen[path.name] = _Seen(sig, changed_at=now if seen is not None else min(now, sig[2] / 1e9))
            return
        seen.stable_scans += 1
        if seen.emitted != sig and seen.stable_scans >= 1 and now - seen.changed_at >= self.quiet:
            seen.emitted = sig
            self.strays.append(path)

    def forget(self, name: str) -> None:
        """Judge this folder afresh on the next scans (its enqueue did not stick)."""
        self._seen.pop(name, None)

    def scan(self) -> tuple[list[Path], int]:
        """(folders that just became ready, folders still being written)."""
        now = time.time()
        ready: list[Path] = []
        pending = 0
        present: set[str] = set()
        try:
            entries = sorted(os.scandir(self.incoming), key=lambda e: e.name)
        except FileNotFoundError:
            raise InputError(f"incoming folder disappeared: {self.incoming}") from None
        for entry in entries:
            path = Path(entry.path)
            if entry.name.startswith(".") or path in self.exclude:
                continue
            if not entry.is_dir():
                if entry.is_file(follow_symlinks=False):
                    present.add(entry.name)
                    self._stray(path, now)
                continue
            found = folder_signature(path)
            if found is None:
                continue
            sig, marker = found
            present.add(entry.name)
            seen = self._seen.get(entry.name)
            if seen is None:
                seen = self._seen[entry.name] = _Seen(sig, changed_at=min(now, sig[2] / 1e9))
            elif seen.sig != sig:
                seen.sig, seen.changed_at, seen.stable_scans = sig, now, 0
            else:
                seen.stable_scans += 1
            if seen.emitted == sig:
                continue  # reported already
            quiet = seen.stable_scans >= 1 and now - seen.changed_at >= self.quiet
            if sig[0] == 0 and not marker:
                if quiet:
                    self._tell(entry.name, "empty", sig, logging.WARNING,
                               "incoming folder %s is empty: not a case until files arrive in it", entry.name)
                continue
            if self._is_ready(seen, marker, now):
                seen.emitted = sig
                ready.append(path)
            elif self.readiness == "ready":
                if quiet:  # the copy may pause as long as it likes: this is news, not an error
                    self._tell(entry.name, "marker", sig, logging.INFO,
                               "case folder %s: waiting for its READY marker (readiness = ready)", entry.name)
            else:
                pending += 1
        for name in set(self._seen) - present:
            del self._seen[name]
            self._told.pop(name, None)
        return ready, pending


# --------------------------------------------------------------------------------------------------
# Stopping


class StopFlag(threading.Event):
    """Set by the first SIGTERM/SIGINT; hooks run once on set, force hooks on each further signal."""

    def __init__(self) -> None:
        super().__init__()
        self.signals = 0
        self._hooks: list[Callable[[], None]] = []
        self._force_hooks: list[Callable[[], None]] = []

    def add_hook(self, fn: Callable[[], None], *, force: bool = False) -> None:
        (self._force_hooks if force else self._hooks).append(fn)

    def set(self) -> None:
        first = not self.is_set()
        super().set()
        if first:
            for fn in self._hooks:
                fn()

    def on_signal(self, signum: int, _frame: FrameType | None = None) -> None:
        self.signals += 1
        name = signal.Signals(signum).name
        if self.signals == 1:
            log.info("%s received: finishing the current case, then stopping", name)
            self.set()
            return
        log.warning("%s received again: stopping now", name)
        for fn in self._force_hooks:
            fn()
        raise SystemExit(1)


def _install_signals(stop: StopFlag, *, ignore_sigint: bool = False) -> Callable[[], None]:
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    old = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    signal.signal(signal.SIGTERM, stop.on_signal)
    signal.signal(signal.SIGINT, signal.SIG_IGN if ignore_sigint else stop.on_signal)

    def restore() -> None:
        for sig, handler in old.items():
            signal.signal(sig, handler)

    return restore


# --------------------------------------------------------------------------------------------------
# Scanner: ready folders -> jobs


class Scanner:
    """Finds ready case folders and queues them; inotify (watchdog) or polling decides how often it looks."""

    def __init__(self, database: Database, settings: Settings, paths: WatchPaths,
                 on_queued: Callable[[], None] | None = None) -> None:
        self.database = database
        self.settings = settings
        self.paths = paths
        self.on_queued = on_queued
        self.tracker = ReadyTracker(paths.incoming, settings.quiet_seconds,
                                    exclude=(paths.processed, paths.failed, paths.reports),
                                    readiness=settings.readiness)
        self._wake = threading.Event()

    def wake(self) -> None:
        self._wake.set()

    def scan(self) -> int:
        """Queue every folder that became ready; returns how many are still being written."""
        ready, pending = self.tracker.scan()
        while self.tracker.strays:
            self._stray(self.tracker.strays.pop())
        for folder in ready:
            if not self._enqueue(folder):
                self.tracker.forget(folder.name)
                pending += 1
        return pending

    def _enqueue(self, folder: Path) -> bool:
        """Queue one ready folder; False when it must be looked at again later."""
        try:
            result = jobs.enqueue(self.database, folder)
        except InvalidCaseId as exc:
            self._reject(folder, str(exc))
            return True
        except (ChromobatchError, SQLAlchemyError, OSError) as exc:
            log.error("cannot queue folder %s: %s (will try again)", folder.name, exc)
            return False
        if result.action == "queued":
            log.info("case %s: queued (job %d)", result.case_id, result.job_id)
            if self.on_queued is not None:
                self.on_queued()
        elif result.action == "leftover":
            return self._leftover(folder, result)
        elif result.action == "active":
            log.debug("case %s: job %s already %s", result.case_id, result.job_id, result.job_state)
        return True

    def _leftover(self, folder: Path, result: jobs.EnqueueResult) -> bool:
        """A folder whose job already finished but was not moved (its worker died right after the commit)."""
        age = (utcnow() - result.finished_at).total_seconds() if result.finished_at else float("inf")
        if age < self.settings.stale_after_seconds:
            return False  # its worker is probably moving it right now; look again later
        dest_root = self.paths.processed if result.job_state == "done" else self.paths.failed
        dest = move_case(folder, dest_root)
        if dest is not None:
            jobs.set_case_location(self.database, result.case_id, dest)
            log.info("case %s: already %s by job %d; moved the folder left behind to %s", result.case_id,
                     result.job_state, result.job_id, dest)
        return True

    def _stray(self, file: Path) -> None:
        """A file where a case folder was expected: moved to failed/ with the reason beside it."""
        reason = (f"{file.name} is a file, not a case folder: put a case's files into a folder named after "
                  f"the case")
        try:
            dest = move_case(file, self.paths.failed)
        except JobError as exc:
            log.error("%s; and %s", reason, exc)
            return
        if dest is not None:
            try:
                with dest.with_name(f"{dest.name}.{ERROR_FILE}").open("a", encoding="utf-8") as fh:
                    fh.write(f"{utcnow().isoformat(timespec='seconds')} {reason}\n")
            except OSError as exc:
                log.warning("cannot write the reason beside %s: %s", dest, exc)
            log.warning("%s; moved to %s", reason, dest)

    def _reject(self, folder: Path, reason: str) -> None:
        try:
            dest = move_case(folder, self.paths.failed)
        except JobError as exc:
            log.error("%s; and %s", reason, exc)
            return
        if dest is not None:
            _write_error_file(dest, reason)
            log.warning("%s: moved to %s", reason, dest)

    def _tick(self, pending: int) -> float:
        if self.settings.poll_seconds > 0:
            return self.settings.poll_seconds
        if pending:
            return min(1.0, max(0.05, self.settings.quiet_seconds / 4))
        return 5.0  # a safety rescan: inotify can drop events when its queue overflows

    def settle(self, stop: threading.Event) -> None:
        """Scan until no folder is still being written (for --once)."""
        while not stop.is_set():
            pending = self.scan()
            if pending == 0:
                return
            stop.wait(self._tick(pending))

    def _start_observer(self) -> Any:
        if self.settings.poll_seconds > 0:
            return None
        from watchdog.events import FileSystemEvent, FileSystemEventHandler
        from watchdog.observers import Observer

        wake = self.wake

        class _Wake(FileSystemEventHandler):
            def on_any_event(self, event: FileSystemEvent) -> None:
                wake()

        observer = Observer()
        try:
            observer.schedule(_Wake(), str(self.paths.incoming), recursive=True)
            observer.start()
        except OSError as exc:  # e.g. the inotify watch limit
            log.warning("inotify unavailable (%s); scanning every second instead", exc)
            return None
        return observer

    def run(self, stop: threading.Event) -> None:
        """Scan on every file system event (or every poll_seconds) until stop is set."""
        observer = self._start_observer()
        stop_wake = self.wake
        if isinstance(stop, StopFlag):
            stop.add_hook(stop_wake)
        try:
            while not stop.is_set():
                try:
                    pending = self.scan()
                except Exception:  # noqa: BLE001 - the scanner must outlive any one bad folder
                    log.exception("scan of %s failed; trying again", self.paths.incoming)
                    pending = 1
                tick = self._tick(pending) if observer is not None or self.settings.poll_seconds > 0 else 1.0
                self._wake.wait(tick)
                self._wake.clear()
        finally:
            if observer is not None:
                observer.stop()
                observer.join(timeout=5)


# --------------------------------------------------------------------------------------------------
# Worker: jobs -> pipeline -> processed/ or failed/


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
        log.info("worker %s stopped", self.name)

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
            if render_and_record(self.database, case_id, self.paths.reports) is not None:
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
            self.handle(job)
        finally:
            release_freed_memory()
        return True

    def reclaim(self, *, force: bool = False) -> list[jobs.ReclaimedJob]:
        now = time.monotonic()
        if not force and now - self._last_reclaim < min(1.0, self.settings.stale_after_seconds / 2):
            return []
        self._last_reclaim = now
        out = jobs.reclaim_stale(self.database, stale_after=self.settings.stale_after_seconds,
                                 max_attempts=self.settings.max_attempts)
        for r in out:
            if r.state == "queued":
                log.warning("case %s: job %d of worker %s lost its heartbeat; queued again", r.case_id, r.id,
                            r.worker)
            else:
                dest = self._move(Path(r.path), self.paths.failed, r.case_id)
                log.error("case %s: job %d lost its heartbeat on its last attempt; failed%s", r.case_id, r.id,
                          f", moved to {dest}" if dest else "")
                if dest is not None:
                    _write_error_file(dest, f"case {r.case_id} failed: its worker died on every attempt")
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

    def handle(self, job: jobs.ClaimedJob) -> None:
        """Process one claimed job; every outcome is recorded on the job, none escapes but a stop."""
        t0 = time.perf_counter()
        waited = (utcnow() - job.created_at).total_seconds() if job.created_at else 0.0
        self._maybe_reload()
        assert self.process is not None, "Worker.load() was not called"
        folder = Path(job.path)
        with _Heartbeat(self.database, job.id, self.name, self.settings.heartbeat_seconds):
            tries = 0
            while True:
                try:
                    result = self.process(self.database, folder, predictor=self.predictor, settings=self.settings,
                                          job_id=job.id, job_worker=self.name, reports_dir=self.paths.reports)
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
        if state == "failed":
            if self._still_changing(job, folder):
                return
            dest = self._move(folder, self.paths.failed, job.case_id)
            if dest is not None:
                _write_error_file(dest, f"case {job.case_id} failed: {error}")
            log.warning("case %s: failed after %.2fs: %s; folder -> %s %s", job.case_id, elapsed, error,
                        dest or "(gone)", where)
        elif state == "queued":
            log.warning("case %s: attempt failed after %.2fs, will retry: %s %s", job.case_id, elapsed, error,
                        where)
        elif state == "done":  # the results were committed before the error: the case is finished
            self._move(folder, self.paths.processed, job.case_id)
            log.warning("case %s: done, but a later step failed: %s %s", job.case_id, error, where)
        else:
            log.warning("case %s: attempt failed (%s) but the job is no longer ours (%s) %s", job.case_id,
                        error, state, where)


# --------------------------------------------------------------------------------------------------
# Entry point


def watch(incoming: str | Path, settings: Settings, *, once: bool = False, reports_dir: str | Path | None = None,
          worker_only: bool = False, process: ProcessFn | None = None, predictor: Any = None,
          stop: StopFlag | None = None) -> int:
    """Watch `incoming` until stopped (or, with once, until everything waiting is processed); exit code.

    process/predictor replace the pipeline (tests, embedding); they run in this process, one worker.
    """
    paths = resolve_paths(incoming, settings, reports_dir)
    if process is not None and settings.workers > 1 and not worker_only:
        raise ConfigError("an injected process function runs in one worker; use workers = 1")
    for folder in (paths.processed, paths.failed):
        folder.mkdir(parents=True, exist_ok=True)
    database = connect(settings.db)
    stop = stop or StopFlag()
    restore = _install_signals(stop, ignore_sigint=worker_only)
    try:
        if worker_only:
            Worker(database, settings, paths, process=process, predictor=predictor, stop=stop,
                   watch_parent=True).run(once=once)
            return 0
        mode = f"polling every {settings.poll_seconds:g}s" if settings.poll_seconds > 0 else "inotify"
        log.info("watching %s (%s, quiet %gs, %d worker%s%s); done -> %s, failed -> %s, reports -> %s",
                 paths.incoming, mode, settings.quiet_seconds, settings.workers, "s" * (settings.workers > 1),
                 ", once" if once else "", paths.processed, paths.failed, paths.reports)
        scanner = Scanner(database, settings, paths)
        if settings.workers > 1:
            return _supervise(database, settings, paths, scanner, stop, once=once)
        worker = Worker(database, settings, paths, process=process, predictor=predictor, stop=stop)
        worker.load()
        if once:
            scanner.settle(stop)
            worker.run(once=True)
            return 0
        scanner.on_queued = worker.wake
        stop.add_hook(worker.wake)
        thread = threading.Thread(target=scanner.run, args=(stop,), name="chromobatch-scanner", daemon=True)
        thread.start()
        try:
            worker.run()
        finally:
            threading.Event.set(stop)  # end the scanner too, without running the signal hooks again
            scanner.wake()
            thread.join(timeout=10)
        return 0
    finally:
        restore()
        database.dispose()


@dataclass
class _Child:
    index: int
    proc: subprocess.Popen[bytes]
    started: float
    #: Deaths within CHILD_MIN_LIFETIME_S of their start, in a row, of this worker slot's earlier children;
    #: updated to include this child once it has died.
    quick_failures: int = 0
    #: The stop request (SIGTERM) was forwarded to it.
    signalled: bool = False
    #: When its replacement is due (time.monotonic()); set once its death has been handled.
    restart_at: float | None = None


def _child_env(settings: Settings, database: Database, paths: WatchPaths) -> dict[str, str]:
    """Every effective setting as CHROMOBATCH_* so a child sees exactly what this process sees."""
    env = dict(os.environ)
    values = settings.as_dict()
    values.update(db=database.url, workers=1, processed_dir=str(paths.processed), failed_dir=str(paths.failed),
                  reports_dir=str(paths.reports))
    for key, value in values.items():
        env[ENV_PREFIX + key.upper()] = str(value)
    return env


def _supervise(database: Database, settings: Settings, paths: WatchPaths, scanner: Scanner, stop: StopFlag, *,
               once: bool) -> int:
    """Run settings.workers worker processes; this process scans and restarts a worker process that dies.

    A dead worker is restarted after a delay (CHILD_RESTART_DELAY_S) that doubles while it keeps dying within
    CHILD_MIN_LIFETIME_S of its start; CHILD_MAX_QUICK_FAILURES such deaths in a row of one worker stop the
    watcher (exit 1): that is a broken model or setting, not bad luck. With once, a dead worker is not
    replaced (the others finish the queue, and the exit code says one failed).
    """
    level = logging.getLevelName(logging.getLogger().getEffectiveLevel())
    # -P (safe_path, Python >= 3.11): `python -m` would put the current directory first on sys.path, and a
    # typer.py, torch.py or chromobatch/ there would be imported (and run) by every worker. Not -I: it also
    # implies -E and -s, which drop PYTHONPATH and the user site-packages, and a deployment may find
    # chromobatch (or its dependencies) only through those, as this process did.
    cmd = [sys.executable, "-P", "-m", "chromobatch.cli", "--log-level", str(level), "watch", str(paths.incoming),
           "--worker-only", "--reports", str(paths.reports)] + (["--once"] if once else [])
    env = _child_env(settings, database, paths)
    children: dict[int, _Child] = {}
    # Reentrant: the signal handler (which forwards SIGTERM) runs in the main thread, maybe while it holds this.
    lock = threading.RLock()

    def forward(force: bool = False) -> None:
        with lock:
            for child in children.values():
                if child.proc.poll() is None and (force or not child.signalled):
                    child.signalled = True
                    try:
                        child.proc.send_signal(signal.SIGTERM)
                    except ProcessLookupError:
                        pass

    stop.add_hook(forward)
    stop.add_hook(lambda: forward(force=True), force=True)

    def start(index: int, quick_failures: int = 0) -> None:
        with lock:
            if stop.is_set():
                return
            # A session of its own: a terminal's Ctrl-C reaches only this process, which forwards SIGTERM once.
            proc = subprocess.Popen(cmd, env=env, start_new_session=True)
            children[index] = _Child(index, proc, time.monotonic(), quick_failures=quick_failures)
            if stop.is_set():  # the stop request arrived while it was being started
                forward()
        log.info("worker process %d started (pid %d)", index, proc.pid)

    thread: threading.Thread | None = None
    if once:
        scanner.settle(stop)
    else:
        thread = threading.Thread(target=scanner.run, args=(stop,), name="chromobatch-scanner", daemon=True)
        thread.start()
    failed = False
    try:
        if not stop.is_set():
            for i in range(settings.workers):
                start(i)
        while True:
            now = time.monotonic()
            with lock:
                current = list(children.values())
            running = [c for c in current if c.proc.poll() is None]
            if not running and (once or stop.is_set() or failed):
                break
            for child in current:
                if once or stop.is_set() or failed:
                    break
                if child.restart_at is not None:  # dead, handled: its replacement is due at restart_at
                    if child.restart_at <= now:
                        start(child.index, child.quick_failures)
                    continue
                if child.proc.poll() is None:
                    continue
                rc = child.proc.returncode
                lived = now - child.started
                child.quick_failures = child.quick_failures + 1 if lived < CHILD_MIN_LIFETIME_S else 0
                if child.quick_failures >= CHILD_MAX_QUICK_FAILURES:
                    log.error("worker process %d failed %d times in a row within %g s of starting (last exit code "
                              "%s); stopping: check the model and the settings", child.index, child.quick_failures,
                              CHILD_MIN_LIFETIME_S, rc)
                    failed = True
                    threading.Event.set(stop)
                    forward()
                    break
                # 1 s after a long life or a first quick death, then 2 s, 4 s, ... up to the cap
                delay = min(CHILD_RESTART_DELAY_MAX_S, CHILD_RESTART_DELAY_S * 2 ** max(child.quick_failures - 1, 0))
                child.restart_at = now + delay
                log.error("worker process %d (pid %d) exited with code %s after %.1fs; starting a new one in %gs",
                          child.index, child.proc.pid, rc, lived, delay)
            if stop.is_set() or failed:
                time.sleep(0.2)
            else:
                stop.wait(0.25)
    finally:
        if thread is not None:
            threading.Event.set(stop)
            scanner.wake()
            thread.join(timeout=10)
    with lock:
        ended = list(children.values())
    log.info("worker processes ended with codes %s", [c.proc.returncode for c in ended])
    # A child whose death was handled (a replacement was due) does not count: the stop request came first.
    return 1 if failed or any(c.proc.returncode != 0 for c in ended if c.restart_at is None) else 0
