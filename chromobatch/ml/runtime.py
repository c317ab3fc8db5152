"""Which runtime and precision run the network, chosen once when a model is loaded.

Settings `runtime` (auto | torch | onnxruntime | openvino) and `precision` (auto | fp32 | bf16). `auto`
measures, at start-up, every combination this machine can run among the runtimes installed and keeps the
fastest whose top-1 class agrees with PyTorch fp32 on a calibration batch; the choice is logged and
remembered in the cache folder (keyed by the model's checksum, the CPU, the thread count and the runtime
versions), so a second start (another `chromobatch process`, another watcher worker) does not measure
again.

Rules that keep accuracy (docs/results.md has the g612 figures behind them):

* fp32 in any runtime computes the same function up to float reordering: always a candidate.
* bf16 is a candidate for `auto` only where the hardware computes it natively (a GPU with bf16, or a CPU
  with AVX-512 BF16 or AMX: `native_bf16`; elsewhere it is emulated and ~100x slower) and where the model's
  own measurement allows it (`bf16_measured`: model.json metrics `runtime_agreement`, written by
  benchmarks/runtime_accuracy.py: top-1 agreement with fp32 >= 99.9% and accuracy within 0.1 point on the
  test split). A runtime's own failing record forbids it even when the simulated-bf16 record passed.
* ONNX Runtime has no bf16 kernels for these networks on the CPU: fp32 only.

The converted model (ONNX, read by both ONNX Runtime and OpenVINO) is cached as
<cache>/<model sha256>/model.onnx with key.json beside it (the model checksum, input size, converter and
the file's own sha256); a file whose key does not match, or whose bytes changed, is converted again.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import platform
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

import chromobatch
from chromobatch.errors import ConfigError, ModelError
from chromobatch.files import atomic_write, sha256_file
from chromobatch.ml.folders import LoadedModel
from chromobatch.ml.forward import Engine, TorchEngine, forward_batch
from chromobatch.ml.preprocess import to_tensor

log = logging.getLogger(__name__)

RUNTIMES = ("torch", "onnxruntime", "openvino")
#: The pip extra that installs each optional runtime.
EXTRAS = {"onnxruntime": "chromobatch[onnxruntime]", "openvino": "chromobatch[openvino]"}
#: CPU flags (Linux /proc/cpuinfo names) that mean bf16 matrix math in hardware.
BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")
#: The accuracy bar a reduced precision or another runtime must meet on the test split (issue 17).
MIN_AGREEMENT = 0.999
MAX_ACCURACY_DROP_PT = 0.1
#: The batch `auto` times the runtimes on, and a watcher warms its runtime up with: one cell's chromosomes.
CELL_BATCH = 46
#: Bump when the export changes, so older cached files are converted again.
CONVERTER_VERSION = 1
ONNX_FILE = "model.onnx"
KEY_FILE = "key.json"


# ---------------------------------------------------------------- the machine


def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags as Linux names them (empty where /proc/cpuinfo is not there)."""
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def native_bf16(device: torch.device, flags: frozenset[str] | None = None) -> bool:
    """True where bf16 runs in hardware: a CUDA device that supports it, a CPU with AVX-512 BF16 or AMX."""
    if device.type == "cuda":
        return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    flags = cpu_flags() if flags is None else flags
    return any(f in flags for f in BF16_CPU_FLAGS)


def installed_runtimes() -> list[str]:
    """torch always; ONNX Runtime and OpenVINO when their packages are importable."""
    return ["torch"] + [r for r in RUNTIMES[1:] if importlib.util.find_spec(r) is not None]


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "?"


# ---------------------------------------------------------------- accuracy records


def bf16_measured(meta: dict[str, Any], runtime: str) -> bool:
    """Whether the model's measured agreement allows bf16 in `runtime` (module docstring)."""
    records = (meta.get("metrics") or {}).get("runtime_agreement") or {}
    own = records.get(f"{runtime}/bf16")
    if isinstance(own, dict) and "passed" in own:
        return bool(own["passed"])
    simulated = records.get("bf16-simulated")
    return isinstance(simulated, dict) and bool(simulated.get("passed"))


