"""Nightly retraining from the lab's own labelled cases, and the model registry (candidate/active/retired).

`retrain` builds the training set from the database (every chromosome whose newest label is reviewed or
imported), splits it by patient with a hash (a patient is on the same side every night, so the active model,
trained the same way, never saw tonight's validation patients), trains with `train.train`, registers the
result as a candidate and promotes it only when its validation accuracy is not worse than the active model's
on the same validation patients by more than `margin` accuracy percentage points. Otherwise the candidate
stays a candidate with the reason in ModelVersion.reason.

Only one training run at a time: an OS file lock (fcntl.flock, released by the kernel when the process dies)
plus, on PostgreSQL, a session advisory lock, so runs on different hosts sharing the database never overlap.
A second run raises TrainingLocked; the CLI exits with LOCKED_EXIT_CODE (75, EX_TEMPFAIL), which the systemd
unit counts as success.

Registry history: ModelVersion.promoted_at is the latest activation; every registration, promotion,
retirement and rollback is also appended to ModelVersion.metrics["history"] (time, event, reason).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import func, select, text
from sqlalchemy.engine import Connection
from sqlalchemy.orm import Session

from chromobatch import CLASS_INDEX, CLASSES
from chromobatch.errors import ChromobatchError, DataError, ModelError
from chromobatch.files import atomic_write
from chromobatch.intake.imaging import decode_png
from chromobatch.store.db import Case, Chromosome, Database, Label, ModelVersion, active_model, utcnow
from chromobatch.training.records import Record

log = logging.getLogger(__name__)

#: Exit code of `chromobatch train --db` when another training run holds the lock (EX_TEMPFAIL).
LOCKED_EXIT_CODE = 75
#: pg_try_advisory_lock key of training runs (`db upgrade` uses 727274).
ADVISORY_LOCK_KEY = 727275
DEFAULT_MODELS_DIR = Path("models/registry")
DEFAULT_NAME = "chromobatch"
#: Metrics copied from evaluate.compute_metrics into the registry (the per-class tables stay out).
SUMMARY_METRICS = ("n", "accuracy", "top5_accuracy", "recall_macro", "precision_macro", "f1_macro", "auc_macro")


class TrainingLocked(ChromobatchError):
    """Another training run holds the lock; not an error for a timer, so it has its own exit code."""

    hint = "Another `chromobatch train --db` is running; this run did nothing. Try again when it has finished."
    exit_code = LOCKED_EXIT_CODE


# --------------------------------------------------------------------------------------------------
# Training set


@dataclass
class TrainingSet:
    """Records from the database, split by patient; `train` records carry no split (train() holds out its
    own cells for model selection), `val` records carry split='val' and are only used to compare models."""

    train: list[Record]
    val: list[Record]
    n_cases: int = 0
    n_patients: int = 0
    n_val_patients: int = 0
    label_sources: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0

    def summary(self) -> dict[str, Any]:
        return {"n_train": len(self.train), "n_val": len(self.val), "cases": self.n_cases,
                "patients": self.n_patients, "val_patients": self.n_val_patients,
                "label_sources": dict(self.label_sources)}


def patient_key(case_id: str, meta: dict[str, Any] | None) -> str:
    """Who a case belongs to: DICOM PatientID when the case has one, else the case id (one patient per case)."""
    meta = meta or {}
    dicom = meta.get("dicom") if isinstance(meta.get("dicom"), dict) else {}
    pid = str(dicom.get("PatientID") or meta.get("PatientID") or "").strip()
    return f"pid:{pid}" if pid else f"case:{case_id}"


def _unit_hash(key: str, salt: str = "") -> tuple[float, str]:
    """A stable number in [0, 1) and a pseudonym for a patient key (the key itself never leaves this module)."""
    digest = hashlib.sha256(f"{salt}\0{key}".encode()).hexdigest()
    return int(digest[:16], 16) / 2**64, digest[:16]


def assign_validation(keys: set[str], val_fraction: float, salt: str = "") -> set[str]:
    """The patients that validate: hash below val_fraction; at least one on each side when there are two."""
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"validation fraction must be within 0..1, got {val_fraction}")
    ranked = sorted(keys, key=lambda k: _unit_hash(k, salt)[0])
    val = {k for k in ranked if _unit_hash(k, salt)[0] < val_fraction}
    if val_fraction > 0 and not val and len(ranked) >= 2:
        val = {ranked[0]}
    if len(val) == len(ranked) and len(ranked) >= 2:
        val.discard(ranked[-1])
    return val


def build_training_set(database: Database, *, val_fraction: float = 0.2, salt: str = "") -> TrainingSet:
    """Every chromosome whose newest label is reviewed or imported, decoded, split by patient.

    Streams the rows (crop PNGs can be many): one query for the cases, one for chromosome + newest label.
    """
    t0 = time.perf_counter()
    with database.session() as s:
        cases = {pk: (cid, meta) for pk, cid, meta in s.execute(select(Case.id, Case.case_id, Case.meta))}
        newest = select(func.max(Label.id).label("lid")).group_by(Label.chromosome_id).subquery()
        q = (select(Chromosome.id, Chromosome.case_pk, Chromosome.cell_id, Chromosome.crop_png, Label.label,
                    Label.source)
             .join(Label, Label.chromosome_id == Chromosome.id)
             .join(newest, newest.c.lid == Label.id)
             .where(Label.source.in_(("reviewed", "imported")))
             .order_by(Chromosome.id))
        if database.dialect == "postgresql":
            # A streamed (server-side) cursor is planned for its first rows by default, which picks a plan
            # ~100x slower for reading them all; we read them all.
            s.execute(text("SET LOCAL cursor_tuple_fraction = 1.0"))
        keys: dict[int, str] = {}
        rows: list[tuple[int, str, int, Any, int]] = []
        sources: Counter[str] = Counter()
        bad = 0
        for cid, case_pk, cell_id, png, label, source in s.execute(q.execution_options(yield_per=1000)):
            k = CLASS_INDEX.get(label)
            if k is None:
                bad += 1
                continue
            if case_pk not in keys:
                keys[case_pk] = patient_key(*cases[case_pk])
            try:
                crop = decode_png(png)
            except (OSError, ValueError):
                bad += 1
                continue
            rows.append((cid, keys[case_pk], cell_id, crop, k))
            sources[source] += 1
    if bad:
        log.warning("training set: %d labelled chromosomes skipped (undecodable crop or unknown label)", bad)
    patients = set(keys.values())
    val_keys = assign_validation(patients, val_fraction, salt)
    pseudo = {k: _unit_hash(k, salt)[1] for k in patients}
    train: list[Record] = []
    val: list[Record] = []
    for cid, key, cell_id, crop, k in rows:
        is_val = key in val_keys
        rec = Record(crop=crop, label=k, patient=pseudo[key], cell=str(cell_id), split="val" if is_val else "",
                     source=f"chromosome:{cid}")
        (val if is_val else train).append(rec)
    result = TrainingSet(train=train, val=val, n_cases=len(keys), n_patients=len(patients),
                         n_val_patients=len(val_keys), label_sources=dict(sources),
                         seconds=time.perf_counter() - t0)
    log.info("training set from the database: %d train / %d val chromosomes, %d cases, %d patients "
             "(%d validate), built in %.1fs", len(train), len(val), result.n_cases, result.n_patients,
             result.n_val_patients, result.seconds)
    return result


# --------------------------------------------------------------------------------------------------
# Lock


class TrainingLock:
    """flock on `path` (+ pg_try_advisory_lock on PostgreSQL), held for the whole run, never waited for."""

    def __init__(self, path: Path, database: Database | None = None) -> None:
        self.path = Path(path)
        self.database = database
        self._fd: int | None = None
        self._conn: Connection | None = None

    def acquire(self) -> TrainingLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise TrainingLocked(f"another training run holds the lock {self.path}") from None
        self._fd = fd
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} since {utcnow().isoformat(timespec='seconds')}\n".encode())
        if self.database is not None and self.database.dialect == "postgresql":
            conn = self.database.engine.connect().execution_options(isolation_level="AUTOCOMMIT")
            got = conn.exec_driver_sql(f"SELECT pg_try_advisory_lock({ADVISORY_LOCK_KEY})").scalar()
            if not got:
                conn.close()
                self.release()
                raise TrainingLocked("another training run holds the database's training lock "
                                     f"(pg advisory lock {ADVISORY_LOCK_KEY}, possibly on another host)")
            self._conn = conn
        return self

    def release(self) -> None:
        if self._conn is not None:
            try:
                self._conn.exec_driver_sql(f"SELECT pg_advisory_unlock({ADVISORY_LOCK_KEY})")
            finally:
                self._conn.close()
                self._conn = None
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> TrainingLock:
        return self.acquire()

    def __exit__(self, *_exc: object) -> None:
        self.release()


def default_lock_path(database: Database, models_dir: Path) -> Path:
    """Next to a SQLite file (`cases.sqlite.train.lock`); in the models folder for a server database."""
    url = database.url
    if url.startswith("sqlite:///"):
        return Path(url.removeprefix("sqlite:///") + ".train.lock")
    return Path(models_dir) / ".train.lock"


# --------------------------------------------------------------------------------------------------
# Registry


def _note(row: ModelVersion, event: str, reason: str | None, at: datetime) -> None:
    """Append to metrics["history"] (a new dict, so SQLAlchemy sees the JSON change)."""
    metrics = dict(row.metrics or {})
    metrics["history"] = [*metrics.get("history", []),
                          {"at": at.isoformat(timespec="seconds"), "event": event, "reason": reason}]
    row.metrics = metrics


def _activate(s: Session, row: ModelVersion, reason: str, event: str = "promoted") -> None:
    """Make `row` the one active model: whatever was active is retired, in the same transaction."""
    now = utcnow()
    others = (s.query(ModelVersion).filter(ModelVersion.status == "active", ModelVersion.id != row.id)
              .with_for_update().all())
    for other in others:
        other.status = "retired"
        _note(other, "retired", f"replaced by {row.name} {row.version}", now)
    row.status, row.promoted_at, row.reason = "active", now, reason
    _note(row, event, reason, now)


def find_version(s: Session, ref: str) -> ModelVersion:
    """A model version by id, version, name-version, or a unique sha256 prefix (>= 8 hex digits)."""
    text = ref.strip()
    hits: list[ModelVersion] = []
    if text.isdigit():
        row = s.get(ModelVersion, int(text))
        hits = [row] if row is not None else []
    if not hits:
        hits = s.query(ModelVersion).filter(ModelVersion.version == text).all()
    if not hits:
        hits = [r for r in s.query(ModelVersion).all() if f"{r.name}-{r.version}" == text
                or f"{r.name} {r.version}" == text or (len(text) >= 8 and r.sha256.startswith(text.lower()))]
    if not hits:
        raise ModelError(f"no model version {ref!r} in the registry", hint="See `chromobatch models list`.")
    if len(hits) > 1:
        raise ModelError(f"{ref!r} matches {len(hits)} model versions; use the id",
                         hint="See `chromobatch models list`.")
    return hits[0]


def list_models(database: Database) -> list[dict[str, Any]]:
    with database.session() as s:
        return [{"id": r.id, "name": r.name, "version": r.version, "status": r.status, "backbone": r.backbone,
                 "val_accuracy": (r.metrics or {}).get("val", {}).get("accuracy"),
                 "created_at": r.created_at, "promoted_at": r.promoted_at, "reason": r.reason, "file": r.file,
                 "history": list((r.metrics or {}).get("history", []))}
                for r in s.query(ModelVersion).order_by(ModelVersion.id)]


def promote(database: Database, ref: str, *, reason: str | None = None) -> ModelVersion:
    """Make a model version active by hand (the watchers switch to it before their next case)."""
    with database.session() as s:
        row = find_version(s, ref)
        if row.status == "active":
            raise ModelError(f"model {row.name} {row.version} is already the active one")
        _activate(s, row, reason or "promoted by hand")
    log.info("model %s %s (id %d) promoted", row.name, row.version, row.id)
    return row


def rollback(database: Database, *, reason: str | None = None) -> tuple[ModelVersion, ModelVersion]:
    """Re-activate the model that was active before the current one and retire the current one.

    'Before' = the retired model retired most recently (by the history), else the latest promoted_at.
    Returns (retired, reactivated).
    """
    with database.session() as s:
        current = (s.query(ModelVersion).filter_by(status="active").order_by(ModelVersion.id.desc())
                   .with_for_update().first())
        if current is None:
            raise ModelError("no active model to roll back")

        def retired_at(r: ModelVersion) -> str:
            times = [h["at"] for h in (r.metrics or {}).get("history", []) if h.get("event") == "retired"]
            return max(times) if times else (r.promoted_at.isoformat() if r.promoted_at else "")

        previous = [r for r in s.query(ModelVersion).filter(ModelVersion.status == "retired",
                                                            ModelVersion.promoted_at.isnot(None))]
        if not previous:
            raise ModelError("no previously active model to roll back to",
                             hint="Promote a candidate with `chromobatch models promote VERSION`.")
        target = max(previous, key=lambda r: (retired_at(r), r.id))
        _activate(s, target, reason or f"rollback from {current.name} {current.version}", event="rollback")
        _note(current, "rolled_back", reason, utcnow())
    log.info("rolled back: model id %d retired, id %d active again", current.id, target.id)
    return current, target


# --------------------------------------------------------------------------------------------------
# Retrain


@dataclass
class RetrainOptions:
    """Knobs of a nightly run (the training knobs themselves are train.TrainConfig)."""

    models_dir: Path = DEFAULT_MODELS_DIR
    name: str = DEFAULT_NAME
    #: Fraction of patients (by hash) that validate; they never train.
    val_fraction: float = 0.2
    #: Promote when candidate accuracy >= active accuracy - margin/100 (accuracy percentage points).
    margin: float = 0.0
    lock_path: Path | None = None
    #: Register only; never promote (a person decides with `chromobatch models promote`).
    promote: bool = True
    #: Drop the resumable checkpoint from the registered folder (a nightly run starts afresh).
    keep_checkpoint: bool = False
    salt: str = ""
    #: Start from the active model's weights (its backbone, size and preprocessing) instead of random init:
    #: a nightly CPU run then fine-tunes for its steps rather than learning from nothing.
    warm_start: bool = False


@dataclass
class RetrainResult:
    version_id: int
    name: str
    version: str
    status: str  # active (promoted) | candidate (kept)
    promoted: bool
    reason: str
    model_dir: Path
    candidate_metrics: dict[str, Any]
    active_metrics: dict[str, Any] | None
    data: dict[str, Any]
    seconds: float


def _summary(metrics: dict[str, Any]) -> dict[str, Any]:
    return {k: metrics.get(k) for k in SUMMARY_METRICS}


def _evaluate(folder: str | Path, records: list[Record], device: str) -> dict[str, Any]:
    from chromobatch.training.evaluate import evaluate

    return _summary(evaluate(folder, records, None, split=None, device=device))


def decide(candidate: dict[str, Any] | None, active: dict[str, Any] | None, margin: float,
           active_error: str | None = None, n_patients: int = 0) -> tuple[bool, str]:
    """(promote?, reason) from the two models' metrics on the same validation patients."""
    if candidate is None:
        return False, "no validation patients: nothing to compare on; promote by hand if wanted"
    if active_error is not None:
        return False, f"the active model could not be evaluated ({active_error}); promote by hand if wanted"
    c = float(candidate["accuracy"])
    if active is None:
        return True, f"first model of the registry (validation accuracy {c:.4f})"
    a = float(active["accuracy"])
    text = (f"validation accuracy {c:.4f} vs active {a:.4f} on {candidate['n']} chromosomes of {n_patients} "
            f"patient(s), margin {margin:g} points")
    if c + 1e-12 >= a - margin / 100.0:
        return True, "promoted: " + text
    return False, "not promoted (worse than the active model by more than the margin): " + text


