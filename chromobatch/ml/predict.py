"""Batched inference: a loaded model registered in the database, classifying a case's crops in batches.

A case's canvases are rendered first (across a pool of processes in a watcher, `ml.renderpool`), then the
forward pass runs in batches across all cells of a case through `ml.forward` (the pass evaluation and
training validate with), in the runtime and precision `ml.runtime.choose_engine` picked for the model
(settings runtime, precision, cache_dir). With `loader_workers` > 0 a DataLoader's workers render beside the
forward pass instead (a setting, not measured this way; rendering beside the forward pass in a thread was
slower than rendering first on 2 CPU cores, docs/benchmarks.md).

Across cases (the watcher, settings.batch_cases): `prime` runs one forward pass over the crops of several
waiting cases and keeps each crop's probabilities; each case's own `predict` call (inside its own pipeline
run and transaction) then takes them instead of running the network again. A crop is found by its bytes
and, for cell-mode models, its cell's median length, the two inputs of its canvas, so a primed result is
only ever used for exactly the input it was computed from; anything not found is predicted as usual.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Iterable, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from chromobatch.errors import ModelError
from chromobatch.ml.folders import LoadedModel, load_model
from chromobatch.ml.forward import as_engine, forward_canvases
from chromobatch.ml.preprocess import render
from chromobatch.ml.renderpool import RenderPool, auto_processes
from chromobatch.ml.runtime import CELL_BATCH, calibration_canvases, choose_engine
from chromobatch.store.db import Database, ModelVersion, active_model
from chromobatch.store.states import Stain

log = logging.getLogger(__name__)


def even_batch(n: int, batch_size: int) -> int:
    """The batch size that splits n crops into as few batches as batch_size allows, all of about one size.

    Why: a case of 139 crops in batches of 64 ends with a batch of 11, and a small batch runs the network at
    well under its rate (PyTorch bf16 on AMD EPYC Zen 4: 243-270 images/s at 11 against 320-340 at 46-64);
    three batches of 47, 46, 46 do not."""
    if n <= 0:
        return max(1, batch_size)
    batches = -(-n // max(1, batch_size))
    return -(-n // batches)


class _Canvases(Dataset):
    """Renders preprocessed canvases in loader workers (uint8, converted to float in the batch)."""

    def __init__(self, crops: Sequence[np.ndarray], medians: Sequence[float | None], model: LoadedModel) -> None:
        self.crops, self.medians, self.spec = crops, medians, model.spec

    def __len__(self) -> int:
        return len(self.crops)

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.from_numpy(render(self.crops[i], self.spec, self.medians[i]))


class _Counted:
    """The model's engine, counting forward passes on the predictor (how tests see one pass for many cases)."""

    def __init__(self, predictor: Predictor) -> None:
        self.predictor = predictor
        self.inner = as_engine(predictor.model.runner, predictor.model.device)
        self.runtime, self.precision, self.device = self.inner.runtime, self.inner.precision, self.inner.device

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.predictor.forward_calls += 1
        return self.inner(x)


