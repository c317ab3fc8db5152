"""Batched inference: a loaded model registered in the database, fed by a DataLoader.

Decoding and preprocessing run in DataLoader workers (configurable), the forward pass in batches across
all cells of a case through `ml.forward` (the pass evaluation and training validate with); on a GPU with
bf16 autocast and channels_last, on the CPU in fp32.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from chromobatch.errors import ModelError
from chromobatch.ml.folders import LoadedModel, load_model
from chromobatch.ml.forward import forward_canvases
from chromobatch.ml.preprocess import render
from chromobatch.store.db import Database, ModelVersion, active_model
from chromobatch.store.states import Stain

log = logging.getLogger(__name__)


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
        #: True when the model was named explicitly: never swapped for the database's active model, and it reads
        #: every case whatever its stain.
        self.pinned = pinned
        #: The stain this model serves (its registry row's, else its model.json's; none: G-band).
        self.stain = Stain.of((version.metrics or {}).get("stain") or model.meta.get("stain"))
        #: Set by the registry (`registry.register.load_predictor`): the predictor for another stain, or None
        #: when none is registered or shipped for it. Unset: this model reads every case.
        self.route: Callable[[Stain], Predictor | None] | None = None

    def for_polarity(self, polarity: str | None) -> Predictor:
        """The predictor for a case whose crops have this polarity (the scan's majority): the model that
        serves its stain when the registry has one, else this one (logged). Why here and not in the pipeline:
        the pipeline asks one question per case and stays the same when stains or models are added."""
        stain = Stain.from_polarity(polarity)
        if self.pinned or stain is None or stain == self.stain or self.route is None:
            return self
        other = self.route(stain)
        if other is None:
            log.warning("no %s model registered or shipped: a %s case is read by %s (a %s model)", stain.band,
                        stain.band, self.version_name, self.stain.band)
            return self
        return other

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
        probs, _ = forward_canvases(self.model.net, loader, self.model.device, embeddings=False)
        return self.model.apply_size_prior(probs.numpy().astype(np.float32), rel_inks)

    def maybe_reload(self, database: Database) -> bool:
        """Swap to the database's active model if it changed (called by the watcher between cases)."""
        if self.pinned:
            return False
        with database.session() as s:
            active = active_model(s, stain=self.stain)
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