def agreement_passes(agreement: float, accuracy_drop_pt: float) -> bool:
    return agreement >= MIN_AGREEMENT and abs(accuracy_drop_pt) <= MAX_ACCURACY_DROP_PT


# ---------------------------------------------------------------- the converted-model cache


def cache_root(setting: str = "") -> Path:
    if setting.strip():
        return Path(setting).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "chromobatch"


def _onnx_key(model: LoadedModel) -> dict[str, Any]:
    return {"model_sha256": model.sha256, "input_size": model.spec.input_size, "converter": CONVERTER_VERSION,
            "torch": torch.__version__}


def export_onnx(model: LoadedModel, path: Path) -> None:
    """The network (embeddings, logits) as ONNX with a dynamic batch dimension (PyTorch's exporter)."""
    net = model.net.to("cpu").eval()
    s = model.spec.input_size
    dummy = torch.zeros(2, 1, s, s)
    with torch.no_grad(), warnings.catch_warnings():  # no_grad, not inference_mode: tracing needs plain tensors
        warnings.simplefilter("ignore", DeprecationWarning)  # the TorchScript exporter: no onnxscript needed
        torch.onnx.export(net, (dummy,), str(path), input_names=["x"], output_names=["emb", "logits"],
                          dynamic_axes={"x": {0: "batch"}, "emb": {0: "batch"}, "logits": {0: "batch"}},
                          opset_version=17, dynamo=False)
    model.net.to(model.device)


def converted_onnx(model: LoadedModel, cache_dir: str | Path = "") -> Path:
    """The model as ONNX from the cache, converted (and cached) when absent or when its key does not match.

    Never trusted on the folder name alone: key.json must name this model's checksum, input size and
    converter, and the file's sha256 must be the one recorded when it was written.
    """
    folder = cache_root(str(cache_dir)) / model.sha256
    path, key_path = folder / ONNX_FILE, folder / KEY_FILE
    want = _onnx_key(model)
    if path.is_file() and key_path.is_file():
        try:
            key = json.loads(key_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            key = {}
        if isinstance(key, dict) and all(key.get(k) == v for k, v in want.items()) \
                and key.get("file_sha256") == sha256_file(path):
            return path
        log.warning("cached %s does not match model %s (key or content differs); converting again", path,
                    model.sha256[:12])
    folder.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    tmp = folder / f".{ONNX_FILE}.{os.getpid()}.tmp"
    try:
        export_onnx(model, tmp)
        digest = sha256_file(tmp)
        os.replace(tmp, path)
    except Exception as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, (OSError, RuntimeError, ValueError)):
            raise ModelError(f"{model.folder}: could not convert to ONNX in {folder}: {exc}") from exc
        raise
    atomic_write(key_path, json.dumps({**want, "file_sha256": digest}, indent=2, sort_keys=True) + "\n")
    log.info("converted model %s to ONNX in %.1fs (%s)", model.sha256[:12], time.perf_counter() - t, path)
    return path


# ---------------------------------------------------------------- building engines


def build_engine(model: LoadedModel, runtime: str, precision: str, cache_dir: str | Path = "",
                 threads: int | None = None) -> Engine:
    """One engine for `runtime` at `precision` (both resolved, not auto); ConfigError when it cannot run here."""
    threads = threads or torch.get_num_threads()
    if runtime == "torch":
        return TorchEngine(model.net, model.device, precision, fold_batchnorm=model.device.type == "cpu")
    if model.device.type != "cpu":
        raise ConfigError(f"runtime {runtime} runs on the CPU here; device is {model.device}",
                          hint="Use runtime = torch on a GPU (or auto).")
    if runtime not in RUNTIMES:
        raise ConfigError(f"unknown runtime {runtime!r} (expected auto or one of {', '.join(RUNTIMES)})")
    if importlib.util.find_spec(runtime) is None:
        raise ConfigError(f"runtime {runtime} is not installed", hint=f"pip install '{EXTRAS[runtime]}'")
    if runtime == "onnxruntime":
        if precision != "fp32":
            raise ConfigError("ONNX Runtime runs these networks in fp32 only on the CPU",
                              hint="Use precision = fp32, or runtime = openvino/torch for bf16.")
        from chromobatch.ml.onnxrt import OnnxRuntimeEngine

        return OnnxRuntimeEngine(converted_onnx(model, cache_dir), threads)
    from chromobatch.ml.openvino_rt import OpenVinoEngine

    return OpenVinoEngine(converted_onnx(model, cache_dir), precision, threads)


