"""Raw forward images/s for every runtime x precision this machine runs, and the pipeline with the auto choice.

    .venv/bin/python benchmarks/runtimes.py [--model models/default] [--cases 4] [--cells 3] [--rounds 3]
        [--no-watcher] [--profile] [--json out.json]

In one run, on the same generated cases (synth, PNG files on disk):

1. raw forward: the model on already preprocessed batches (batch 64), for torch fp32 and every other runtime
   and precision available here (ml.runtime.candidates with bf16 forced on where the hardware has it),
   rounds interleaved so a load change on a shared machine hits every combination alike; best round each;
2. end to end: `process_case` (decode, normalise, preprocess, size prior, forward, assignment, commit) on
   every case, with runtime = auto (what a watcher would pick here) and with runtime = torch (today's
   default), interleaved the same way; chromosomes/s, with the time split by stage;
3. unless --no-watcher: READY -> committed latency of one 46-chromosome cell through a real
   `chromobatch watch` process with the auto choice, and that watcher's peak RSS (benchmarks/pipeline.py).

The goal (issue 17): end to end >= 0.85 x the fastest raw forward of the same run.

--queue N [--device cuda] [--batch-cases 8]: instead, the GPU mode: N one-cell cases queued at once and taken
by a watcher worker `batch-cases` at a time (one forward pass per group, each case committed on its own),
chromosomes/s against the raw forward at the same batch size (goal on a GPU: >= 0.8).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import shutil
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from common import cpu_name  # noqa: E402
from pipeline import watcher_latency  # noqa: E402

from chromobatch.config import load_settings  # noqa: E402
from chromobatch.errors import ConfigError  # noqa: E402
from chromobatch.intake.scan import scan_case  # noqa: E402
from chromobatch.ml import runtime as rt  # noqa: E402
from chromobatch.ml.folders import load_model  # noqa: E402
from chromobatch.ml.forward import forward_batch  # noqa: E402
from chromobatch.ml.preprocess import render, to_tensor  # noqa: E402
from chromobatch.registry.register import DEFAULT_MODEL_DIR, load_predictor  # noqa: E402
from chromobatch.service.pipeline import process_case  # noqa: E402
from chromobatch.store import db  # noqa: E402
from chromobatch.synth.cases import generate_cases  # noqa: E402

FLAGS_SHOWN = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_tile", "amx_int8")


class RawForward:
    """The model's engines on already preprocessed batches; `round()` times each once (images/s)."""

    def __init__(self, model_dir: Path, cases: list[Path], batch: int, cache: Path) -> None:
        lm = load_model(model_dir)
        canvases = np.concatenate([np.stack([render(a.crop, lm.spec) for a in scan_case(c).accepted])
                                   for c in cases])
        self.batches = [to_tensor(torch.from_numpy(canvases[i:i + batch])).unsqueeze(1)
                        for i in range(0, len(canvases), batch)]
        self.n = len(canvases)
        pairs = [("torch", "fp32")] + [(r, "fp32") for r in rt.installed_runtimes()[1:]]
        if rt.native_bf16(lm.device):
            pairs += [("torch", "bf16")] + [("openvino", "bf16")] * ("openvino" in rt.installed_runtimes())
        self.engines: dict[str, rt.Engine] = {}
        self.left_out: dict[str, str] = {}
        for r, p in pairs:
            try:
                self.engines[f"{r} {p}"] = rt.build_engine(lm, r, p, cache)
            except ConfigError as exc:  # e.g. OpenVINO runs bf16 only on some CPUs that have the flag
                self.left_out[f"{r} {p}"] = str(exc)
                print(f"left out {r} {p}: {exc}", flush=True)
        for e in self.engines.values():
            forward_batch(e, self.batches[0], e.device)  # warm-up

    def round(self) -> dict[str, float]:
        out = {}
        for name, e in self.engines.items():
            t = time.perf_counter()
            for b in self.batches:
                forward_batch(e, b, e.device)
            out[name] = self.n / (time.perf_counter() - t)
        return out


