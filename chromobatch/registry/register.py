"""Model versions in the database: register a loaded model, and choose the one a command uses.

Why here: which model serves new cases is a registry decision (an explicit --model, else the database's
active model, else the model shipped in models/default), not something the forward pass should know.
"""

from __future__ import annotations

import logging
from pathlib import Path

from sqlalchemy.exc import IntegrityError

from chromobatch.config import Settings
from chromobatch.errors import ModelError
from chromobatch.ml.device import resolve_device
from chromobatch.ml.folders import LoadedModel, load_model
from chromobatch.ml.predict import Predictor
from chromobatch.store.db import Database, ModelVersion, active_model, utcnow
from chromobatch.store.states import ModelStatus

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_MODEL_DIR = REPO_ROOT / "models" / "default"


def register_model(database: Database, model: LoadedModel, *, status: str = ModelStatus.CANDIDATE,
                   name: str | None = None) -> ModelVersion:
    """Find the model version with these weights, or add it (the first model of a database becomes active)."""
    try:
        return _register(database, model, status, name)
    except IntegrityError:  # another worker registered the same weights at the same moment
        with database.session() as s:
            row = s.query(ModelVersion).filter_by(sha256=model.sha256).order_by(ModelVersion.id).first()
            if row is None:
                raise
            return row


def _register(database: Database, model: LoadedModel, status: str, name: str | None) -> ModelVersion:
    with database.session() as s:
        row = s.query(ModelVersion).filter_by(sha256=model.sha256).order_by(ModelVersion.id).first()
        if row is not None:
            return row
        has_active = s.query(ModelVersion).filter_by(status=ModelStatus.ACTIVE).first() is not None
        meta = model.meta
        name = name or str(meta.get("name") or model.folder.name)
        version = str(meta.get("version") or model.sha256[:12])
        if s.query(ModelVersion).filter_by(name=name, version=version).first() is not None:
            # same name and version, other weights or size prior (say `chromobatch calibrate` was run on the
            # folder): still another model, told apart by its identity
            log.warning("model %s %s is registered with another checksum; registering this one as %s+%s",
                        name, version, version, model.sha256[:8])
            version = f"{version}+{model.sha256[:8]}"
        row = ModelVersion(
            name=name, version=version,
            backbone=str(meta["backbone"]), file=str(model.folder.resolve()), sha256=model.sha256,
            metrics=dict(meta.get("metrics") or {}),
            status=ModelStatus.ACTIVE if (status == ModelStatus.ACTIVE or not has_active) else status)
        if row.status == ModelStatus.ACTIVE:
            row.promoted_at = utcnow()
        s.add(row)
        s.flush()
        return row


def load_predictor(database: Database, settings: Settings, model_path: str | Path | None = None) -> Predictor:
    """The model to use: --model, else settings.model, else the database's active one, else the shipped default."""
    device = resolve_device(settings.device)
    explicit = model_path or settings.model or None
    if explicit is None:
        with database.session() as s:
            active = active_model(s)
            folder = Path(active.file) if active is not None else None
        if folder is None:
            if not (DEFAULT_MODEL_DIR / "model.json").is_file():
                raise ModelError(f"no active model in the database and no shipped default at {DEFAULT_MODEL_DIR}")
            folder = DEFAULT_MODEL_DIR
    else:
        folder = Path(explicit)
    model = load_model(folder, device=device)
    version = register_model(database, model)
    log.info("using model %s %s (%s) on %s", version.name, version.version, version.sha256[:12], device)
    return Predictor(model, version, batch_size=settings.batch_size, loader_workers=settings.loader_workers,
                     pinned=explicit is not None)