def _write_identity(folder: Path, name: str, version: str, extra: dict[str, Any]) -> None:
    """Name and version go into model.json, where register_model reads them; the weights stay as they are."""
    path = folder / "model.json"
    meta = json.loads(path.read_text())
    meta.update(name=name, version=version)
    meta.setdefault("training", {})["database"] = extra
    atomic_write(path, json.dumps(meta, indent=2, sort_keys=True) + "\n")


def _dist_init(device: str) -> tuple[int, int, bool]:
    """Under torchrun: join the process group here (train() reuses it) so rank 0 can share the lock's verdict
    and the output folder with the others. Returns (rank, world size, whether we own the group)."""
    import torch
    import torch.distributed as dist

    if "LOCAL_RANK" not in os.environ or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0, 1, False
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), False
    use_cuda = device in ("auto", "cuda") and torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return dist.get_rank(), dist.get_world_size(), True


def _broadcast(value: Any, world: int) -> Any:
    if world == 1:
        return value
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def warm_start_config(database: Database, config: Any) -> Any:
    """`config` set to fine-tune the active model: init_from its folder, architecture and preprocessing copied
    from its model.json (so they cannot disagree). Unchanged, with a log line, when no model is active."""
    from dataclasses import replace

    from chromobatch.ml.folders import read_meta

    with database.session() as s:
        active = active_model(s)
        found = (active.id, active.file) if active is not None else None
    if found is None:
        log.info("warm start asked for, but no model is active: training from random initialisation")
        return config
    version_id, folder = found
    meta = read_meta(folder)
    pre = meta["preprocess"]
    log.info("warm start from the active model (id %d)", version_id)
    return replace(config, init_from=str(folder), backbone=meta["backbone"], embed_dim=int(meta["embed_dim"]),
                   input_size=int(pre["input_size"]), preprocess=pre["mode"], orient=pre.get("orient", "none"))


