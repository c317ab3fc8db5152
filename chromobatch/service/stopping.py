"""Stopping the watcher: SIGTERM/SIGINT finish the current case, then exit 0; a second signal stops at once.

A stop at once is safe because of the transaction: the case's transaction rolls back and its job is
re-queued when its heartbeat expires. The flag is a threading.Event so the scanner, the workers and the
supervisor can all wait on it; hooks let each of them be woken (or its children signalled) when it is set.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable
from types import FrameType

log = logging.getLogger(__name__)


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


def install_signals(stop: StopFlag, *, ignore_sigint: bool = False) -> Callable[[], None]:
    """Route SIGTERM (and SIGINT unless ignored) to `stop`; returns what puts the old handlers back.

    Only the main thread may install handlers, so an embedding that calls watch() from another thread keeps
    its own. A worker process ignores SIGINT: its supervisor forwards the stop as SIGTERM, once.
    """
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    old = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    signal.signal(signal.SIGTERM, stop.on_signal)
    signal.signal(signal.SIGINT, signal.SIG_IGN if ignore_sigint else stop.on_signal)

    def restore() -> None:
        for sig, handler in old.items():
            signal.signal(sig, handler)

    return restore
