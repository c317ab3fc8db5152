"""The classifier's input canvases rendered on every core, in a pool of processes, before the forward pass;
the same pool reads and decodes a large case's files (`RenderPool.map`, used by `intake.scan.scan_case`).

Why processes, and why *before* the forward pass rather than beside it: rendering a crop (`preprocess.render`:
upright, background, scale, canvas) is about 0.5 ms of small numpy, scipy and Pillow calls that hold the GIL.
On a 2-core machine (AMD EPYC Zen 4, PyTorch bf16, 555 crops; docs/benchmarks.md, tenth session) the forward
pass already keeps both cores busy, so rendering beside it in a thread only slowed it (300 crops/s for render
and forward together) against rendering first, then the forward pass (310 crops/s). Two threads render slower
than one (1,580 against 1,960 crops/s: the GIL); two processes render 3,400 crops/s. So the canvases of a case
are rendered first, split across the pool, and the forward pass then has the cores to itself.

A pool is started only by a long-lived process (the watcher's worker, through `Predictor.warm_up`): starting
processes costs about a second, more than a one-off `chromobatch process` of a few cells gains. A pool that
breaks (a worker killed) is logged, the case renders in-process and a new pool is started.
The workers import no torch (`preprocess` imports it lazily), so each costs tens of MB, not hundreds.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any, TypeVar

import numpy as np

from chromobatch.ml.preprocess import PreprocessSpec, render

log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")

#: Fewer crops than this render in-process: a chunk's round trip to a worker costs more than it saves.
MIN_FOR_POOL = 64


def auto_processes(setting: int, workers: int = 1) -> int:
    """Processes for the `render_processes` setting: 0 (auto) is the cores shared among the watcher's
    `workers` (at most 4 each), 1 is none (in-process)."""
    if setting > 0:
        return setting
    return max(1, min((os.cpu_count() or 1) // max(1, workers), 4))


def _worker_init(parent: int) -> None:
    """Ctrl-C is the parent's to handle. And a worker ends when its parent does, even by `kill -9`: an idle
    worker would otherwise wait on its pool's queue for ever (seen in the watcher's kill tests)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)

    def watch_parent() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(0)

    threading.Thread(target=watch_parent, name="parent-watch", daemon=True).start()


def render_chunk(crops: Sequence[np.ndarray], medians: Sequence[float | None], spec: PreprocessSpec) -> np.ndarray:
    """uint8 canvases (N, S, S) of crops, in order (what each pool worker runs on its share)."""
    size = spec.input_size
    out = np.empty((len(crops), size, size), dtype=np.uint8)
    for i, (crop, median) in enumerate(zip(crops, medians, strict=True)):
        out[i] = render(crop, spec, median)
    return out


class RenderPool:
    """Renders a case's canvases across `processes` worker processes once `start`ed; in-process before that."""

    def __init__(self, processes: int) -> None:
        self.processes = max(1, int(processes))
        self._pool: ProcessPoolExecutor | None = None

    @property
    def running(self) -> bool:
        return self._pool is not None

    def start(self) -> None:
        """Start the workers (a second or so: each imports numpy, scipy and Pillow). No-op with one process.
        A pool that cannot start (a script without an `if __name__ == "__main__":` guard, which the spawned
        workers import again) is logged, and the process renders in-process."""
        if self._pool is not None or self.processes <= 1:
            return
        # spawn: a fork of a process whose PyTorch and OpenMP threads are running can hang in the child
        pool = ProcessPoolExecutor(self.processes, mp_context=multiprocessing.get_context("spawn"),
                                   initializer=_worker_init, initargs=(os.getpid(),))
        try:  # wait until every worker has imported what it needs
            list(pool.map(render_chunk, [[]] * self.processes, [[]] * self.processes,
                          [PreprocessSpec()] * self.processes))
        except (BrokenProcessPool, OSError) as exc:  # not RuntimeError: that is how a guard-less script's
            # re-import must fail in the child (it would otherwise run the whole script there)
            log.warning("render pool not started (%s: %s); rendering in-process", type(exc).__name__, exc)
            pool.shutdown(wait=False, cancel_futures=True)
            return
        self._pool = pool
        log.info("rendering classifier input in %d processes", self.processes)

    def render(self, crops: Sequence[np.ndarray], medians: Sequence[float | None],
               spec: PreprocessSpec) -> np.ndarray:
        """uint8 canvases (N, S, S), identical to `render_chunk(crops, medians, spec)`."""
        if self._pool is None or len(crops) < MIN_FOR_POOL:
            return render_chunk(crops, medians, spec)
        step = -(-len(crops) // self.processes)
        starts = range(0, len(crops), step)
        parts = self._across(render_chunk, [crops[i:i + step] for i in starts],
                             [medians[i:i + step] for i in starts], [spec] * len(starts))
        if parts is None:
            return render_chunk(crops, medians, spec)
        return np.concatenate(parts)  # never empty: fewer than MIN_FOR_POOL crops rendered in-process above

    def map(self, fn: Callable[[list[T]], list[R]], items: list[T], min_items: int = MIN_FOR_POOL) -> list[R]:
        """`fn(items)`, computed as `fn` of one chunk per worker (results in order); in-process when the pool
        is not running or for fewer than `min_items`. `fn` must be a module-level function the workers can
        import without torch (a case's files are read this way, `intake.scan.read_files`, and its crops'
        ink measured for the size prior, `sizeprior.inks`)."""
        if self._pool is None or not items or len(items) < min_items:
            return fn(items)
        step = -(-len(items) // self.processes)
        parts = self._across(fn, [items[i:i + step] for i in range(0, len(items), step)])
        if parts is None:
            return fn(items)
        return [r for part in parts for r in part]

    def _across(self, fn: Callable[..., Any], *chunks: list[Any]) -> list[Any] | None:
        """fn over the chunks in the workers; None when the pool broke (logged, and a new one started), so
        that the caller does the work in-process."""
        assert self._pool is not None
        try:
            return list(self._pool.map(fn, *chunks))
        except BrokenProcessPool as exc:
            log.warning("render pool broke (%s); doing this case's work in-process and starting a new pool", exc)
            self.close()
            self.start()
            return None

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None
