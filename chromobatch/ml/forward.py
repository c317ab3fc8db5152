"""The one batched forward pass: uint8 canvases in, softmax probabilities and embeddings out.

Why one: serving (`ml.predict.Predictor`), a loaded model folder (`ml.folders.LoadedModel.predict`, used by
evaluation and calibration) and the training loop's validation all classify batches of preprocessed
crops. They must agree on the conversion (`preprocess.to_tensor`), the memory layout and the precision,
or a model would validate differently from how it serves.

What runs the network is an *engine*: `TorchEngine` here (PyTorch, fp32, or bf16 autocast: on a GPU by
default, on the CPU when asked), or another runtime's compiled form of the same weights (`ml.onnxrt`,
`ml.openvino_rt`), chosen by `ml.runtime`. Every engine takes the same float batch and returns
(embeddings, logits); the softmax and the loop stay here, so every runtime is fed and read the same way.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Protocol, runtime_checkable

import torch

from chromobatch.ml.factory import ChromosomeNet
from chromobatch.ml.preprocess import to_tensor

log = logging.getLogger(__name__)

#: Precisions an engine may compute in (`auto` is resolved by `ml.runtime` before an engine is built).
PRECISIONS = ("fp32", "bf16")


@runtime_checkable
class Engine(Protocol):
    """A network ready to run in one runtime and precision: float (B, 1, S, S) -> (embeddings, logits)."""

    runtime: str
    precision: str
    device: torch.device

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...


class TorchEngine:
    """PyTorch eager, channels_last: bf16 autocast on a GPU (the default there), fp32 or bf16 on the CPU.

    In bf16 only the backbone runs in bf16; the head (`embed`, `classifier`: two small linear layers, under 1% of
    the work) stays fp32. Why: bf16 keeps 8 bits of mantissa, so logits rounded to bf16 tie or swap where two
    classes are close. On the g612 validation split the whole network in bf16 changed the top class of 4 of
    4,091 crops, with the head in fp32 none, at the same speed (docs/results.md).
    """

    runtime = "torch"

    def __init__(self, net: ChromosomeNet, device: torch.device, precision: str | None = None, *,
                 fold_batchnorm: bool = False) -> None:
        self.net, self.device = net, torch.device(device)
        self.precision = precision or ("bf16" if self.device.type == "cuda" else "fp32")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        #: what runs up to the pooled features: the backbone, or for serving a copy with each BatchNorm folded
        #: into its convolution
        self.pooled: torch.nn.Module = _folded(net) if fold_batchnorm else _Pooled(net)

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = x.to(self.device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        if self.precision == "bf16":
            with torch.autocast(self.device.type, dtype=torch.bfloat16):
                pooled = self.pooled(x)
            pooled = pooled.float()
        else:
            pooled = self.pooled(x)
        emb = self.net.embed(pooled)
        return emb, self.net.classifier(emb)

    def __repr__(self) -> str:
        return f"TorchEngine({self.device}, {self.precision})"


class _Pooled(torch.nn.Module):
    """The network up to its pooled features (what `ChromosomeNet.embed` takes), sharing the net's modules."""

    def __init__(self, net: ChromosomeNet) -> None:
        super().__init__()
        self.backbone = net.backbone

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone.forward_head(self.backbone.forward_features(x), pre_logits=True)  # type: ignore[operator]


def _folded(net: ChromosomeNet) -> torch.nn.Module:
    """An eval-mode copy of the backbone up to the pooled features with BatchNorm folded into the convolution
    before it (torch.fx), for serving: eager PyTorch runs BatchNorm as a pass of its own (13% of a resnet18
    forward on the CPU; folded, fp32 146 -> 156 and bf16 265 -> 290 images/s on AMD EPYC Zen 4, logits within
    6e-6). ONNX Runtime and OpenVINO fold it themselves. A network torch.fx cannot trace is served as it is."""
    import copy

    from torch.fx.experimental.optimization import fuse

    try:
        folded = fuse(copy.deepcopy(_Pooled(net)).eval())
    except Exception as exc:  # noqa: BLE001 - any tracing failure: serve the network unfolded
        log.info("BatchNorm not folded (%s: %s); serving the network as it is", type(exc).__name__, exc)
        return _Pooled(net)
    return folded.to(memory_format=torch.channels_last)


def as_engine(net: ChromosomeNet | Engine, device: torch.device) -> Engine:
    """A bare network runs as PyTorch at its device's default precision (what training validates with)."""
    return net if isinstance(net, Engine) else TorchEngine(net, device)


@torch.inference_mode()
def forward_batch(net: ChromosomeNet | Engine, x: torch.Tensor, device: torch.device
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, 1, S, S) float batch -> (softmax probs [B, 24], embeddings [B, D]) in fp32."""
    emb, logits = as_engine(net, device)(x)
    return torch.softmax(logits.float(), dim=-1), emb.float()


@torch.inference_mode()
def forward_canvases(
    net: ChromosomeNet | Engine, batches: Iterable[torch.Tensor], device: torch.device, *, embeddings: bool = True
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Batches of uint8 canvases (B, S, S) -> (probs [N, 24], embeddings [N, D] or None) on the CPU.

    The canvases travel to the device as bytes (4x less than float) and become floats there. A bare network
    runs in eval mode and gets its previous mode back (validation runs mid-training). `embeddings=False`
    skips keeping them (serving a large case needs only the probabilities). At least one batch is required.
    """
    engine = as_engine(net, device)
    plain = engine.net if isinstance(engine, TorchEngine) else None
    was_training = plain.training if plain is not None else False
    if plain is not None:
        plain.eval()
    probs: list[torch.Tensor] = []
    embs: list[torch.Tensor] = []
    try:
        for batch in batches:
            x = to_tensor(batch.to(engine.device, non_blocking=True)).unsqueeze(1)
            p, e = forward_batch(engine, x, engine.device)
            probs.append(p.cpu())
            if embeddings:
                embs.append(e.cpu())
    finally:
        if plain is not None:
            plain.train(was_training)
    return torch.cat(probs), torch.cat(embs) if embeddings else None
