"""Transient or permanent: how the watcher tells a passing fault from a bad case.

Why: a database on a full disk, a locked or read-only SQLite file, or a PostgreSQL connection cut for a
moment say nothing about the case being processed. Spending the case's attempts on them fails good cases
for good; instead the worker waits (exponential backoff with a cap) and tries the same case again. A bad
case (chromobatch.errors.InputError) is permanent; anything else is a bug and is retried up to
max_attempts as before.
"""

from __future__ import annotations

import errno

from sqlalchemy.exc import DBAPIError, DisconnectionError, InterfaceError, OperationalError

#: errno values of a file system that is full, read-only or briefly unavailable.
TRANSIENT_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO, errno.EAGAIN, errno.EBUSY,
                              errno.ENOMEM, errno.ETIMEDOUT, errno.ESTALE})


def transient_reason(exc: BaseException) -> str | None:
    """A short description when `exc` is a passing fault of the database or the disk; None otherwise.

    The text names what failed (the driver's message, an errno and a path), never row values: the engine
    runs with hide_parameters, so SQL errors carry no patient data.
    """
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:  # the error, or what caused it
        seen.add(id(current))
        if isinstance(current, InterfaceError | DisconnectionError) or (
                isinstance(current, OperationalError) and _passing(current.orig)):
            return f"database: {str(getattr(current, 'orig', None) or current).splitlines()[0][:300]}"
        if isinstance(current, DBAPIError) and current.connection_invalidated:
            return f"database connection lost: {str(current.orig).splitlines()[0][:300]}"
        if isinstance(current, OSError) and current.errno in TRANSIENT_ERRNOS:
            where = f" ({current.filename})" if current.filename else ""
            return f"{current.strerror or errno.errorcode.get(current.errno or 0, 'OSError')}{where}"
        current = current.__cause__ or current.__context__
    return None


#: SQLite result codes of a fault that passes (busy or locked, a full disk, read-only, I/O, cannot open).
SQLITE_PASSING = ("SQLITE_BUSY", "SQLITE_LOCKED", "SQLITE_FULL", "SQLITE_READONLY", "SQLITE_IOERR",
                  "SQLITE_CANTOPEN", "SQLITE_PROTOCOL")
#: PostgreSQL SQLSTATE classes and codes of the same kind: connection, resources, operator intervention,
#: serialization failure and deadlock (the transaction is tried again as a whole).
PG_PASSING = ("08", "53", "57P", "40001", "40P01")


def _passing(orig: BaseException | None) -> bool:
    """An OperationalError is also what SQLite raises for 'no such column': only the driver's code tells."""
    name = getattr(orig, "sqlite_errorname", None)
    if name is not None:
        return str(name).startswith(SQLITE_PASSING)
    state = getattr(orig, "sqlstate", None)
    if state is not None:
        return str(state).startswith(PG_PASSING)
    return True  # a driver error without a code (a connection that failed to open): treat as passing


def backoff(tries: int, *, first: float, cap: float) -> float:
    """Seconds to wait before try number `tries` + 1 (tries >= 1): first, 2*first, 4*first, ... up to cap."""
    return min(cap, first * 2.0 ** max(tries - 1, 0))
