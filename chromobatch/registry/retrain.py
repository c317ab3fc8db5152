"""Nightly retraining from the lab's own labelled cases.

`retrain` builds the training set from the database (every chromosome whose newest label is reviewed or
imported), splits it by patient with a hash (a patient is on the same side every night, so the active model,
trained the same way, never saw tonight's validation patients), trains with `training.loop.train`, registers
the result as a candidate and promotes it only when its validation accuracy is not worse than the active
model's on the same validation patients by more than `margin` accuracy percentage points. Otherwise the
candidate stays a candidate with the reason in ModelVersion.reason.

Only one training run at a time (registry.lock); promotion, rollback and the registry's history live in
registry.promote.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import time
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from sqlalchemy import func, select, text

from chromobatch import CLASS_INDEX, CLASSES
from chromobatch.errors import ChromobatchError, DataError, ModelError, TrainingLocked
from chromobatch.intake.imaging import decode_png
from chromobatch.ml.device import resolve_device
from chromobatch.ml.folders import load_model, read_meta, update_meta
from chromobatch.registry.lock import TrainingLock, default_lock_path
from chromobatch.registry.promote import activate, note_event
from chromobatch.registry.register import register_model
from chromobatch.store.db import Case, Chromosome, Database, Label, ModelVersion, active_model, utcnow
from chromobatch.store.states import ModelStatus, ReviewState
from chromobatch.training.distributed import broadcast_object, init_distributed, shutdown
from chromobatch.training.records import Record

log = logging.getLogger(__name__)

DEFAULT_MODELS_DIR = Path("models/registry")
DEFAULT_NAME = "chromobatch"
#: Metrics copied from evaluate.compute_metrics into the registry (the per-class tables stay out).
SUMMARY_METRICS = ("n", "accuracy", "top5_accuracy", "recall_macro", "precision_macro", "f1_macro", "auc_macro")


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
    found = meta.get("dicom")
    dicom: dict[str, Any] = found if isinstance(found, dict) else {}
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


def build_training_set(database: Database, *, val_fraction: float = 0.2, salt: str = "",
                       signed_only: bool = False, polarity: str | None = None) -> TrainingSet:
    """Every chromosome whose newest label is reviewed or imported, decoded, split by patient.

    polarity: only chromosomes delivered with it (dark_on_light: G-band), so that the model of one stain is
    never trained on the other's crops; None: all.

    signed_only: only the cases a reviewer signed off in the web review (their imported labels too); objects
    a reviewer marked "not a chromosome" never train.

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
             .where(Label.source.in_(("reviewed", "imported")), Chromosome.not_chromosome.is_(False))
             .order_by(Chromosome.id))
        if signed_only:
            q = q.join(Case, Case.id == Chromosome.case_pk).where(Case.review_state == ReviewState.SIGNED)
        if polarity is not None:
            q = q.where(Chromosome.polarity == polarity)
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
    #: Train on the cases signed off in the web review only (`train --db --signed-only`).
    signed_only: bool = False


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

    def change(meta: dict[str, Any]) -> None:
        meta.update(name=name, version=version)
        meta.setdefault("training", {})["database"] = extra

    update_meta(folder, change)


def warm_start_config(database: Database, config: Any) -> Any:
    """`config` set to fine-tune the active model: init_from its folder, architecture and preprocessing copied
    from its model.json (so they cannot disagree). Unchanged, with a log line, when no model is active.

    The loss of a fine-tune is plain focal unless a contrastive weight was asked for (`--lambda-con`): in the
    few-label study (docs/results.md, bioimlab test after fine-tuning on 5/10/20 metaphases, 200 steps)
    SCL fine-tuning was 0.4-0.7 points ahead with 5 metaphases and 1.2-3.8 behind with 10 and 20, from a
    plain and from an SCL start alike."""
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
    if config.lambda_con is None and not config.no_scl:
        log.info("fine-tuning with the plain focal loss (the few-label study's choice; --lambda-con adds SCL)")
        config = replace(config, no_scl=True)
    return replace(config, init_from=str(folder), backbone=meta["backbone"], embed_dim=int(meta["embed_dim"]),
                   input_size=int(pre["input_size"]), preprocess=pre["mode"], orient=pre.get("orient", "none"))


def retrain(database: Database, config: Any, options: RetrainOptions | None = None, *,
            progress: bool = False) -> RetrainResult | None:
    """Train on the database's labels, register a candidate, promote it if good enough.

    `config` is a training.config.TrainConfig. Under torchrun every rank calls this; rank 0 locks, registers
    and decides, the others train and return None.
    """
    from chromobatch.training.loop import train  # looked up at call time (tests stand in a fake trainer)

    opts = options or RetrainOptions()
    if opts.margin < 0:
        raise DataError(f"margin must be >= 0 accuracy points, got {opts.margin}")
    t0 = time.perf_counter()
    ctx = init_distributed(config.device)
    lock: TrainingLock | None = None
    try:
        verdict: Any = None
        if ctx.main:
            lock, verdict = _take_lock(database, opts)
        verdict = broadcast_object(verdict, ctx)
        if "locked" in verdict:
            raise TrainingLocked(verdict["locked"])
        version, out = verdict["version"], Path(verdict["out"])
        data = _database_training_set(database, opts)
        if ctx.main and out.exists():
            raise ModelError(f"{out} already exists")
        if opts.warm_start and not config.init_from:
            config = warm_start_config(database, config)
        trained = train(config, data.train, out, progress=progress)
        if not ctx.main:
            return None
        if not opts.keep_checkpoint:
            shutil.rmtree(out / "checkpoint", ignore_errors=True)
        info = {**data.summary(), "steps_done": trained.steps_done, "selection_accuracy": trained.best_val_accuracy,
                "train_seconds": round(trained.seconds, 1), "warm_start_from": config.init_from}
        _write_identity(out, opts.name, version, info)
        return _register_and_decide(database, opts, data, info, version, out, str(resolve_device(config.device)), t0)
    finally:
        if lock is not None:
            lock.release()
        shutdown(ctx)


