"""The training lock: only one training run at a time, on this host and on every host sharing the database.

An OS file lock (fcntl.flock, released by the kernel when the process dies, so a killed run never leaves a
stale lock) plus, on PostgreSQL, a session advisory lock, so runs on different hosts sharing the database
never overlap. The lock is tried, never waited for: a second run raises TrainingLocked and the CLI exits
with LOCKED_EXIT_CODE (75, EX_TEMPFAIL), which the systemd unit counts as success.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from sqlalchemy.engine import Connection

from chromobatch.errors import TrainingLocked
from chromobatch.store.db import Database, utcnow

#: pg_try_advisory_lock key of training runs (`db upgrade` uses 727274).
ADVISORY_LOCK_KEY = 727275


class TrainingLock:
    """flock on `path` (+ pg_try_advisory_lock on PostgreSQL), held for the whole run, never waited for."""

    def __init__(self, path: Path, database: Database | None = None) -> None:
        self.path = Path(path)
        self.database = database
        self._fd: int | None = None
        self._conn: Connection | None = None

    def acquire(self) -> TrainingLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise TrainingLocked(f"another training run holds the lock {self.path}") from None
        self._fd = fd
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} since {utcnow().isoformat(timespec='seconds')}\n".encode())
        if self.database is not None and self.database.dialect == "postgresql":
            conn = self.database.engine.connect().execution_options(isolation_level="AUTOCOMMIT")
            got = conn.exec_driver_sql(f"SELECT pg_try_advisory_lock({ADVISORY_LOCK_KEY})").scalar()
            if not got:
                conn.close()
                self.release()
                raise TrainingLocked("another training run holds the database's training lock "
                                     f"(pg advisory lock {ADVISORY_LOCK_KEY}, possibly on another host)")
            self._conn = conn
        return self

    def release(self) -> None:
        if self._conn is not None:
            try:
                self._conn.exec_driver_sql(f"SELECT pg_advisory_unlock({ADVISORY_LOCK_KEY})")
            finally:
                self._conn.close()
                self._conn = None
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> TrainingLock:
        return self.acquire()

    def __exit__(self, *_exc: object) -> None:
        self.release()


def default_lock_path(database: Database, models_dir: Path) -> Path:
    """Next to a SQLite file (`cases.sqlite.train.lock`); in the models folder for a server database."""
    url = database.url
    if url.startswith("sqlite:///"):
        return Path(url.removeprefix("sqlite:///") + ".train.lock")
    return Path(models_dir) / ".train.lock"
