"""Model versions in the database: register a loaded model, and choose the one a command uses.

Why here: which model serves new cases is a registry decision (an explicit --model, else the database's
active model, else the model shipped in models/default), not something the forward pass should know.

One active model per stain: a model serves the stain its model.json names ("stain": "G" or "Q"; none: G),
recorded at registration in ModelVersion.metrics["stain"]. A case is read by the model of the stain its
crops show (the scan's polarity: dark on light G-band, bright on dark Q-band): the database's active model
of that stain, else the one shipped for it (models/default for G-band, models/qband for Q-band). An explicit
--model reads every case.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from sqlalchemy.exc import IntegrityError

from chromobatch.config import Settings
from chromobatch.errors import ModelError
from chromobatch.ml.device import resolve_device
from chromobatch.ml.folders import LoadedModel, load_model
from chromobatch.ml.predict import Predictor
from chromobatch.ml.runtime import choose_engine
from chromobatch.store.db import Database, ModelVersion, active_model, model_stain, utcnow
from chromobatch.store.states import ModelStatus, Stain

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_MODEL_DIR = REPO_ROOT / "models" / "default"
QBAND_MODEL_DIR = REPO_ROOT / "models" / "qband"
#: The model shipped for each stain, used when the database has no active model of that stain.
SHIPPED: dict[Stain, Path] = {Stain.G: DEFAULT_MODEL_DIR, Stain.Q: QBAND_MODEL_DIR}


def register_model(database: Database, model: LoadedModel, *, status: str = ModelStatus.CANDIDATE,
                   name: str | None = None) -> ModelVersion:
    """Find the model version with these weights, or add it (the first model of a stain becomes its active one)."""
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
        meta = model.meta
        stain = Stain.of(meta.get("stain"))
        has_active = active_model(s, stain=stain) is not None
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
            metrics={**dict(meta.get("metrics") or {}), "stain": stain.value},
            status=ModelStatus.ACTIVE if (status == ModelStatus.ACTIVE or not has_active) else status)
        if row.status == ModelStatus.ACTIVE:
            row.promoted_at = utcnow()
        s.add(row)
        s.flush()
        return row


def load_predictor(database: Database, settings: Settings, model_path: str | Path | None = None) -> Predictor:
    """The model to use: --model, else settings.model, else the database's active one, else the shipped default.

    Without an explicit model the predictor reads G-band cases and routes a case of another stain to that
    stain's model (`Predictor.for_polarity`), loaded when such a case first comes."""
    device = resolve_device(settings.device)
    explicit = model_path or settings.model or None
    if explicit is None:
        with database.session() as s:
            active = active_model(s, stain=Stain.G)
            folder = Path(active.file) if active is not None else None
        if folder is None:
            if not (DEFAULT_MODEL_DIR / "model.json").is_file():
                raise ModelError(f"no active model in the database and no shipped default at {DEFAULT_MODEL_DIR}")
            folder = DEFAULT_MODEL_DIR
    else:
        folder = Path(explicit)
    predictor = _predictor(database, settings, load_model(folder, device=device), pinned=explicit is not None)
    if explicit is None:
        predictor.route = StainRoutes(database, settings, device, primary=predictor)
    return predictor


def _predictor(database: Database, settings: Settings, model: LoadedModel, *, pinned: bool) -> Predictor:
    version = register_model(database, model)
    log.info("using model %s %s (%s, %s) on %s", version.name, version.version, version.sha256[:12],
             model_stain(version).band, model.device)
    model.engine = choose_engine(model, settings.runtime, settings.precision, settings.cache_dir, settings.batch_size)
    return Predictor(model, version, batch_size=settings.batch_size, loader_workers=settings.loader_workers,
                     pinned=pinned, runtime=settings.runtime, precision=settings.precision,
                     cache_dir=settings.cache_dir, render_processes=settings.render_processes,
                     workers=settings.workers)


class StainRoutes:
    """The predictors of the stains other than the primary predictor's: for each, the database's active model
    of that stain, else the one shipped for it; loaded when a case of that stain first comes, then kept and
    swapped when the registry's active model of that stain changes (one query per such case)."""

    def __init__(self, database: Database, settings: Settings, device: torch.device, *, primary: Predictor) -> None:
        self.database, self.settings, self.device, self.primary = database, settings, device, primary
        self.loaded: dict[Stain, Predictor] = {}

    def __call__(self, stain: Stain) -> Predictor | None:
        if stain == self.primary.stain:
            return self.primary
        with self.database.session() as s:
            active = active_model(s, stain=stain)
            folder = Path(active.file) if active is not None else None
            active_id = active.id if active is not None else None
        current = self.loaded.get(stain)
        if current is not None and (active_id is None or current.version_id == active_id):
            return current
        if folder is None:
            shipped = SHIPPED.get(stain)
            if shipped is None or not (shipped / "model.json").is_file():
                return None
            folder = shipped
        model = load_model(folder, device=self.device)
        if Stain.of(model.meta.get("stain")) != stain:
            raise ModelError(f"{folder}: the model serves {Stain.of(model.meta.get('stain')).band}, not "
                             f"{stain.band} (model.json 'stain')")
        self.loaded[stain] = _predictor(self.database, self.settings, model, pinned=False)
        return self.loaded[stain]