def _take_lock(database: Database, opts: RetrainOptions) -> tuple[TrainingLock | None, dict[str, str]]:
    """Rank 0's verdict for every rank: the lock, this run's version and output folder, or why it is locked."""
    try:
        lock = TrainingLock(opts.lock_path or default_lock_path(database, Path(opts.models_dir)), database).acquire()
    except TrainingLocked as exc:
        return None, {"locked": str(exc)}
    version = utcnow().strftime("%Y%m%dT%H%M%SZ")
    return lock, {"version": version, "out": str(Path(opts.models_dir) / f"{opts.name}-{version}")}


def _database_training_set(database: Database, opts: RetrainOptions) -> TrainingSet:
    """The training set, refused when it cannot train: nothing labelled, or a class missing (every step
    needs one image of each class)."""
    # nightly retraining trains (and promotes) the G-band model: Q-band crops would teach it the wrong stain
    data = build_training_set(database, val_fraction=opts.val_fraction, salt=opts.salt, signed_only=opts.signed_only,
                              polarity="dark_on_light")
    if not data.train:
        raise DataError("no labelled chromosomes to train on" + (" in signed-off cases" if opts.signed_only else ""),
                        hint="Import labels (labels.csv) or review cases (`chromobatch review --accept`).")
    present = {r.label for r in data.train}
    missing = [c for k, c in enumerate(CLASSES) if k not in present]
    if missing:
        raise DataError(f"the training patients have no labelled chromosome of class(es) {', '.join(missing)}",
                        hint="Every class is needed in every training step: review more cases.")
    return data


def _register_and_decide(database: Database, opts: RetrainOptions, data: TrainingSet, info: dict[str, Any],
                         version: str, out: Path, device: str, t0: float) -> RetrainResult:
    """Register the trained folder as a candidate, measure it and the active model on the validation
    patients, and promote it or keep it, with the reason and the measurements in its registry row."""
    row = register_model(database, load_model(out, device="cpu"), status=ModelStatus.CANDIDATE, name=opts.name)
    auto_active = row.status == ModelStatus.ACTIVE
    cand_metrics = _evaluate(out, data.val, device) if data.val else None
    active_metrics, active_error, active_file = _evaluate_active(database, row.id, data, device)
    if auto_active or active_file is None:
        promote_it, reason = True, "first model of the registry" + (
            f" (validation accuracy {cand_metrics['accuracy']:.4f})" if cand_metrics else "")
    else:
        promote_it, reason = decide(cand_metrics, active_metrics, opts.margin, active_error, data.n_val_patients)
        if promote_it and not opts.promote:
            promote_it, reason = False, "registered only (--no-promote); would have been " + reason
    with database.session() as s:
        fresh = s.get(ModelVersion, row.id)
        assert fresh is not None
        metrics = dict(fresh.metrics or {})
        metrics.update(val=cand_metrics or {}, active_val=active_metrics, data=info)
        fresh.metrics = metrics
        note_event(fresh, "registered", None, utcnow())
        if promote_it:
            activate(s, fresh, reason)
        else:
            fresh.status, fresh.reason = ModelStatus.CANDIDATE, reason
            note_event(fresh, "kept", reason, utcnow())
        status = fresh.status
    log.info("model %s %s (id %d): %s", opts.name, version, row.id, reason)
    return RetrainResult(version_id=row.id, name=opts.name, version=version, status=status,
                         promoted=status == ModelStatus.ACTIVE, reason=reason, model_dir=out,
                         candidate_metrics=cand_metrics or {}, active_metrics=active_metrics,
                         data=info, seconds=time.perf_counter() - t0)


def _evaluate_active(database: Database, candidate_id: int, data: TrainingSet,
                     device: str) -> tuple[dict[str, Any] | None, str | None, str | None]:
    """(metrics, error, folder) of the active model other than the candidate on the validation patients;
    an active model that cannot be evaluated gives its error instead (the candidate is then kept)."""
    with database.session() as s:
        active = active_model(s, exclude_id=candidate_id)
        active_file = active.file if active is not None else None
        active_id = active.id if active is not None else None
    if active_file is None or not data.val:
        return None, None, active_file
    try:
        return {**_evaluate(active_file, data.val, device), "model_version_id": active_id}, None, active_file
    except ChromobatchError as exc:
        log.error("active model (id %s) could not be evaluated: %s", active_id, exc)
        return None, str(exc), active_file