# ---------------------------------------------------------------- auto: calibrate, check, remember


def calibration_canvases(n: int, size: int, seed: int = 0) -> torch.Tensor:
    """uint8 canvases that look like preprocessed chromosomes (a bright banded bar on black), for timing and
    for the agreement check: generated, so no patient data is needed at start-up."""
    rng = np.random.default_rng(seed)
    out = np.zeros((n, size, size), dtype=np.uint8)
    for i in range(n):
        length = int(rng.integers(size // 5, int(size * 0.9)))
        width = max(2, int(length * rng.uniform(0.12, 0.3)))
        bands = rng.uniform(0.3, 1.0, size=length // 4 + 1).repeat(4)[:length]
        bar = np.outer(bands, np.hanning(width + 2)[1:-1]) * 255
        top, left = (size - length) // 2, (size - width) // 2
        out[i, top:top + length, left:left + width] = np.clip(bar, 0, 255).astype(np.uint8)
    return torch.from_numpy(out)


@dataclass
class Measured:
    runtime: str
    precision: str
    images_per_s: float
    agreement: float  # top-1 agreement with torch fp32 on the calibration batch


def _time(engine: Engine, x: torch.Tensor, repeats: int) -> float:
    """Images/s, the best of `repeats` passes (the caller's first pass was the warm-up)."""
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        forward_batch(engine, x, engine.device)
        best = min(best, time.perf_counter() - t)
    return len(x) / best


def candidates(model: LoadedModel, runtime: str, precision: str, flags: frozenset[str] | None = None
               ) -> list[tuple[str, str]]:
    """The (runtime, precision) pairs `auto` may choose from, each runnable and allowed here."""
    runtimes = installed_runtimes() if runtime == "auto" else [runtime]
    if model.device.type != "cpu":
        runtimes = [r for r in runtimes if r == "torch"]
    out: list[tuple[str, str]] = []
    bf16_native = native_bf16(model.device, flags)
    for r in runtimes:
        precisions = [precision] if precision != "auto" else ["fp32"]
        if precision == "auto" and bf16_native and r != "onnxruntime" and bf16_measured(model.meta, r):
            precisions.append("bf16")
        out += [(r, p) for p in precisions]
    return out


def _choice_key(model: LoadedModel, pairs: list[tuple[str, str]], batch: int, threads: int) -> str:
    ident = json.dumps({"model": model.sha256, "cpu": cpu_model(), "flags": sorted(cpu_flags() & {
        "avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "avx512_vnni", "avx_vnni"}),
        "threads": threads, "batch": batch, "pairs": pairs, "device": str(model.device),
        "versions": {p: _version(p) for p in ("torch", "onnxruntime", "openvino")},
        "chromobatch": chromobatch.__version__}, sort_keys=True)
    return hashlib.sha256(ident.encode()).hexdigest()[:16]


def calibrate(model: LoadedModel, pairs: list[tuple[str, str]], cache_dir: str | Path = "", batch: int = CELL_BATCH,
              repeats: int = 2, threads: int | None = None) -> list[Measured]:
    """Time each pair on one generated batch and compare its top-1 with torch fp32 on that batch."""
    x = to_tensor(calibration_canvases(batch, model.spec.input_size)).unsqueeze(1)
    ref_probs, _ = forward_batch(TorchEngine(model.net, model.device, "fp32"), x, model.device)
    ref_top = ref_probs.argmax(1).cpu()
    out = []
    for r, p in pairs:
        try:
            engine = build_engine(model, r, p, cache_dir, threads)
            probs, _ = forward_batch(engine, x, engine.device)  # also the warm-up
            speed = _time(engine, x, repeats)
        except (ConfigError, ModelError, RuntimeError) as exc:
            log.warning("runtime %s %s left out: %s", r, p, exc)
            continue
        agree = float((probs.argmax(1).cpu() == ref_top).float().mean())
        out.append(Measured(r, p, speed, agree))
        log.info("calibration: %s %s %.1f images/s, top-1 agreement with torch fp32 %.1f%%", r, p, speed,
                 100 * agree)
    return out


def choose_engine(model: LoadedModel, runtime: str = "auto", precision: str = "auto", cache_dir: str | Path = "",
                  batch_size: int = 64, *, threads: int | None = None,
                  calibrate_fn: Callable[..., list[Measured]] | None = None) -> Engine:
    """The engine a command runs the model with (module docstring); logs the choice and why."""
    threads = threads or torch.get_num_threads()
    if runtime != "auto" and runtime not in RUNTIMES:
        raise ConfigError(f"runtime must be auto or one of {', '.join(RUNTIMES)}, got {runtime!r}")
    if precision not in ("auto", "fp32", "bf16"):
        raise ConfigError(f"precision must be auto, fp32 or bf16, got {precision!r}")
    if precision == "bf16" and not native_bf16(model.device):
        raise ConfigError(f"precision bf16 asked for, but {model.device} has no native bf16 "
                          f"({' or '.join(BF16_CPU_FLAGS)} on a CPU); it would be emulated, ~100x slower",
                          hint="Use precision = auto or fp32.")
    if model.device.type == "cuda" and runtime in ("auto", "torch"):
        # On a GPU PyTorch is the runtime; bf16 autocast + channels_last as before, unless fp32 is asked for.
        prec = "fp32" if precision == "fp32" or not native_bf16(model.device) else "bf16"
        engine: Engine = TorchEngine(model.net, model.device, prec)
        log.info("inference: torch %s on %s", prec, model.device)
        return engine
    pairs = candidates(model, runtime, precision)
    if len(pairs) == 1:
        engine = build_engine(model, *pairs[0], cache_dir, threads)
        log.info("inference: %s %s on %s (%s)", engine.runtime, engine.precision, model.device,
                 "as set" if runtime != "auto" else "the only one installed")
        return engine
    key = _choice_key(model, pairs, batch_size, threads)
    choice_file = cache_root(str(cache_dir)) / model.sha256 / f"choice-{key}.json"
    remembered = _read_choice(choice_file, pairs)
    if remembered is not None:
        r, p, speed = remembered
        log.info("inference: %s %s on %s (measured fastest earlier at %.0f images/s; %s)", r, p, model.device,
                 speed, choice_file)
        return build_engine(model, r, p, cache_dir, threads)
    t = time.perf_counter()
    measured = (calibrate_fn or calibrate)(model, pairs, cache_dir, min(batch_size, CELL_BATCH), threads=threads)
    ok = [m for m in measured if m.agreement >= 1.0 or (m.runtime == "torch" and m.precision == "fp32")]
    for m in measured:
        if m not in ok:
            log.warning("runtime %s %s left out: top-1 agreement with torch fp32 %.1f%% on the calibration batch",
                        m.runtime, m.precision, 100 * m.agreement)
    if not ok:
        engine = TorchEngine(model.net, model.device, "fp32")
        log.info("inference: torch fp32 on %s (no other combination passed calibration)", model.device)
        return engine
    best = max(ok, key=lambda m: m.images_per_s)
    log.info("inference: %s %s on %s, the fastest of %s (calibrated in %.1fs)", best.runtime, best.precision,
             model.device, ", ".join(f"{m.runtime} {m.precision} {m.images_per_s:.0f}/s" for m in measured),
             time.perf_counter() - t)
    try:
        atomic_write(choice_file, json.dumps({"runtime": best.runtime, "precision": best.precision,
                                              "images_per_s": best.images_per_s,
                                              "measured": [m.__dict__ for m in measured]}, indent=2) + "\n")
    except OSError as exc:
        log.warning("could not remember the runtime choice in %s: %s", choice_file, exc)
    return build_engine(model, best.runtime, best.precision, cache_dir, threads)


def _read_choice(path: Path, pairs: list[tuple[str, str]]) -> tuple[str, str, float] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        choice = (str(data["runtime"]), str(data["precision"]))
        speed = float(data["images_per_s"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return (*choice, speed) if choice in pairs else None