def end_to_end(model_dir: Path, src: list[Path], work: Path, runtime: str, batch: int, cache: Path, tag: str,
               profile: cProfile.Profile | None = None, precision: str = "auto") -> tuple[float, dict[str, float], str]:
    run = work / tag
    cases = [Path(shutil.copytree(c, run / c.name)) for c in src]
    database = db.connect(run / "cases.sqlite")
    settings = load_settings({"model": str(model_dir), "batch_size": batch, "device": "cpu", "runtime": runtime,
                              "precision": precision, "cache_dir": str(cache)})
    predictor = load_predictor(database, settings)
    predictor.warm_up()  # as a watcher's worker does: the runtime's first pass, the render pool started
    engine = predictor.model.runner
    chosen = f"{getattr(engine, 'runtime', 'torch')} {getattr(engine, 'precision', 'fp32')}"
    process_case(database, cases[0], predictor=predictor, settings=settings, force=True)  # warm-up
    stages: dict[str, float] = defaultdict(float)
    n = 0
    if profile is not None:
        profile.enable()
    t = time.perf_counter()
    for case in cases:
        res = process_case(database, case, predictor=predictor, settings=settings, force=True)
        n += res.n_chromosomes
        for k, v in res.timings.items():
            stages[k] += v
    seconds = time.perf_counter() - t
    if profile is not None:
        profile.disable()
    predictor.renderer.close()
    database.dispose()
    return n / seconds, dict(stages), chosen


