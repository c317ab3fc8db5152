"""The supervisor: with settings.workers > 1, this process scans and runs that many worker processes.

Each worker process is this command again with --worker-only, so it loads its own model and claims jobs from
the shared queue (separate watchers on one PostgreSQL database split the queue the same way). A worker
process that dies is restarted, since a kill (OOM, an operator's kill -9) should not end the watcher; one that
keeps dying right after its start is a broken model or setting, and then the watcher stops (exit 1) instead
of restarting it forever.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass

from chromobatch.config import ENV_PREFIX, Settings
from chromobatch.faults import backoff
from chromobatch.ml.renderpool import auto_processes
from chromobatch.service.casefolders import WatchPaths
from chromobatch.service.scanner import Scanner
from chromobatch.service.stopping import StopFlag
from chromobatch.store.db import Database

log = logging.getLogger(__name__)

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


def child_env(settings: Settings, database: Database, paths: WatchPaths) -> dict[str, str]:
    """Every effective setting as CHROMOBATCH_* so a child sees exactly what this process sees, except that
    each child is one worker, and so its share of the cores for rendering is worked out here, among all of
    them (a child that saw `workers = 1` would take every core for itself: 2 workers x 2 render processes on 2
    cores)."""
    env = dict(os.environ)
    values = settings.as_dict()
    values.update(db=database.url, workers=1, processed_dir=str(paths.processed), failed_dir=str(paths.failed),
                  reports_dir=str(paths.reports),
                  render_processes=auto_processes(settings.render_processes, settings.workers))
    for key, value in values.items():
        env[ENV_PREFIX + key.upper()] = str(value)
    return env



def worker_command(paths: WatchPaths, *, once: bool) -> list[str]:
    """The command line of a worker process: this watcher again, with --worker-only and this log level."""
    level = logging.getLevelName(logging.getLogger().getEffectiveLevel())
    # -P (safe_path, Python >= 3.11): `python -m` would put the current directory first on sys.path, and a
    # typer.py, torch.py or chromobatch/ there would be imported (and run) by every worker. Not -I: it also
    # implies -E and -s, which drop PYTHONPATH and the user site-packages, and a deployment may find
    # chromobatch (or its dependencies) only through those, as this process did.
    return [sys.executable, "-P", "-m", "chromobatch.cli", "--log-level", str(level), "watch", str(paths.incoming),
            "--worker-only", "--reports", str(paths.reports)] + (["--once"] if once else [])


class Supervisor:
    """The worker processes of one watcher: starts them, forwards the stop request, restarts the dead."""

    def __init__(self, cmd: list[str], env: dict[str, str], workers: int, stop: StopFlag, *, once: bool) -> None:
        self.cmd, self.env, self.workers, self.stop, self.once = cmd, env, workers, stop, once
        self.children: dict[int, _Child] = {}
        #: CHILD_MAX_QUICK_FAILURES quick deaths in a row of one worker slot: the watcher is stopping (exit 1).
        self.failed = False
        # Reentrant: the signal handler (which forwards SIGTERM) runs in the main thread, maybe while it holds this.
        self.lock = threading.RLock()

    def forward(self, force: bool = False) -> None:
        """Send SIGTERM to each running child not told yet (with force: to each running child again)."""
        with self.lock:
            for child in self.children.values():
                if child.proc.poll() is None and (force or not child.signalled):
                    child.signalled = True
                    try:
                        child.proc.send_signal(signal.SIGTERM)
                    except ProcessLookupError:
                        pass

    def start(self, index: int, quick_failures: int = 0) -> None:
        with self.lock:
            if self.stop.is_set():
                return
            # A session of its own: a terminal's Ctrl-C reaches only this process, which forwards SIGTERM once.
            proc = subprocess.Popen(self.cmd, env=self.env, start_new_session=True)
            self.children[index] = _Child(index, proc, time.monotonic(), quick_failures=quick_failures)
            if self.stop.is_set():  # the stop request arrived while it was being started
                self.forward()
        log.info("worker process %d started (pid %d)", index, proc.pid)

    def _winding_down(self) -> bool:
        """No more restarts: a one-off run, a stop request, or a worker that cannot start."""
        return self.once or self.stop.is_set() or self.failed

    def run(self) -> None:
        """Start the workers and look after them until all have ended and none is to be restarted."""
        if not self.stop.is_set():
            for i in range(self.workers):
                self.start(i)
        while True:
            now = time.monotonic()
            with self.lock:
                current = list(self.children.values())
            running = [c for c in current if c.proc.poll() is None]
            if not running and self._winding_down():
                break
            for child in current:
                if self._winding_down() or not self._tend(child, now):
                    break
            if self.stop.is_set() or self.failed:
                time.sleep(0.2)
            else:
                self.stop.wait(0.25)

    def _tend(self, child: _Child, now: float) -> bool:
        """Start a dead child's replacement when due, or handle a death just seen; False: stop the watcher."""
        if child.restart_at is not None:  # dead, handled: its replacement is due at restart_at
            if child.restart_at <= now:
                self.start(child.index, child.quick_failures)
            return True
        if child.proc.poll() is None:
            return True
        rc = child.proc.returncode
        lived = now - child.started
        child.quick_failures = child.quick_failures + 1 if lived < CHILD_MIN_LIFETIME_S else 0
        if child.quick_failures >= CHILD_MAX_QUICK_FAILURES:
            log.error("worker process %d failed %d times in a row within %g s of starting (last exit code "
                      "%s); stopping: check the model and the settings", child.index, child.quick_failures,
                      CHILD_MIN_LIFETIME_S, rc)
            self.failed = True
            threading.Event.set(self.stop)
            self.forward()
            return False
        # 1 s after a long life or a first quick death, then 2 s, 4 s, ... up to the cap
        delay = backoff(child.quick_failures, first=CHILD_RESTART_DELAY_S, cap=CHILD_RESTART_DELAY_MAX_S)
        child.restart_at = now + delay
        log.error("worker process %d (pid %d) exited with code %s after %.1fs; starting a new one in %gs",
                  child.index, child.proc.pid, rc, lived, delay)
        return True

    def exit_code(self) -> int:
        """1 when a worker could not start or one ended badly; logs every worker's exit code."""
        with self.lock:
            ended = list(self.children.values())
        log.info("worker processes ended with codes %s", [c.proc.returncode for c in ended])
        # A child whose death was handled (a replacement was due) does not count: the stop request came first.
        return 1 if self.failed or any(c.proc.returncode != 0 for c in ended if c.restart_at is None) else 0


def supervise(database: Database, settings: Settings, paths: WatchPaths, scanner: Scanner, stop: StopFlag, *,
              once: bool) -> int:
    """Run settings.workers worker processes; this process scans and restarts a worker process that dies.

    A dead worker is restarted after a delay (CHILD_RESTART_DELAY_S) that doubles while it keeps dying within
    CHILD_MIN_LIFETIME_S of its start; CHILD_MAX_QUICK_FAILURES such deaths in a row of one worker stop the
    watcher (exit 1): that is a broken model or setting, not bad luck. With once, a dead worker is not
    replaced (the others finish the queue, and the exit code says one failed).
    """
    supervisor = Supervisor(worker_command(paths, once=once), child_env(settings, database, paths),
                            settings.workers, stop, once=once)
    stop.add_hook(supervisor.forward)
    stop.add_hook(lambda: supervisor.forward(force=True), force=True)
    if once:
        scanner.settle(stop)
    with contextlib.nullcontext() if once else scanner.in_background(stop):
        supervisor.run()
    return supervisor.exit_code()
