"""The scanner: ready case folders become jobs (chromobatch.store.jobs), once each.

Change detection: watchdog's inotify observer wakes the scanner; `--poll SECONDS` (settings.poll_seconds > 0)
scans every SECONDS instead, for network shares where inotify sees nothing. The scan is always the source of
truth, the events only make it prompt. A folder with an invalid case name, or a file where a case folder was
expected, is moved to failed/ with the reason beside it; a folder whose job finished but which was not moved
(its worker died right after the commit) is moved on the worker's behalf.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from sqlalchemy.exc import SQLAlchemyError

from chromobatch.config import Settings
from chromobatch.errors import ChromobatchError, InvalidCaseId, JobError
from chromobatch.service.casefolders import ERROR_FILE, WatchPaths, append_reason, move_case, write_error_file
from chromobatch.service.readiness import ReadyTracker
from chromobatch.service.stopping import StopFlag
from chromobatch.store import jobs
from chromobatch.store.db import Database, utcnow
from chromobatch.store.states import JobState

log = logging.getLogger(__name__)


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
        dest_root = self.paths.processed if result.job_state == JobState.DONE else self.paths.failed
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
        dest = self._to_failed(file, reason)
        if dest is not None:
            try:
                append_reason(dest.with_name(f"{dest.name}.{ERROR_FILE}"), reason)
            except OSError as exc:
                log.warning("cannot write the reason beside %s: %s", dest, exc)
            log.warning("%s; moved to %s", reason, dest)

    def _reject(self, folder: Path, reason: str) -> None:
        """A folder that cannot be a case (an invalid case ID): moved to failed/ with the reason inside it."""
        dest = self._to_failed(folder, reason)
        if dest is not None:
            write_error_file(dest, reason)
            log.warning("%s: moved to %s", reason, dest)

    def _to_failed(self, path: Path, reason: str) -> Path | None:
        """Move what can never be a case to failed/; None when it is gone or could not be moved (logged)."""
        try:
            return move_case(path, self.paths.failed)
        except JobError as exc:
            log.error("%s; and %s", reason, exc)
            return None

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

    @contextlib.contextmanager
    def in_background(self, stop: threading.Event) -> Iterator[None]:
        """Scan in a thread of its own while the block runs; on leaving, end the scan and wait for it."""
        thread = threading.Thread(target=self.run, args=(stop,), name="chromobatch-scanner", daemon=True)
        thread.start()
        try:
            yield
        finally:
            threading.Event.set(stop)  # end the scanner too, without running the signal hooks again
            self.wake()
            thread.join(timeout=10)
