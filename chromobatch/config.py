"""Effective settings: defaults < chromobatch.toml < CHROMOBATCH_* environment variables < CLI flags.

The file is `./chromobatch.toml`, or the path in CHROMOBATCH_CONFIG. Keys are the field names below,
either at the top level or under a `[chromobatch]` table.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from chromobatch.errors import ConfigError

ENV_PREFIX = "CHROMOBATCH_"
READINESS_MODES = ("either", "quiet", "ready")
RUNTIMES = ("auto", "torch", "onnxruntime", "openvino")
PRECISIONS = ("auto", "fp32", "bf16")


@dataclass(frozen=True)
class Settings:
    db: str = "cases.sqlite"
    #: Model folder to use; empty means the database's active model, else the shipped default.
    model: str = ""
    reports_dir: str = "reports"
    processed_dir: str = "processed"
    failed_dir: str = "failed"
    #: auto | dark_on_light (G-band) | bright_on_dark (Q-band)
    polarity: str = "auto"
    #: What an image is: auto (told apart per image: many objects or far larger than a chromosome is a whole
    #: metaphase), crops or metaphase. A case folder's input.txt (one word: crops or metaphase) overrides it.
    input: str = "auto"
    #: Segmenter for whole metaphases: empty (the shipped models/segmenter, else the classical one),
    #: "classical", or a segmenter model folder.
    segmenter: str = ""
    device: str = "auto"
    #: Inference runtime: auto (the fastest correct one installed, measured at start-up and remembered per
    #: model and CPU), torch, onnxruntime or openvino (`pip install chromobatch[onnxruntime]`, `[openvino]`).
    runtime: str = "auto"
    #: auto (bf16 only where the hardware computes it natively and the model's agreement with fp32 was
    #: measured; docs/results.md), fp32 or bf16.
    precision: str = "auto"
    #: Converted models (ONNX, OpenVINO IR) and the auto choice, keyed by the model's checksum. Empty:
    #: $XDG_CACHE_HOME/chromobatch (~/.cache/chromobatch).
    cache_dir: str = ""
    #: Watcher: how many waiting cases may share one forward pass (each still commits on its own). 0: auto
    #: (8 on a GPU, 1 on the CPU, where a full batch of one case already keeps the cores busy).
    batch_cases: int = 0
    batch_size: int = 64
    loader_workers: int = 0
    #: Watcher: processes that render the classifier's input canvases of a case before its forward pass
    #: (`ml.renderpool`). 0: auto (the cores shared among the workers, at most 4 each); 1: in the worker itself.
    render_processes: int = 0
    workers: int = 1
    poll_seconds: float = 0.0
    quiet_seconds: float = 5.0
    #: When a case folder is complete: quiet (nothing changed for quiet_seconds), ready (only a READY
    #: marker, however long the copy pauses) or either (the marker, or quiet; the default).
    readiness: str = "either"
    heartbeat_seconds: float = 10.0
    stale_after_seconds: float = 60.0
    max_attempts: int = 3
    low_confidence: float = 0.5
    #: Karyotype-aware assignment: cost (nats) of a third copy, and of an empty autosome/first-X slot.
    gain_penalty: float = 8.0
    loss_penalty: float = 8.0
    max_image_pixels: int = 4096 * 4096
    log_level: str = "INFO"
    #: Mode of every file chromobatch creates (reports, PNGs, DICOM, the SQLite database, error files): an
    #: octal string like "0640" (quoted in TOML); folders get x where r is set. Empty: follow the process
    #: umask (UMask=0027 in the systemd units gives 0640). The CLI sets the umask from it once at start.
    file_mode: str = ""
    #: Who reviews: `label` and `review --accept` record the name in the label audit trail (--reviewer).
    reviewer: str = ""
    #: `train --db`: the registry folder its models are written to, as <name>-<timestamp>/ (--models-dir).
    models_dir: str = "models/registry"
    #: `train --db`: the lock file that lets one training run at a time (--lock); empty: <sqlite>.train.lock
    #: next to a SQLite database, else <models_dir>/.train.lock.
    train_lock: str = ""

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_FIELDS = {f.name: f for f in fields(Settings)}


def _coerce(name: str, value: Any, source: str) -> Any:
    kind = _FIELDS[name].type
    try:
        if kind in ("int", int):
            if isinstance(value, bool):
                raise ValueError
            return int(value)
        if kind in ("float", float):
            return float(value)
        return str(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{source}: {name} must be {kind}, got {value!r}") from None


def _validate(s: Settings) -> Settings:
    if s.polarity not in ("auto", "dark_on_light", "bright_on_dark"):
        raise ConfigError(f"polarity must be auto, dark_on_light or bright_on_dark, got {s.polarity!r}")
    if s.input not in ("auto", "crops", "metaphase"):
        raise ConfigError(f"input must be auto, crops or metaphase, got {s.input!r}")
    if s.readiness not in READINESS_MODES:
        raise ConfigError(f"readiness must be one of {', '.join(READINESS_MODES)}, got {s.readiness!r}")
    if s.device not in ("auto", "cpu", "cuda") and not s.device.startswith("cuda:"):
        raise ConfigError(f"device must be auto, cpu or cuda[:N], got {s.device!r}")
    if s.runtime not in RUNTIMES:
        raise ConfigError(f"runtime must be one of {', '.join(RUNTIMES)}, got {s.runtime!r}")
    if s.precision not in PRECISIONS:
        raise ConfigError(f"precision must be one of {', '.join(PRECISIONS)}, got {s.precision!r}")
    if s.render_processes < 0:
        raise ConfigError(f"render_processes must be >= 0 (0: auto), got {s.render_processes}")
    if s.batch_cases < 0:
        raise ConfigError(f"batch_cases must be >= 0 (0: auto), got {s.batch_cases}")
    for name in ("batch_size", "workers", "max_attempts"):
        if getattr(s, name) < 1:
            raise ConfigError(f"{name} must be >= 1, got {getattr(s, name)}")
    for name in ("poll_seconds", "quiet_seconds"):
        if getattr(s, name) < 0:
            raise ConfigError(f"{name} must be >= 0, got {getattr(s, name)}")
    if not 0 < s.heartbeat_seconds < s.stale_after_seconds:
        raise ConfigError(f"heartbeat_seconds ({s.heartbeat_seconds}) must be > 0 and below stale_after_seconds "
                          f"({s.stale_after_seconds}), or running cases would be taken from live workers")
    if s.gain_penalty < 0 or s.loss_penalty < 0:
        raise ConfigError("gain_penalty and loss_penalty must be >= 0")
    if s.max_image_pixels < 16:
        raise ConfigError(f"max_image_pixels must be >= 16, got {s.max_image_pixels}")
    if not s.models_dir.strip():
        raise ConfigError("models_dir must not be empty (default models/registry)")
    if not 0.0 <= s.low_confidence <= 1.0:
        raise ConfigError(f"low_confidence must be within 0..1, got {s.low_confidence}")
    if s.file_mode:
        digits = s.file_mode.strip().lower().removeprefix("0o")
        if not digits or any(c not in "01234567" for c in digits) or int(digits, 8) > 0o777:
            raise ConfigError(f"file_mode must be an octal mode like \"0640\" (a string, at most 0777), "
                              f"got {s.file_mode!r}")
        mode = int(digits, 8)
        if mode & 0o002:
            raise ConfigError(f"file_mode {s.file_mode} lets everybody write the files; use 0640 or 0600")
        if mode & 0o600 != 0o600:
            raise ConfigError(f"file_mode {s.file_mode} must let the owner read and write (0600 at least)")
        s = dataclasses.replace(s, file_mode=f"{mode:04o}")
    return s


def config_path(explicit: str | Path | None = None) -> Path | None:
    if explicit:
        return Path(explicit)
    env = os.environ.get(ENV_PREFIX + "CONFIG")
    if env:
        return Path(env)
    local = Path("chromobatch.toml")
    return local if local.is_file() else None


def load_settings(overrides: dict[str, Any] | None = None, config_file: str | Path | None = None) -> Settings:
    """Merge the three layers; None values in `overrides` (flags not given) are ignored."""
    values: dict[str, Any] = {}
    path = config_path(config_file)
    if path is not None:
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{path}: not valid TOML: {exc}") from exc
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from exc
        data = data.get("chromobatch", data)
        for key, value in data.items():
            if key not in _FIELDS:
                raise ConfigError(f"{path}: unknown setting {key!r}")
            values[key] = _coerce(key, value, str(path))
    for name in _FIELDS:
        env = os.environ.get(ENV_PREFIX + name.upper())
        if env is not None and env != "":
            values[name] = _coerce(name, env, ENV_PREFIX + name.upper())
    for key, value in (overrides or {}).items():
        if value is None:
            continue
        if key not in _FIELDS:
            raise ConfigError(f"unknown setting {key!r}")
        values[key] = _coerce(key, value, f"--{key.replace('_', '-')}")
    return _validate(Settings(**values))
