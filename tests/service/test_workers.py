"""`chromobatch watch --workers N`: the supervisor's worker processes (real subprocesses, tiny model).

* workers never import modules from the watcher's working directory;
* a worker killed soon after its start is restarted, and the watcher goes on;
* a worker that keeps dying at start (a broken model) stops the watcher, with the reason in the log.
"""

from __future__ import annotations

import os
import re
import signal
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from helpers import Watcher, child_pids
from test_watch import check_each_case_once, make_case, wait_for

from chromobatch.service.supervisor import CHILD_MIN_LIFETIME_S
from chromobatch.store import db, jobs


class Supervisor(Watcher):
    """`chromobatch watch ... --workers 2`, itself started with -P: what its workers import is the point."""

    def __init__(self, log: Path, args: list[str], env: dict[str, str], cwd: Path) -> None:
        super().__init__(log.parent, log.stem, args, env, cwd=cwd, safe_path=True)

    def started(self) -> list[tuple[int, int]]:
        """(worker index, pid) of every `worker process N started (pid P)` line, in order."""
        return [(int(i), int(p)) for i, p in re.findall(r"worker process (\d+) started \(pid (\d+)\)", self.text())]

    def ready_pids(self) -> set[int]:
        return {int(p) for p in re.findall(r"worker \S+:(\d+) ready", self.text())}


def two_workers(layout: SimpleNamespace) -> list[str]:
    return [str(layout.incoming), "--db", str(layout.root / "cases.sqlite"), "--workers", "2"]


@pytest.fixture
def env(watcher_env: dict[str, str]) -> dict[str, str]:
    return dict(watcher_env, CHROMOBATCH_QUIET_SECONDS="1.0")


@pytest.fixture
def supervisors(watchers: list[Watcher]) -> list[Watcher]:
    return watchers


@pytest.mark.slow
def test_workers_do_not_import_from_the_working_directory(layout: SimpleNamespace, env: dict[str, str],
                                                          supervisors: list[Supervisor]) -> None:
    cwd = layout.root / "cwd"
    cwd.mkdir()
    marker = layout.root / "imported-typer-from-cwd"
    (cwd / "typer.py").write_text(f"from pathlib import Path\nPath({str(marker)!r}).write_text('imported')\n")
    sup = Supervisor(layout.root / "sup.log", two_workers(layout), env, cwd)
    supervisors.append(sup)
    wait_for(lambda: len(sup.ready_pids()) == 2 or sup.proc.poll() is not None, 90, "two workers ready",
             interval=0.2)
    assert not marker.exists(), "a worker imported typer.py from the working directory"
    assert sup.proc.poll() is None, sup.text()[-3000:]
    make_case(layout.incoming, "CWD01", n=2, ready=True)
    wait_for(lambda: (layout.processed / "CWD01").is_dir(), 60, "the case to be processed", interval=0.2)
    database = db.connect(layout.root / "cases.sqlite")
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
    sup = Supervisor(layout.root / "sup.log", two_workers(layout), env, layout.root)
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
    database = db.connect(layout.root / "cases.sqlite")
    wait_for(lambda: jobs.outstanding(database) == 0, 20, "the queue to drain")
    assert sup.proc.poll() is None
    assert sup.stop() == 0, sup.text()[-3000:]
    check_each_case_once(database, names, set(), layout.processed, layout.failed)
    assert "worker processes ended with codes [0, 0]" in sup.text()
    text = sup.text()
    assert "Traceback" not in text, text[max(0, text.find("Traceback") - 500):][:4000]
    database.dispose()


@pytest.mark.slow
def test_workers_that_keep_failing_at_start_stop_the_watcher(layout: SimpleNamespace, env: dict[str, str],
                                                             supervisors: list[Supervisor]) -> None:
    """A missing model: every worker process exits 1 at start; restarted 1 s, 2 s, 4 s, 8 s later, then stop."""
    env = dict(env, CHROMOBATCH_MODEL=str(layout.root / "no-such-model"))
    begin = time.monotonic()
    sup = Supervisor(layout.root / "sup.log", two_workers(layout), env, layout.root)
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


def test_each_worker_process_gets_its_share_of_the_cores_for_rendering(tmp_path: Path, sqlite_path: Path) -> None:
    """A worker process is told `workers = 1`; its render pool must still be sized for all the workers, not
    take every core for itself (2 workers x 2 render processes on 2 cores, as before this was fixed)."""
    from chromobatch.config import load_settings
    from chromobatch.ml.renderpool import auto_processes
    from chromobatch.service.casefolders import resolve_paths
    from chromobatch.service.supervisor import child_env

    with db.connect(sqlite_path) as database:
        for given, want in ((0, auto_processes(0, workers=2)), (3, 3)):
            settings = load_settings({"workers": 2, "render_processes": given})
            (tmp_path / "incoming").mkdir(exist_ok=True)
            env = child_env(settings, database, resolve_paths(tmp_path / "incoming", settings))
            assert env["CHROMOBATCH_WORKERS"] == "1"
            assert env["CHROMOBATCH_RENDER_PROCESSES"] == str(want)
    assert auto_processes(0, workers=2) == max(1, min((os.cpu_count() or 1) // 2, 4))
