"""The one batched forward pass: uint8 canvases in, softmax probabilities and embeddings out.

Why one: serving (`ml.predict.Predictor`), a loaded model folder (`ml.folders.LoadedModel.predict`, used by
evaluation and calibration) and the training loop's validation all classify batches of preprocessed
crops. They must agree on the conversion (`preprocess.to_tensor`), the memory layout and the precision
(bf16 autocast and channels_last on a GPU, fp32 on the CPU), or a model would validate differently from
how it serves.
"""

from __future__ import annotations

from collections.abc import Iterable
from contextlib import nullcontext

import torch

from chromobatch.ml.factory import ChromosomeNet
from chromobatch.ml.preprocess import to_tensor


@torch.inference_mode()
def forward_batch(net: ChromosomeNet, x: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, 1, S, S) float batch -> (softmax probs [B, 24], embeddings [B, D]) in fp32 on `device`."""
    x = x.to(device, non_blocking=True)
    cuda = device.type == "cuda"
    if cuda:
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.autocast("cuda", dtype=torch.bfloat16) if cuda else nullcontext():
        emb, logits = net(x)
    return torch.softmax(logits.float(), dim=-1), emb.float()


@torch.inference_mode()
def forward_canvases(
    net: ChromosomeNet, batches: Iterable[torch.Tensor], device: torch.device, *, embeddings: bool = True
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Batches of uint8 canvases (B, S, S) -> (probs [N, 24], embeddings [N, D] or None) on the CPU.

    The canvases travel to the device as bytes (4x less than float) and become floats there. The network
    runs in eval mode and gets its previous mode back (validation runs mid-training). `embeddings=False`
    skips keeping them (serving a large case needs only the probabilities). At least one batch is required.
    """
    was_training = net.training
    net.eval()
    probs: list[torch.Tensor] = []
    embs: list[torch.Tensor] = []
    try:
        for batch in batches:
            x = to_tensor(batch.to(device, non_blocking=True)).unsqueeze(1)
            p, e = forward_batch(net, x, device)
            probs.append(p.cpu())
            if embeddings:
                embs.append(e.cpu())
    finally:
        net.train(was_training)
    return torch.cat(probs), torch.cat(embs) if embeddings else None
