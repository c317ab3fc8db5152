"""The classifier: any timm backbone -> embedding E (for the contrastive loss) -> 24 class logits.

Model-agnostic as in the paper: the backbone only has to yield pooled features. The learnable temperature
(`logit_scale`, CLIP-style) lives here so it is saved and loaded with the weights.
"""

from __future__ import annotations

import logging
import math

import timm
import torch
from torch import nn

from chromobatch import NUM_CLASSES
from chromobatch.errors import ModelError

log = logging.getLogger(__name__)

#: t = exp(logit_scale) starts at 1/0.07 (CLIP) and is clamped to at most this.
MAX_TEMPERATURE = 100.0
INIT_LOGIT_SCALE = math.log(1 / 0.07)


class ChromosomeNet(nn.Module):
    """backbone (pooled features) -> Linear to D = embedding E -> Linear to 24 logits.

    forward returns (embeddings, logits). `forward_features` / `forward_head` split the network at the last
    feature map so Grad-CAM can hook it.
    """

    def __init__(self, backbone: nn.Module, embed_dim: int, num_classes: int = NUM_CLASSES) -> None:
        super().__init__()
        self.backbone = backbone
        # timm's pooled pre-logits width: head_hidden_size where a head conv widens it (MobileNetV3).
        width = getattr(backbone, "head_hidden_size", None) or backbone.num_features
        self.embed = nn.Linear(int(width), embed_dim)  # type: ignore[arg-type]  # timm: an int
        self.classifier = nn.Linear(embed_dim, num_classes)
        self.logit_scale = nn.Parameter(torch.tensor(INIT_LOGIT_SCALE))

    def temperature(self) -> torch.Tensor:
        """t = exp(logit_scale), clamped to <= 100 so the similarity logits cannot blow up."""
        return self.logit_scale.exp().clamp(max=MAX_TEMPERATURE)

    @torch.no_grad()
    def clamp_logit_scale(self) -> None:
        """Keep the parameter itself inside the clamp (after each optimiser step) so it never gets stuck."""
        self.logit_scale.clamp_(max=math.log(MAX_TEMPERATURE))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone.forward_features(x)  # type: ignore[operator]  # a timm model's method

    def forward_head(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pooled = self.backbone.forward_head(features, pre_logits=True)  # type: ignore[operator]
        emb = self.embed(pooled)
        return emb, self.classifier(emb)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.forward_head(self.forward_features(x))


def create_model(
    backbone: str,
    embed_dim: int = 1024,
    num_classes: int = NUM_CLASSES,
    in_chans: int = 1,
    input_size: int = 96,
) -> ChromosomeNet:
    """Build a randomly initialised ChromosomeNet (never downloads weights: pretrained=False)."""
    if backbone not in timm.list_models():
        raise ModelError(f"unknown timm backbone {backbone!r}", hint="See timm.list_models() for valid names.")
    kwargs: dict = {"pretrained": False, "num_classes": 0, "in_chans": in_chans}
    try:  # ViT/Swin/DaViT-style models take img_size; CNNs reject the keyword with a TypeError
        net = timm.create_model(backbone, img_size=input_size, **kwargs)
    except TypeError:
        net = timm.create_model(backbone, **kwargs)
    return ChromosomeNet(net, embed_dim, num_classes)
