"""`chromobatch watch --workers N`: the supervisor's worker processes (real subprocesses, tiny model).

* workers never import modules from the watcher's working directory;
* a worker killed soon after its start is restarted, and the watcher goes on;
* a worker that keeps dying at start (a broken model) stops the watcher, with the reason in the log.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
from test_watch import check_each_case_once, make_case, wait_for

from chromobatch import db, jobs
from chromobatch.watch import CHILD_MIN_LIFETIME_S


@pytest.fixture
def layout(tmp_path: Path) -> SimpleNamespace:
    incoming = tmp_path / "incoming"
    incoming.mkdir()
    return SimpleNamespace(root=tmp_path, incoming=incoming, processed=tmp_path / "processed",
                           failed=tmp_path / "failed", db=tmp_path / "cases.sqlite")


@pytest.fixture
def env(tiny_model_dir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHROMOBATCH_")}
    env.update(CHROMOBATCH_MODEL=str(tiny_model_dir), CHROMOBATCH_DEVICE="cpu", CHROMOBATCH_QUIET_SECONDS="1.0",
               CHROMOBATCH_HEARTBEAT_SECONDS="0.2", CHROMOBATCH_STALE_AFTER_SECONDS="2", OMP_NUM_THREADS="1")
    return env


class Supervisor:
    """`chromobatch watch ... --workers 2` as a subprocess, its log in a file.

    Started with -P, so that the supervisor itself does not import from `cwd` (what its workers do is the
    point of these tests).
    """

    def __init__(self, log: Path, args: list[str], env: dict[str, str], cwd: Path) -> None:
        self.log = log
        self._fh = log.open("wb")
        self.proc = subprocess.Popen([sys.executable, "-P", "-m", "chromobatch.cli", "watch", *args], env=env,
                                     cwd=cwd, stdout=self._fh, stderr=subprocess.STDOUT)

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def started(self) -> list[tuple[int, int]]:
        """(worker index, pid) of every `worker process N started (pid P)` line, in order."""
        return [(int(i), int(p)) for i, p in re.findall(r"worker process (\d+) started \(pid (\d+)\)", self.text())]

    def ready_pids(self) -> set[int]:
        return {int(p) for p in re.findall(r"worker \S+:(\d+) ready", self.text())}

    def stop(self, timeout: float = 30) -> int:
        self.proc.send_signal(signal.SIGTERM)
        rc = self.proc.wait(timeout=timeout)
        self._fh.close()
        return rc


@pytest.fixture
def supervisors() -> Iterator[list[Supervisor]]:
    started: list[Supervisor] = []
    yield started
    for s in started:
        if s.proc.poll() is None:
            orphans = child_pids(s.proc.pid)
            s.proc.kill()
            s.proc.wait()
            for pid in orphans:  # they would notice their parent is gone, but not at once
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass


def child_pids(pid: int) -> set[int]:
    """The direct children of a process, from /proc (Linux >= 3.5 with CONFIG_PROC_CHILDREN)."""
    found: set[int] = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            found |= {int(p) for p in (task / "children").read_text().split()}
        except FileNotFoundError:
            continue
    return found


@pytest.mark.slow
def test_workers_do_not_import_from_the_working_directory(layout: SimpleNamespace, env: dict[str, str],
                                                          supervisors: list[Supervisor]) -> None:
    cwd = layout.root / "cwd"
    cwd.mkdir()
    marker = layout.root / "imported-typer-from-cwd"
    (cwd / "typer.py").write_text(f"from pathlib import Path\nPath({str(marker)!r}).write_text('imported')\n")
    sup = Supervisor(layout.root / "sup.log", [str(layout.incoming), "--db", str(layout.db), "--workers", "2"], env,
                     cwd)
    supervisors.append(sup)
    wait_for(lambda: len(sup.ready_pids()) == 2 or sup.proc.poll() is not None, 90, "two workers ready",
             interval=0.2)
    assert not marker.exists(), "a worker imported typer.py from the working directory"
    assert sup.proc.poll() is None, sup.text()[-3000:]
    make_case(layout.incoming, "CWD01", n=2, ready=True)
    wait_for(lambda: (layout.processed / "CWD01").is_dir(), 60, "the case to be processed", interval=0.2)
    database = db.connect(layout.db)
    wait_for(lambda: jobs.outstanding(database) == 0, 20, "the queue to drain")
    assert sup.stop() == 0, sup.text()[-3000:]
    assert not marker.exists()
    check_each_case_once(database, {"CWD01"}, set(), layout.processed, layout.failed)
    assert "worker processes ended with codes [0, 0]" in sup.text()
    database.dispose()


@pytest.mark.slow
def test_killed_workers_are_restarted(layout: SimpleNamespace, env: dict[str, str],
                                      supervisors: list[Supervisor]) -> None:
    """kill -9 of worker 1 a second after its start, of worker 0 1.5 s after it is ready: both come back."""
    sup = Supervisor(layout.root / "sup.log", [str(layout.incoming), "--db", str(layout.db), "--workers", "2"], env,
                     layout.root)
    supervisors.append(sup)
    wait_for(lambda: len(sup.started()) == 2 or sup.proc.poll() is not None, 30, "two worker processes",
             interval=0.05)
    first = dict(sup.started())
    assert set(first) == {0, 1} and set(first.values()) == child_pids(sup.proc.pid), sup.text()[-3000:]
    time.sleep(1.0)  # surely within CHILD_MIN_LIFETIME_S of its start, however slow the machine
    os.kill(first[1], signal.SIGKILL)
    wait_for(lambda: first[0] in sup.ready_pids() or sup.proc.poll() is not None, 90, "worker 0 ready",
             interval=0.1)
    assert sup.proc.poll() is None, sup.text()[-3000:]  # one worker died early: no reason to stop it all
    time.sleep(1.5)
    os.kill(first[0], signal.SIGKILL)
    wait_for(lambda: len(sup.started()) == 4 or sup.proc.poll() is not None, 60, "two new worker processes",
             interval=0.1)
    text = sup.text()
    assert sup.proc.poll() is None, text[-3000:]
    for index in (0, 1):
        assert re.search(rf"worker process {index} \(pid {first[index]}\) exited with code -9 after [\d.]+s; "
                         r"starting a new one in 1s", text), text[-3000:]
    now = dict(sup.started())  # the latest pid of each
    assert set(now) == {0, 1} and not set(now.values()) & set(first.values())
    assert child_pids(sup.proc.pid) == set(now.values())
    wait_for(lambda: set(now.values()) <= sup.ready_pids(), 90, "the new workers ready", interval=0.2)
    names = {make_case(layout.incoming, f"AFTER{i}", n=2, seed=i, ready=True).name for i in range(4)}
    wait_for(lambda: not any(layout.incoming.iterdir()), 90, "the incoming folder to empty", interval=0.2)
    database = db.connect(layout.db)
    wait_for(lambda: jobs.outstanding(database) == 0, 20, "the queue to drain")
    assert sup.proc.poll() is None
    assert sup.stop() == 0, sup.text()[-3000:]
    check_each_case_once(database, names, set(), layout.processed, layout.failed)
    assert "worker processes ended with codes [0, 0]" in sup.text()
    assert "Traceback" not in sup.text()
    database.dispose()


@pytest.mark.slow
def test_workers_that_keep_failing_at_start_stop_the_watcher(layout: SimpleNamespace, env: dict[str, str],
                                                             supervisors: list[Supervisor]) -> None:
    """A missing model: every worker process exits 1 at start; restarted 1 s, 2 s, 4 s, 8 s later, then stop."""
    env = dict(env, CHROMOBATCH_MODEL=str(layout.root / "no-such-model"))
    begin = time.monotonic()
    sup = Supervisor(layout.root / "sup.log", [str(layout.incoming), "--db", str(layout.db), "--workers", "2"], env,
                     layout.root)
    supervisors.append(sup)
    rc = sup.proc.wait(timeout=240)
    text = sup.text()
    assert rc == 1, text[-3000:]
    found = re.search(rf"worker process ([01]) failed 5 times in a row within {CHILD_MIN_LIFETIME_S:g} s of "
                      r"starting \(last exit code 1\); stopping: check the model and the settings", text)
    assert found, text[-3000:]
    assert [i for i, _ in sup.started()].count(int(found.group(1))) == 5, text[-3000:]
    assert "model folder not found" in text
    assert time.monotonic() - begin >= 15  # the restart delays: 1 + 2 + 4 + 8 s
