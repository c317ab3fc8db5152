"""Model folders: model.safetensors (weights, no pickle) + model.json (everything needed to rebuild and trust it).

model.json holds the backbone, embedding size, preprocessing spec, class names, temperature, training
config, data fingerprint, metrics and the chromobatch version. `load_model` rebuilds the network from it,
checks every tensor's name and shape, and names the file in every error.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file

import chromobatch
from chromobatch import CLASSES, NUM_CLASSES
from chromobatch.errors import ModelError
from chromobatch.files import atomic_write, load_weights, read_json_meta, sha256_file
from chromobatch.ml.factory import ChromosomeNet, create_model
from chromobatch.ml.forward import Engine, forward_batch, forward_canvases
from chromobatch.ml.preprocess import PreprocessSpec, render, to_tensor
from chromobatch.ml.sizeprior import SizePrior

log = logging.getLogger(__name__)

WEIGHTS = "model.safetensors"
META = "model.json"
FORMAT = "chromobatch-model"
FORMAT_VERSION = 1


def save_model(net: ChromosomeNet, meta: dict[str, Any], folder: str | Path, *, half: bool = False) -> Path:
    """Write `folder`/model.safetensors + model.json. `half` stores float weights as fp16 (loaded back as fp32).

    meta must hold at least backbone, embed_dim and preprocess (a PreprocessSpec dict); classes, temperature,
    software version and format are filled in here.
    """
    for key in ("backbone", "embed_dim", "preprocess"):
        if key not in meta:
            raise ModelError(f"save_model: meta lacks {key!r}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    net = getattr(net, "module", net)  # unwrap DistributedDataParallel
    state = {}
    for k, v in net.state_dict().items():
        t = v.detach().to("cpu").contiguous()
        if half and t.is_floating_point() and k != "logit_scale":
            t = t.half()
        state[k] = t
    full = dict(meta)
    full.update(
        {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "chromobatch_version": chromobatch.__version__,
            "classes": list(CLASSES),
            "num_classes": NUM_CLASSES,
            "in_chans": 1,
            "input_size": int(meta["preprocess"]["input_size"]),
            "temperature": float(net.temperature().detach()),
            "weights_dtype": "float16" if half else "float32",
        }
    )
    atomic_write(folder / WEIGHTS, lambda p: save_file(state, str(p), metadata={"format": FORMAT}))
    _write_meta(folder, full)
    return folder


def _write_meta(folder: Path, meta: dict[str, Any]) -> None:
    """model.json in the one layout every writer uses (sorted keys, so two folders diff cleanly), atomically:
    a watcher or `register_model` reading it mid-write sees the old or the new file, never half of one."""
    atomic_write(folder / META, json.dumps(meta, indent=2, sort_keys=True) + "\n")


def update_meta(folder: str | Path, change: Callable[[dict[str, Any]], object]) -> dict[str, Any]:
    """Read a model folder's model.json (checked by `read_meta`), let `change` edit it in place, write it back.

    The only way model.json is rewritten after `save_model` (size prior, run statistics, registry identity),
    so every later edit is atomic and keeps the layout. Returns the new content.
    """
    meta = read_meta(folder)
    change(meta)
    _write_meta(Path(folder), meta)
    return meta


def read_meta(folder: str | Path) -> dict[str, Any]:
    """model.json of a model folder, checked enough to rebuild the network."""
    path = Path(folder) / META
    meta = read_json_meta(path, fmt=FORMAT, version=FORMAT_VERSION, what="model")
    for key in ("backbone", "embed_dim", "preprocess", "classes"):
        if key not in meta:
            raise ModelError(f"{path}: lacks {key!r}")
    if list(meta["classes"]) != list(CLASSES):
        raise ModelError(f"{path}: classes {meta['classes']} differ from chromobatch's {list(CLASSES)}")
    return meta


def model_identity(weights_sha256: str, size_prior: SizePrior | None) -> str:
    """What the database registers a model by: the weights' sha256, combined with the size prior when there
    is one (the same weights with another prior classify differently, so they are another model version)."""
    if size_prior is None:
        return weights_sha256
    canon = json.dumps(size_prior.to_dict(), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(f"{weights_sha256}\0{canon}".encode()).hexdigest()


def attach_size_prior(folder: str | Path, prior: SizePrior | None, info: dict[str, Any]) -> None:
    """Write (or, with None, remove) a model folder's size prior; `info` (how it was tuned) goes to metrics."""

    def change(meta: dict[str, Any]) -> None:
        if prior is None:
            meta.pop("size_prior", None)
        else:
            meta["size_prior"] = prior.to_dict()
        meta.setdefault("metrics", {})["size_prior"] = info

    update_meta(folder, change)


