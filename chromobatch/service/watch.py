"""`chromobatch watch`: process every case folder dropped into an incoming folder, once.

* A case is a direct sub-folder of incoming (hidden folders are ignored). It is *ready* when it holds a
  `READY` (or `ready.txt`) marker, or when nothing in it changed for settings.quiet_seconds, judged by file
  count, sizes and the newest ctime, seen unchanged on two scans in a row. So a slow copy (or an rsync with
  hidden temporary files) is never read half-written, and folders already waiting at start are taken.
  settings.readiness chooses: `either` (marker or quiet, the default), `quiet`, or `ready` (the marker
  only, however long a copy pauses). An empty folder is not a case yet (said once in the log); a file
  where a case folder was expected is moved to failed/ with the reason beside it. A folder whose files
  changed after its job started is not moved: the next scan queues it again, with everything in it.
  (chromobatch.service.readiness)
* Change detection: watchdog's inotify observer wakes the scanner; `--poll SECONDS` (settings.poll_seconds
  > 0) scans every SECONDS instead, for network shares where inotify sees nothing. The scan is always the
  source of truth, the events only make it prompt. (chromobatch.service.scanner)
* Ready folders become jobs (chromobatch.store.jobs); workers claim them, call the pipeline, and move the
  folder to processed/ (done or skipped) or failed/ (bad input, or max_attempts used up; the reason is also
  written to `chromobatch-error.txt` inside it). Folders are never deleted; a name clash gets a suffix
  (`CASE.1`, `CASE.2`, ...). Relative processed_dir, failed_dir and reports_dir settings are relative to
  the incoming folder's *parent* (`/data/incoming` -> `/data/processed`), which keeps them out of the
  watched tree; `--reports` on the command line is relative to the current directory.
  (chromobatch.service.casefolders)
* Bad input (chromobatch.errors.InputError: an empty case, an invalid folder name) fails at once; a
  transient fault (chromobatch.faults: a full disk, a locked or read-only database, a lost connection) is
  retried with exponential backoff (1 s doubling to 60 s) without spending an attempt; any other error (a
  bug) is retried up to settings.max_attempts. The report is a step of its own (chromobatch.service.reports):
  idle workers render the reports that are due, and `chromobatch status` lists those still missing.
  A worker killed mid-case leaves its job `running` with a heartbeat that stops; another worker (or the
  next start) re-queues it after settings.stale_after_seconds. (chromobatch.service.worker)
* `settings.workers` > 1 runs that many worker processes (this command again with --worker-only) while
  this process scans and supervises; separate watchers on one PostgreSQL database split the queue too.
  (chromobatch.service.supervisor)
* SIGTERM/SIGINT: finish the current case, then exit 0; a second signal stops at once (the case's
  transaction rolls back and its job is re-queued when its heartbeat expires). (chromobatch.service.stopping)

This module is the entry point that puts those together: one process that scans and works, one that scans
and supervises worker processes, or (--worker-only) one such worker process.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from chromobatch.config import Settings
from chromobatch.errors import ConfigError
from chromobatch.service.casefolders import resolve_paths
from chromobatch.service.scanner import Scanner
from chromobatch.service.stopping import StopFlag, install_signals
from chromobatch.service.supervisor import supervise
from chromobatch.service.worker import ProcessFn, Worker
from chromobatch.store.db import connect

log = logging.getLogger(__name__)


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
    restore = install_signals(stop, ignore_sigint=worker_only)
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
            return supervise(database, settings, paths, scanner, stop, once=once)
        worker = Worker(database, settings, paths, process=process, predictor=predictor, stop=stop)
        worker.load()
        if once:
            scanner.settle(stop)
            worker.run(once=True)
            return 0
        scanner.on_queued = worker.wake
        stop.add_hook(worker.wake)
        with scanner.in_background(stop):
            worker.run()
        return 0
    finally:
        restore()
        database.dispose()
