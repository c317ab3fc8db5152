"""Watcher memory by case size: peak RSS of a real `chromobatch watch` process on one synthetic case.

    .venv/bin/python benchmarks/watch_memory.py [--cells 50 500] [--model models/default] [--no-idle]
    PYTHONPATH=/tmp/orig .venv/bin/python benchmarks/watch_memory.py ...   # another checkout's package

For each size, one case of N cells (`chromobatch synth OUT --cases 1 --cells N`, written once, copied for
each run) is dropped with a READY marker into a fresh incoming folder, with a fresh SQLite file in a temporary
folder, the given model and reports rendered. Two runs per size:

* `chromobatch watch INCOMING --once`: the peak RSS (ru_maxrss from wait4() when it exits, which covers
  the descendants it waited for; and VmHWM / summed VmRSS of the process tree, polled every 0.2 s), and
  the peak RSS up to the moment the case row is committed `done` (prediction + storage) vs after it (the
  report);
* (unless --no-idle) a persistent `chromobatch watch INCOMING --poll 1`: its peak, and its RSS once the case
  is in processed/ and the watcher has been idle for --idle-wait seconds (memory kept after the case).

The watcher's subprocesses import `chromobatch` the way this script's environment does (PYTHONPATH is passed
on), so `PYTHONPATH=/tmp/orig` measures an older checkout; the package path is printed.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import cpu_name  # noqa: E402

MB = 1024 * 1024


def cpu_flags() -> str:
    """Whether the CPU advertises AVX-512 / AMX (lscpu's Flags line, read from /proc/cpuinfo)."""
    flags: set[str] = set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    except OSError:
        return "unknown"
    avx512 = sorted(f for f in flags if f.startswith("avx512"))
    amx = sorted(f for f in flags if f.startswith("amx"))
    return (f"avx2: {'yes' if 'avx2' in flags else 'no'}; "
            f"avx512: {'yes (' + ', '.join(avx512) + ')' if avx512 else 'no'}; "
            f"amx: {'yes (' + ', '.join(amx) + ')' if amx else 'no'}")


def _status_kb(pid: int, key: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


def _tree(pid: int) -> list[int]:
    """pid and all its descendants (from /proc/PID/task/*/children)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            for task in Path(f"/proc/{p}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            continue
    return out


@dataclass
class Sampler:
    pid: int
    peak_tree_rss: int = 0  # kB, sum of VmRSS over the tree at one sample
    peak_hwm: int = 0  # kB, max VmHWM of any process in the tree
    peak_before_done: int = 0  # kB, max tree RSS up to the sample that saw the case committed
    samples: list[tuple[float, int]] = field(default_factory=list)

    def sample(self, t: float, done: bool) -> int:
        pids = _tree(self.pid)
        rss = sum(_status_kb(p, "VmRSS") for p in pids)
        self.peak_hwm = max([self.peak_hwm] + [_status_kb(p, "VmHWM") for p in pids])
        self.peak_tree_rss = max(self.peak_tree_rss, rss)
        if not done:
            self.peak_before_done = max(self.peak_before_done, rss)
        self.samples.append((t, rss))
        return rss


def case_done(db_path: Path) -> bool:
    if not db_path.exists():
        return False
    try:
        con = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=0.2)
        try:
            row = con.execute("SELECT status FROM cases LIMIT 1").fetchone()
        finally:
            con.close()
    except sqlite3.Error:
        return False
    return bool(row) and row[0] == "done"


def drop_case(src: Path, incoming: Path) -> Path:
    dest = incoming / src.name
    shutil.copytree(src, dest)
    (dest / "READY").write_text("")
    return dest


def run_once(exe: list[str], case: Path, work: Path, model: Path, env: dict[str, str]) -> dict[str, float]:
    incoming, db_path = work / "incoming", work / "cases.sqlite"
    incoming.mkdir(parents=True)
    drop_case(case, incoming)
    cmd = exe + ["watch", str(incoming), "--db", str(db_path), "--reports", str(work / "reports"), "--once"]
    print("  $", " ".join(cmd), flush=True)
    t0 = time.perf_counter()
    with open(work / "watch.log", "wb") as logf:
        proc = subprocess.Popen(cmd, env=env, stdout=logf, stderr=subprocess.STDOUT, cwd=work)
        sampler = Sampler(proc.pid)
        done_at = None
        while True:
            # wait4: this child's own rusage; its ru_maxrss covers the descendants it waited for
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            done = done_at is not None or case_done(db_path)
            if done and done_at is None:
                done_at = time.perf_counter() - t0
            sampler.sample(time.perf_counter() - t0, done)
            time.sleep(0.2)
        proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t0
    maxrss = usage.ru_maxrss  # kB on Linux
    if proc.returncode != 0:
        print((work / "watch.log").read_text()[-3000:])
        raise SystemExit(f"watcher exited {proc.returncode}")
    pdfs = sorted((work / "reports").glob("*.pdf"))
    return {"peak_ru_maxrss_mb": maxrss / 1024,
            "peak_hwm_mb": sampler.peak_hwm / 1024, "peak_tree_rss_mb": sampler.peak_tree_rss / 1024,
            "peak_before_done_mb": sampler.peak_before_done / 1024, "done_at_s": done_at or float("nan"),
            "wall_s": wall, "pdf_mb": sum(p.stat().st_size for p in pdfs) / MB}


def run_idle(exe: list[str], case: Path, work: Path, model: Path, env: dict[str, str], idle_wait: float,
             timeout: float) -> dict[str, float]:
    incoming, db_path = work / "incoming", work / "cases.sqlite"
    incoming.mkdir(parents=True)
    cmd = exe + ["watch", str(incoming), "--db", str(db_path), "--reports", str(work / "reports"), "--poll", "1"]
    print("  $", " ".join(cmd), flush=True)
    t0 = time.perf_counter()
    with open(work / "watch.log", "wb") as logf:
        proc = subprocess.Popen(cmd, env=env, stdout=logf, stderr=subprocess.STDOUT, cwd=work)
        sampler = Sampler(proc.pid)
        try:
            time.sleep(2.0)
            sampler.sample(time.perf_counter() - t0, False)
            drop_case(case, incoming)
            finished = None
            while proc.poll() is None and time.perf_counter() - t0 < timeout:
                done = case_done(db_path)
                moved = (work / "processed" / case.name).exists() and any((work / "reports").glob("*.pdf"))
                sampler.sample(time.perf_counter() - t0, done)
                if moved and finished is None:
                    finished = time.perf_counter()
                if finished is not None and time.perf_counter() - finished >= idle_wait:
                    break
                time.sleep(0.2)
            if proc.poll() is not None:
                print((work / "watch.log").read_text()[-3000:])
                raise SystemExit(f"watcher exited {proc.returncode}")
            if finished is None:
                raise SystemExit(f"case not finished within {timeout:.0f} s")
            idle = sum(_status_kb(p, "VmRSS") for p in _tree(proc.pid))
            hwm = max(_status_kb(p, "VmHWM") for p in _tree(proc.pid))
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
    return {"idle_rss_mb": idle / 1024, "peak_hwm_mb": max(hwm, sampler.peak_hwm) / 1024,
            "start_rss_mb": sampler.samples[0][1] / 1024 if sampler.samples else float("nan")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cells", type=int, nargs="+", default=[50, 500])
    ap.add_argument("--model", type=Path, default=REPO / "models" / "default")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-idle", action="store_true", help="skip the persistent watcher (idle RSS) runs")
    ap.add_argument("--idle-wait", type=float, default=10.0, help="seconds idle before reading VmRSS")
    ap.add_argument("--timeout", type=float, default=3600.0)
    ap.add_argument("--keep", action="store_true", help="keep the temporary folder (logs, reports)")
    args = ap.parse_args()

    env = dict(os.environ)
    env["CHROMOBATCH_MODEL"] = str(args.model.resolve())
    env.setdefault("PYTHONUNBUFFERED", "1")
    exe = [sys.executable, "-m", "chromobatch.cli"]
    root = Path(tempfile.mkdtemp(prefix="watch_memory_"))
    # Subprocesses run in the temporary folder: `python -m` puts the current folder first on sys.path,
    # which in the repository would shadow PYTHONPATH.
    pkg = subprocess.run([sys.executable, "-c", "import chromobatch; print(chromobatch.__file__)"], env=env,
                         capture_output=True, text=True, check=True, cwd=root).stdout.strip()
    rev = subprocess.run(["git", "-C", str(Path(pkg).parent), "rev-parse", "--short", "HEAD"],
                         capture_output=True, text=True).stdout.strip()
    print("command:", " ".join([Path(sys.executable).name, *sys.argv]))
    print("PYTHONPATH:", env.get("PYTHONPATH", ""), "| chromobatch imported from:", pkg, f"({rev or 'no git'})")
    print("model:", env["CHROMOBATCH_MODEL"])
    print("CPU:", cpu_name(), "|", os.cpu_count(), "cores |", cpu_flags())
    print("date:", dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"), flush=True)

    rows = []
    try:
        for n in args.cells:
            src = root / f"synth{n}"
            t = time.perf_counter()
            subprocess.run(exe + ["synth", str(src), "--cases", "1", "--cells", str(n), "--seed", str(args.seed)],
                           env=env, check=True, capture_output=True, cwd=root)
            case = next(p for p in sorted(src.iterdir()) if p.is_dir())
            n_files = sum(1 for p in case.rglob("*.png"))
            print(f"\n{n} cells: {n_files} chromosome files (synth {time.perf_counter() - t:.0f} s)", flush=True)
            once = run_once(exe, case, root / f"once{n}", args.model, env)
            print("  once:", {k: round(v, 1) for k, v in once.items()}, flush=True)
            idle = {}
            if not args.no_idle:
                idle = run_idle(exe, case, root / f"idle{n}", args.model, env, args.idle_wait, args.timeout)
                print("  idle:", {k: round(v, 1) for k, v in idle.items()}, flush=True)
            rows.append((n, n_files, once, idle))
            shutil.rmtree(src, ignore_errors=True)
    finally:
        if args.keep:
            print("kept:", root)
        else:
            shutil.rmtree(root, ignore_errors=True)

    def f(v: float | None) -> str:
        return "n/a" if v is None or v != v else f"{v:,.0f}"

    print("\n| cells | chromosome files | peak RSS, `watch --once` (ru_maxrss) | peak up to commit (predict + "
          "store) | peak incl. report | RSS idle after the case (persistent watcher) | wall s | PDF MB |")
    print("|---|---|---|---|---|---|---|---|")
    for n, n_files, once, idle in rows:
        print(f"| {n} | {n_files:,} | {f(once['peak_ru_maxrss_mb'])} MB | {f(once['peak_before_done_mb'])} MB | "
              f"{f(once['peak_tree_rss_mb'])} MB | {f(idle.get('idle_rss_mb'))} MB | {once['wall_s']:.0f} | "
              f"{once['pdf_mb']:.1f} |")


if __name__ == "__main__":
    main()
