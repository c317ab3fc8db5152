"""Batched inference: a loaded model registered in the database, fed by a DataLoader.

Decoding and preprocessing run in DataLoader workers (configurable), the forward pass in batches across
all cells of a case; on a GPU with bf16 autocast and channels_last, on the CPU in fp32.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from sqlalchemy.exc import IntegrityError
from torch.utils.data import DataLoader, Dataset

from .config import Settings
from .db import Database, ModelVersion, active_model, utcnow
from .errors import ModelError
from .modelio import LoadedModel, load_model
from .preprocess import render

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MODEL_DIR = REPO_ROOT / "models" / "default"


def pick_device(setting: str) -> str:
    if setting == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if setting.startswith("cuda") and not torch.cuda.is_available():
        raise ModelError(f"device {setting!r} requested but no CUDA device is available", hint="Use --device cpu.")
    return setting


class _Canvases(Dataset):
    """Renders preprocessed canvases in loader workers (uint8, converted to float in the batch)."""

    def __init__(self, crops: Sequence[np.ndarray], medians: Sequence[float | None], model: LoadedModel) -> None:
        self.crops, self.medians, self.spec = crops, medians, model.spec

    def __len__(self) -> int:
        return len(self.crops)

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.from_numpy(render(self.crops[i], self.spec, self.medians[i]))


class Predictor:
    """A model version ready to classify crops; knows its database row."""

    def __init__(self, model: LoadedModel, version: ModelVersion, *, batch_size: int = 64,
                 loader_workers: int = 0, pinned: bool = False) -> None:
        self.model = model
        self.version_id = version.id
        self.version_name = f"{version.name} {version.version}"
        self.sha256 = version.sha256
        self.batch_size = batch_size
        self.loader_workers = loader_workers
        #: True when the model was named explicitly: never swapped for the database's active model.
        self.pinned = pinned

    def predict(self, crops: Sequence[np.ndarray], medians: Sequence[float | None] | None = None,
                rel_inks: Sequence[float] | None = None) -> np.ndarray:
        """Normalised crops -> softmax probabilities [N, 24] (float32).

        medians: per crop its cell's median length (cell-mode preprocessing); rel_inks: its log ink relative
        to its cell (`sizeprior.relative_inks`, for the model's size prior). None: unknown.
        """
        n = len(crops)
        if n == 0:
            return np.zeros((0, 24), dtype=np.float32)
        meds = list(medians) if medians is not None else [None] * n
        loader = DataLoader(_Canvases(crops, meds, self.model), batch_size=self.batch_size, shuffle=False,
                            num_workers=self.loader_workers, pin_memory=self.model.device.type == "cuda")
        out = []
        for batch in loader:
            x = batch.unsqueeze(1).float().div_(255.0)
            probs, _ = self.model.predict_tensor(x)
            out.append(probs.cpu().numpy())
        return self.model.apply_size_prior(np.concatenate(out).astype(np.float32), rel_inks)

    def maybe_reload(self, database: Database) -> bool:
        """Swap to the database's active model if it changed (called by the watcher between cases)."""
        if self.pinned:
            return False
        with database.session() as s:
            active = active_model(s)
            if active is None or active.id == self.version_id:
                return False
        # loaded outside the transaction: on SQLite a session holds the write lock every worker needs
        model = load_model(active.file, device=self.model.device)
        if model.sha256 != active.sha256:
            raise ModelError(f"{active.file}: weights checksum differs from the registered model version")
        log.info("switching to model %s %s", active.name, active.version)
        self.model, self.version_id, self.sha256 = model, active.id, active.sha256
        self.version_name = f"{active.name} {active.version}"
        return True


def register_model(database: Database, model: LoadedModel, *, status: str = "candidate",
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
        has_active = s.query(ModelVersion).filter_by(status="active").first() is not None
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
            status="active" if (status == "active" or not has_active) else status)
        if row.status == "active":
            row.promoted_at = utcnow()
        s.add(row)
        s.flush()
        return row


def load_predictor(database: Database, settings: Settings, model_path: str | Path | None = None) -> Predictor:
    """The model to use: --model, else settings.model, else the database's active one, else the shipped default."""
    device = pick_device(settings.device)
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