class Predictor:
    """A model version ready to classify crops; knows its database row."""

    def __init__(self, model: LoadedModel, version: ModelVersion, *, batch_size: int = 64,
                 loader_workers: int = 0, pinned: bool = False, runtime: str = "auto", precision: str = "auto",
                 cache_dir: str = "", render_processes: int = 0, workers: int = 1) -> None:
        self.model = model
        self.version_id = version.id
        self.version_name = f"{version.name} {version.version}"
        self.sha256 = version.sha256
        self.batch_size = batch_size
        self.loader_workers = loader_workers
        #: renders canvases across processes once `warm_up` started it (a watcher); in-process until then
        self.renderer = RenderPool(auto_processes(render_processes, workers))
        #: True when the model was named explicitly: never swapped for the database's active model, and it reads
        #: every case whatever its stain.
        self.pinned = pinned
        #: The stain this model serves (its registry row's, else its model.json's; none: G-band).
        self.stain = Stain.of((version.metrics or {}).get("stain") or model.meta.get("stain"))
        #: Set by the registry (`registry.register.load_predictor`): the predictor for another stain, or None
        #: when none is registered or shipped for it. Unset: this model reads every case.
        self.route: Callable[[Stain], Predictor | None] | None = None
        #: how a reloaded model gets its engine (settings runtime, precision, cache_dir)
        self.runtime, self.precision, self.cache_dir = runtime, precision, cache_dir
        self._primed: dict[tuple[bytes, float | None], np.ndarray] = {}
        #: forward passes run (batches of the network), for tests and benchmarks
        self.forward_calls = 0

    def _key(self, crop: np.ndarray, median: float | None) -> tuple[bytes, float | None]:
        digest = hashlib.blake2b(np.ascontiguousarray(crop).tobytes(), digest_size=16,
                                 person=str(crop.shape).encode()[:16]).digest()
        return digest, (median if self.model.spec.mode == "cell" else None)

    def _forward(self, crops: Sequence[np.ndarray], medians: Sequence[float | None]) -> np.ndarray:
        """Image probabilities (before the size prior) of crops, in batches through the model's engine."""
        batches: Iterable[torch.Tensor]
        size = even_batch(len(crops), self.batch_size)
        if self.loader_workers > 0:
            batches = DataLoader(_Canvases(crops, medians, self.model), batch_size=size, shuffle=False,
                                 num_workers=self.loader_workers, pin_memory=self.model.device.type == "cuda")
        else:
            canvases = torch.from_numpy(self.renderer.render(crops, medians, self.model.spec))
            batches = [canvases[i:i + size] for i in range(0, len(crops), size)]
        probs, _ = forward_canvases(_Counted(self), batches, self.model.device, embeddings=False)
        return probs.numpy().astype(np.float32)

    def prime(self, crops: Sequence[np.ndarray], medians: Sequence[float | None] | None = None) -> int:
        """Predict the crops of several cases in one pass, for their `predict` calls to find; how many."""
        if not crops:
            return 0
        meds = list(medians) if medians is not None else [None] * len(crops)
        for c, m, p in zip(crops, meds, self._forward(crops, meds), strict=True):
            self._primed[self._key(c, m)] = p
        return len(crops)

    def warm_up(self) -> None:
        """One pass over a generated batch of a cell's size (CELL_BATCH): a runtime's first call compiles, allocates and
        picks its kernels for the shape, a second or more that a watcher's first case would otherwise wait. And
        the render pool's processes started: a long-lived process (the watcher) renders on every core."""
        self.renderer.start()
        canvases = calibration_canvases(min(self.batch_size, CELL_BATCH), self.model.spec.input_size)
        calls = self.forward_calls
        forward_canvases(_Counted(self), [canvases], self.model.device, embeddings=False)
        self.forward_calls = calls

    def forget_primed(self) -> None:
        """Drop what `prime` kept and no case took (a case that failed before predicting)."""
        self._primed.clear()

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
        probs = np.zeros((n, 24), dtype=np.float32)
        todo = list(range(n))
        if self._primed:
            todo = []
            for i, (c, m) in enumerate(zip(crops, meds, strict=True)):
                hit = self._primed.pop(self._key(c, m), None)
                if hit is None:
                    todo.append(i)
                else:
                    probs[i] = hit
        if todo:
            probs[todo] = self._forward([crops[i] for i in todo], [meds[i] for i in todo])
        return self.model.apply_size_prior(probs, rel_inks)

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
        model.engine = choose_engine(model, self.runtime, self.precision, self.cache_dir, self.batch_size)
        self._primed.clear()
        log.info("switching to model %s %s", active.name, active.version)
        self.model, self.version_id, self.sha256 = model, active.id, active.sha256
        self.version_name = f"{active.name} {active.version}"
        return True