def queue_mode(model_dir: Path, work: Path, n_cases: int, device: str, batch: int, batch_cases: int,
               cache: Path) -> dict[str, object]:
    """A queue of small cases (one 46-chromosome cell each) through an in-process watcher worker that batches
    `batch_cases` waiting cases per forward pass, against the raw forward at the same batch size."""
    from chromobatch.service.casefolders import resolve_paths
    from chromobatch.service.worker import Worker
    from chromobatch.store import jobs

    incoming = work / "queue" / "incoming"
    incoming.mkdir(parents=True)
    cases = generate_cases(incoming, cases=n_cases, cells=1, fmt="png", abnormal_rate=0.0, seed=11)
    settings = load_settings({"model": str(model_dir), "device": device, "batch_size": batch, "cache_dir": str(cache),
                              "batch_cases": batch_cases, "db": str(work / "queue" / "cases.sqlite")})
    database = db.connect(settings.db)
    worker = Worker(database, settings, resolve_paths(incoming, settings))
    worker.load()
    lm = worker.predictor.model
    canvases = np.concatenate([np.stack([render(a.crop, lm.spec) for a in scan_case(c).accepted]) for c in cases])
    n = len(canvases)
    engine = lm.runner
    batches = [to_tensor(torch.from_numpy(canvases[i:i + batch])).unsqueeze(1) for i in range(0, n, batch)]
    forward_batch(engine, batches[0], lm.device)
    sync = torch.cuda.synchronize if lm.device.type == "cuda" else (lambda: None)
    t = time.perf_counter()
    for b in batches:
        forward_batch(engine, b, lm.device)
    sync()
    raw = n / (time.perf_counter() - t)
    for c in cases:
        jobs.enqueue(database, c)
    calls = worker.predictor.forward_calls
    t = time.perf_counter()
    while worker.step():
        pass
    e2e = n / (time.perf_counter() - t)
    with database.session() as s:
        done = s.query(db.Case).filter_by(status="done").count()
    database.dispose()
    return {"queue_cases": n_cases, "queue_done": done, "queue_chromosomes": n, "queue_batch_cases": batch_cases,
            "queue_forward_calls": worker.predictor.forward_calls - calls, "queue_raw_forward_per_s": round(raw, 1),
            "queue_end_to_end_per_s": round(e2e, 1), "queue_ratio": round(e2e / raw, 3),
            "queue_engine": f"{engine.runtime} {engine.precision}" if hasattr(engine, "runtime") else "torch"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL_DIR)
    ap.add_argument("--cases", type=int, default=4)
    ap.add_argument("--cells", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--no-watcher", action="store_true")
    ap.add_argument("--profile", action="store_true", help="print where the auto pipeline spends its time")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--queue", type=int, default=0, help="only the queue mode: this many one-cell cases")
    ap.add_argument("--device", default="cpu", help="queue mode: cpu or cuda")
    ap.add_argument("--batch-cases", type=int, default=8, help="queue mode: waiting cases per forward pass")
    args = ap.parse_args()
    if args.queue:
        torch.set_num_threads(os.cpu_count() or 1)
        with tempfile.TemporaryDirectory() as tmp:
            out = queue_mode(args.model, Path(tmp), args.queue, args.device, args.batch_size, args.batch_cases,
                             Path(tmp) / "cache")
        out.update(date=datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"), machine=cpu_name(), device=args.device,
                   uptime=subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip())
        print(json.dumps(out, indent=2))
        if args.json:
            args.json.write_text(json.dumps(out, indent=2) + "\n")
        return
    torch.set_num_threads(os.cpu_count() or 1)
    started = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        cache = work / "cache"
        os.environ["CHROMOBATCH_CACHE_DIR"] = str(cache)  # the watcher below finds the same converted model
        cases = generate_cases(work / "src", cases=args.cases, cells=args.cells, fmt="png", abnormal_rate=0.3, seed=7)
        bench = RawForward(args.model, cases, args.batch_size, cache)
        raw_rounds: dict[str, list[float]] = defaultdict(list)
        e2e: dict[str, list[float]] = defaultdict(list)
        stages: dict[str, dict[str, float]] = {}
        chosen = {}
        prof = cProfile.Profile() if args.profile else None
        for r in range(args.rounds):  # each round: every raw forward, then both pipelines (a load change hits all)
            for name, speed in bench.round().items():
                raw_rounds[name].append(speed)
            for runtime in ("auto", "torch"):  # torch = today's default before issue 17: PyTorch fp32
                speed, st, chosen[runtime] = end_to_end(args.model, cases, work, runtime, args.batch_size, cache,
                                                        f"{runtime}{r}", prof if runtime == "auto" else None,
                                                        precision="auto" if runtime == "auto" else "fp32")
                e2e[runtime].append(speed)
                if speed >= max(e2e[runtime]):
                    stages[runtime] = st
        raw = {k: max(v) for k, v in raw_rounds.items()}
        fastest = max(raw, key=lambda k: raw[k])
        result = {
            "date": started, "machine": cpu_name(), "cores": os.cpu_count(),
            "flags": sorted(rt.cpu_flags() & set(FLAGS_SHOWN)), "native_bf16": rt.native_bf16(torch.device("cpu")),
            "load_average_before": [round(x, 2) for x in load_before],
            "model": str(args.model), "backbone": json.loads((args.model / "model.json").read_text())["backbone"],
            "chromosomes": sum(len(scan_case(c).accepted) for c in cases), "batch_size": args.batch_size,
            "raw_forward_per_s": {k: round(v, 1) for k, v in raw.items()},
            "raw_forward_rounds": {k: [round(x, 1) for x in v] for k, v in raw_rounds.items()},
            "pipeline_rounds": {k: [round(x, 1) for x in v] for k, v in e2e.items()},
            "fastest_raw": fastest,
            "raw_left_out": bench.left_out,
            "auto_choice": chosen["auto"],
            "pipeline_per_s": {k: round(max(v), 1) for k, v in e2e.items()},
            "pipeline_stages_s": {k: {s: round(x, 2) for s, x in v.items()} for k, v in stages.items()},
            "ratio_auto_pipeline_to_fastest_raw": round(max(e2e["auto"]) / raw[fastest], 3),
            "ratio_torch_pipeline_to_torch_raw": round(max(e2e["torch"]) / raw["torch fp32"], 3),
            "speedup_auto_over_torch_pipeline": round(max(e2e["auto"]) / max(e2e["torch"]), 2),
        }
        if not args.no_watcher:
            (work / "watch").mkdir()
            result.update(watcher_latency(args.model, work / "watch", "cpu"))
        result["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
        result["uptime"] = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    if prof is not None:
        out = io.StringIO()
        pstats.Stats(prof, stream=out).sort_stats("cumulative").print_stats(30)
        print(out.getvalue())


if __name__ == "__main__":
    main()