@dataclass
class LoadedModel:
    """A model ready for inference: eval-mode `.net`, its `.meta`, `.spec`, optional `.size_prior` and its
    `.sha256` (`model_identity`: the weights' checksum, or weights + size prior). `.engine`: what runs the
    network (`ml.runtime.choose_engine`); None runs `.net` in PyTorch at the device's default precision."""

    net: ChromosomeNet
    meta: dict[str, Any]
    spec: PreprocessSpec
    sha256: str
    folder: Path
    device: torch.device
    size_prior: SizePrior | None = None
    engine: Engine | None = None

    @property
    def runner(self) -> ChromosomeNet | Engine:
        return self.engine if self.engine is not None else self.net

    @property
    def classes(self) -> tuple[str, ...]:
        return CLASSES

    def canvases(self, crops: Sequence[np.ndarray], cell_median_lengths: Sequence[float | None]) -> torch.Tensor:
        """uint8 canvases (B, S, S) of crops, preprocessed by this model's spec."""
        return torch.from_numpy(
            np.stack([render(c, self.spec, m) for c, m in zip(crops, cell_median_lengths, strict=True)]))

    def batch_tensor(self, crops: Sequence[np.ndarray], cell_median_lengths: Sequence[float | None]) -> torch.Tensor:
        return to_tensor(self.canvases(crops, cell_median_lengths)).unsqueeze(1)

    def predict_tensor(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 1, S, S) float batch (from `preprocess`) -> (softmax probs [B, 24], embeddings [B, D]) in fp32."""
        return forward_batch(self.runner, x, self.device)

    def predict(
        self,
        crops: Sequence[np.ndarray],
        cell_median_lengths: Sequence[float | None] | None = None,
        batch_size: int = 64,
        rel_inks: Sequence[float] | np.ndarray | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Normalised crops -> (probs [N, 24], embeddings [N, D]) as numpy float32.

        rel_inks: per crop, its log ink relative to its cell (`sizeprior.relative_inks`, NaN = unknown); with a
        size prior in the model they turn the image probabilities into image + size probabilities.
        """
        n = len(crops)
        meds: Sequence[float | None] = cell_median_lengths if cell_median_lengths is not None else [None] * n
        if len(meds) != n:
            raise ValueError(f"{len(meds)} cell median lengths for {n} crops")
        d = int(self.meta["embed_dim"])
        if n == 0:
            return np.zeros((0, NUM_CLASSES), np.float32), np.zeros((0, d), np.float32)
        probs, embs = forward_canvases(self.runner, self._canvas_batches(crops, meds, batch_size), self.device)
        assert embs is not None
        return self.apply_size_prior(probs.numpy(), rel_inks), embs.numpy()

    def _canvas_batches(self, crops: Sequence[np.ndarray], meds: Sequence[float | None],
                        batch_size: int) -> Iterator[torch.Tensor]:
        """Rendered one batch at a time, so a large set never holds all its canvases at once."""
        for i in range(0, len(crops), batch_size):
            yield self.canvases(crops[i : i + batch_size], meds[i : i + batch_size])

    def apply_size_prior(self, probs: np.ndarray, rel_inks: Sequence[float] | np.ndarray | None) -> np.ndarray:
        """Image probabilities -> with the size evidence (unchanged without a prior or without rel_inks)."""
        if self.size_prior is None or rel_inks is None:
            return probs
        if len(rel_inks) != len(probs):
            raise ValueError(f"{len(rel_inks)} relative inks for {len(probs)} crops")
        return self.size_prior.apply(probs, np.asarray(rel_inks, dtype=np.float64))


def load_model(folder: str | Path, device: str | torch.device = "cpu") -> LoadedModel:
    """Rebuild a saved model (fp16-stored weights come back as fp32); ModelError names the faulty file."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ModelError(f"{folder}: model folder not found")
    meta = read_meta(folder)
    spec = PreprocessSpec.from_dict(meta["preprocess"])
    wpath = folder / WEIGHTS
    state = load_weights(folder, "model")
    net = create_model(
        meta["backbone"],
        embed_dim=int(meta["embed_dim"]),
        num_classes=NUM_CLASSES,
        in_chans=int(meta.get("in_chans", 1)),
        input_size=spec.input_size,
    )
    expected = net.state_dict()
    missing = sorted(set(expected) - set(state))
    extra = sorted(set(state) - set(expected))
    wrong = sorted(k for k in set(expected) & set(state) if tuple(expected[k].shape) != tuple(state[k].shape))
    if missing or extra or wrong:
        details = "; ".join(
            part
            for part in (
                f"missing {missing[:5]}" if missing else "",
                f"unexpected {extra[:5]}" if extra else "",
                f"wrong shape {[(k, tuple(state[k].shape), tuple(expected[k].shape)) for k in wrong[:5]]}"
                if wrong
                else "",
            )
            if part
        )
        raise ModelError(f"{wpath}: weights do not fit backbone {meta['backbone']!r}: {details}")
    net.load_state_dict({k: v.to(expected[k].dtype) for k, v in state.items()})
    dev = torch.device(device)
    net.to(dev).eval()
    # channels_last on the CPU too: oneDNN's convolutions and pooling run it faster (resnet18, 128 px, batch 64,
    # AMD EPYC Zen 4, 2 threads: fp32 118 -> 157 images/s, bf16 autocast 218 -> 283; docs/benchmarks.md)
    net.to(memory_format=torch.channels_last)
    prior = SizePrior.from_dict(meta["size_prior"]) if meta.get("size_prior") else None
    return LoadedModel(net=net, meta=meta, spec=spec, sha256=model_identity(sha256_file(wpath), prior),
                       folder=folder, device=dev, size_prior=prior)
