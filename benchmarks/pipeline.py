"""Pipeline throughput against the raw model forward, latency of one cell, peak RSS of the watcher.

    .venv/bin/python benchmarks/pipeline.py [--model models/default] [--cases 8] [--cells 3]

1. End-to-end: `process_case` on every generated case (files on disk -> chromosomes decoded, normalised,
   preprocessed, classified, assigned, committed to a fresh SQLite file), chromosomes per second.
2. Raw forward: the same model on the same batches (already preprocessed tensors), chromosomes per second.
   Both are measured in this one run, so the ratio is fair.
3. Latency: a running `chromobatch watch --poll` subprocess; one 46-chromosome cell is dropped with a
   READY marker; time until its predictions are committed. Peak RSS of that watcher (VmHWM).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from common import cpu_name  # noqa: E402

from chromobatch.config import load_settings  # noqa: E402
from chromobatch.intake.scan import scan_case  # noqa: E402
from chromobatch.ml.folders import load_model  # noqa: E402
from chromobatch.ml.preprocess import render  # noqa: E402
from chromobatch.registry.register import DEFAULT_MODEL_DIR, load_predictor  # noqa: E402
from chromobatch.service.pipeline import process_case  # noqa: E402
from chromobatch.store import db  # noqa: E402
from chromobatch.synth.cases import generate_case, generate_cases  # noqa: E402


def raw_forward(model_dir: Path, cases: list[Path], batch_size: int, device: str, repeats: int) -> tuple[float, int]:
    """Seconds for the model forward alone over the batches process_case would build."""
    model = load_model(model_dir, device=device)
    batches = []
    for case in cases:
        crops = [a.crop for a in scan_case(case).accepted]
        canv = np.stack([render(c, model.spec) for c in crops])
        x = torch.from_numpy(canv).unsqueeze(1).float().div_(255.0)
        batches += [x[i:i + batch_size] for i in range(0, len(x), batch_size)]
    n = sum(len(b) for b in batches)
    model.predict_tensor(batches[0])  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        for b in batches:
            model.predict_tensor(b)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return best, n


def end_to_end(model_dir: Path, src_cases: list[Path], work: Path, batch_size: int, device: str,
               repeats: int) -> tuple[float, int]:
    best, n = float("inf"), 0
    for r in range(repeats):
        run = work / f"e2e{r}"
        cases = [Path(shutil.copytree(c, run / c.name)) for c in src_cases]
        database = db.connect(run / "cases.sqlite")
        settings = load_settings({"model": str(model_dir), "batch_size": batch_size, "device": device})
        predictor = load_predictor(database, settings)
        process_case(database, cases[0], predictor=predictor, settings=settings, force=True)  # warm-up
        t = time.perf_counter()
        n = 0
        for case in cases:
            n += process_case(database, case, predictor=predictor, settings=settings, force=True).n_chromosomes
        best = min(best, time.perf_counter() - t)
        database.dispose()
    return best, n


def watcher_latency(model_dir: Path, work: Path, device: str, repeats: int = 3) -> dict[str, float]:
    """READY -> committed for one 46-chromosome cell, through a real watcher process; plus its peak RSS."""
    incoming = work / "incoming"
    incoming.mkdir()
    dbfile = work / "watch.sqlite"
    env = dict(os.environ, CHROMOBATCH_MODEL=str(model_dir), CHROMOBATCH_DEVICE=device,
               CHROMOBATCH_QUIET_SECONDS="30")
    proc = subprocess.Popen([sys.executable, "-m", "chromobatch.cli", "--log-level", "WARNING", "watch",
                             str(incoming), "--db", str(dbfile), "--poll", "0.05"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    latencies = []
    try:
        deadline = time.time() + 120
        while not dbfile.exists() and time.time() < deadline:
            time.sleep(0.1)
        time.sleep(2.0)  # model loaded, observer running
        database = db.connect(dbfile)
        for r in range(repeats):
            stage = work / f"stage{r}"
            case = generate_case(stage, f"LAT{r}", cells=1, fmt="png", karyotype="46,XY", seed=100 + r)
            shutil.move(str(case), incoming / case.name)  # a rename: the folder appears complete
            t0 = time.perf_counter()
            (incoming / case.name / "READY").touch()
            while True:
                with database.session() as s:
                    row = s.query(db.Case).filter_by(case_id=case.name).one_or_none()
                    if row is not None and row.status in ("done", "failed"):
                        break
                if time.perf_counter() - t0 > 120:
                    raise RuntimeError("watcher did not process the case within 120 s")
                time.sleep(0.01)
            latencies.append(time.perf_counter() - t0)
        hwm_kb = _peak_rss_kb(proc.pid)
        children = _children(proc.pid)  # the render pool's processes (ml.renderpool)
        children_kb = sum(_peak_rss_kb(c) for c in children)
        database.dispose()
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
    return {"latency_median_s": float(np.median(latencies)), "latency_all_s": latencies,
            "watcher_peak_rss_mb": hwm_kb / 1024, "watcher_children": len(children),
            "watcher_children_peak_rss_mb": children_kb / 1024}


def _peak_rss_kb(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM")))


def _children(pid: int) -> list[int]:
    """Live processes whose parent is `pid` (Linux /proc)."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            out.append(int(stat.parent.name))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL_DIR)
    ap.add_argument("--cases", type=int, default=6)
    ap.add_argument("--cells", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--no-watcher", action="store_true")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        cases = generate_cases(work / "src", cases=args.cases, cells=args.cells, fmt="png", abnormal_rate=0.3, seed=7)
        raw_s, n_raw = raw_forward(args.model, cases, args.batch_size, args.device, args.repeats)
        e2e_s, n_e2e = end_to_end(args.model, cases, work, args.batch_size, args.device, args.repeats)
        result = {
            "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"), "machine": cpu_name(),
            "cores": os.cpu_count(), "device": args.device, "model": str(args.model),
            "backbone": json.loads((args.model / "model.json").read_text())["backbone"],
            "chromosomes": n_e2e, "batch_size": args.batch_size,
            "raw_forward_per_s": n_raw / raw_s, "pipeline_per_s": n_e2e / e2e_s,
        }
        result["ratio_pipeline_to_raw"] = result["pipeline_per_s"] / result["raw_forward_per_s"]
        if not args.no_watcher:
            result.update(watcher_latency(args.model, work, args.device))
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
