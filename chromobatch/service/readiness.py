"""When a case folder in incoming is complete, so that the watcher never reads a case half-written.

A folder is ready on its `READY` (or `ready.txt`) marker, or when it is quiet for settings.quiet_seconds;
settings.readiness chooses which counts (the overview is in chromobatch.service.watch). Quiet is judged by a
signature (file count, bytes, newest ctime of everything in the folder, hidden files included), not by file
system events: the scan must be right on a network share where inotify sees nothing, and an rsync writing
under hidden temporary names still changes the signature. The signature must be seen unchanged on two scans
in a row, since one look cannot tell a finished copy from a paused one; a folder already waiting at start
(its newest ctime old) then needs no further quiet period. What is not a case yet is said once in the log,
not on every scan.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from chromobatch.errors import InputError

log = logging.getLogger(__name__)

MARKER_NAMES = frozenset({"ready", "ready.txt"})


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