def retrain(database: Database, config: Any, options: RetrainOptions | None = None, *,
            progress: bool = False) -> RetrainResult | None:
    """Train on the database's labels, register a candidate, promote it if good enough.

    `config` is a train.TrainConfig. Under torchrun every rank calls this; rank 0 locks, registers and
    decides, the others train and return None.
    """
    from chromobatch.ml.folders import load_model
    from chromobatch.ml.predict import pick_device
    from chromobatch.registry.register import register_model
    from chromobatch.training.loop import train

    opts = options or RetrainOptions()
    if opts.margin < 0:
        raise DataError(f"margin must be >= 0 accuracy points, got {opts.margin}")
    t0 = time.perf_counter()
    rank, world, owned = _dist_init(config.device)
    lock: TrainingLock | None = None
    try:
        verdict: Any = None
        if rank == 0:
            try:
                lock = TrainingLock(opts.lock_path or default_lock_path(database, Path(opts.models_dir)),
                                    database).acquire()
                version = utcnow().strftime("%Y%m%dT%H%M%SZ")
                verdict = {"version": version, "out": str(Path(opts.models_dir) / f"{opts.name}-{version}")}
            except TrainingLocked as exc:
                verdict = {"locked": str(exc)}
        verdict = _broadcast(verdict, world)
        if "locked" in verdict:
            raise TrainingLocked(verdict["locked"])
        version, out = verdict["version"], Path(verdict["out"])

        data = build_training_set(database, val_fraction=opts.val_fraction, salt=opts.salt)
        if not data.train:
            raise DataError("no labelled chromosomes to train on",
                            hint="Import labels (labels.csv) or review cases (`chromobatch review --accept`).")
        present = {r.label for r in data.train}
        missing = [c for k, c in enumerate(CLASSES) if k not in present]
        if missing:
            raise DataError(f"the training patients have no labelled chromosome of class(es) {', '.join(missing)}",
                            hint="Every class is needed in every training step: review more cases.")
        if rank == 0 and out.exists():
            raise ModelError(f"{out} already exists")
        if opts.warm_start and not config.init_from:
            config = warm_start_config(database, config)
        trained = train(config, data.train, out, progress=progress)
        if rank != 0:
            return None
        if not opts.keep_checkpoint:
            shutil.rmtree(out / "checkpoint", ignore_errors=True)
        info = {**data.summary(), "steps_done": trained.steps_done, "selection_accuracy": trained.best_val_accuracy,
                "train_seconds": round(trained.seconds, 1), "warm_start_from": config.init_from}
        _write_identity(out, opts.name, version, info)

        device = pick_device(config.device)
        cand_model = load_model(out, device="cpu")
        row = register_model(database, cand_model, status="candidate", name=opts.name)
        auto_active = row.status == "active"
        cand_metrics = _evaluate(out, data.val, device) if data.val else None
        active_metrics: dict[str, Any] | None = None
        active_error: str | None = None
        active_id: int | None = None
        with database.session() as s:
            active = active_model(s, exclude_id=row.id)
            active_file = active.file if active is not None else None
            active_id = active.id if active is not None else None
        if active_file is not None and data.val:
            try:
                active_metrics = {**_evaluate(active_file, data.val, device), "model_version_id": active_id}
            except ChromobatchError as exc:
                active_error = str(exc)
                log.error("active model (id %s) could not be evaluated: %s", active_id, exc)
        if auto_active or active_file is None:
            promote_it, reason = True, "first model of the registry" + (
                f" (validation accuracy {cand_metrics['accuracy']:.4f})" if cand_metrics else "")
        else:
            promote_it, reason = decide(cand_metrics, active_metrics, opts.margin, active_error,
                                        data.n_val_patients)
            if promote_it and not opts.promote:
                promote_it, reason = False, "registered only (--no-promote); would have been " + reason
        with database.session() as s:
            row = s.get(ModelVersion, row.id)
            assert row is not None
            metrics = dict(row.metrics or {})
            metrics.update(val=cand_metrics or {}, active_val=active_metrics, data=info)
            row.metrics = metrics
            _note(row, "registered", None, utcnow())
            if promote_it:
                _activate(s, row, reason)
            else:
                row.status, row.reason = "candidate", reason
                _note(row, "kept", reason, utcnow())
            status = row.status
        log.info("model %s %s (id %d): %s", opts.name, version, row.id, reason)
        return RetrainResult(version_id=row.id, name=opts.name, version=version, status=status,
                             promoted=status == "active", reason=reason, model_dir=out,
                             candidate_metrics=cand_metrics or {}, active_metrics=active_metrics,
                             data=info, seconds=time.perf_counter() - t0)
    finally:
        if lock is not None:
            lock.release()
        if owned:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()


def format_models(rows: list[dict[str, Any]]) -> list[str]:
    """Lines for `chromobatch models list`."""
    out = [f"{'id':>4}  {'status':<9}  {'name':<16}  {'version':<18}  {'val acc':>7}  {'promoted':<19}  reason"]
    for r in rows:
        acc = f"{r['val_accuracy']:.4f}" if isinstance(r["val_accuracy"], (int, float)) else "-"
        promoted = r["promoted_at"].strftime("%Y-%m-%d %H:%M:%S") if r["promoted_at"] else "-"
        out.append(f"{r['id']:>4}  {r['status']:<9}  {r['name'][:16]:<16}  {r['version'][:18]:<18}  {acc:>7}  "
                   f"{promoted:<19}  {r['reason'] or ''}")
    return out


__all__ = ["LOCKED_EXIT_CODE", "RetrainOptions", "RetrainResult", "TrainingLock", "TrainingLocked",
           "TrainingSet", "build_training_set", "decide", "list_models", "promote", "retrain", "rollback"]
