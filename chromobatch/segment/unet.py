"""A compact U-Net for metaphase segmentation: grey image in, two maps out (foreground, core).

Why hand-written and small rather than a timm encoder: a 768 x 576 metaphase has to be segmented in about
a second on two CPU cores, and chromosomes are only ~8-12 px wide there, so the network must run at full
resolution; a ResNet-18 encoder at that size costs several times the budget. Four levels of two 3x3
convolutions (8-16-32-64 channels) see ~70 px, enough to tell where one chromosome ends and its neighbour
begins, at ~4 GMAC per 768 x 576 image (16-32-64-96 took 1.2 s per image on one shared core: too slow).

Outputs (logits): channel 0 = foreground (any chromosome), channel 1 = core (a chromosome's inside, at least
`CORE_MARGIN` px from the background or another chromosome, and covered by only one). Cores are the seeds
the watershed grows into the foreground (`learned.py`), which is what separates touching chromosomes.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F

OUT_CHANNELS = 2


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
        nn.Conv2d(cout, cout, 3, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class UNet(nn.Module):
    """Encoder of `len(channels)` levels (max-pool between them), decoder with skip connections."""

    def __init__(self, channels: Sequence[int] = (8, 16, 32, 64), in_chans: int = 1,
                 out_chans: int = OUT_CHANNELS) -> None:
        super().__init__()
        chans = list(channels)
        self.channels = chans
        self.down = nn.ModuleList()
        prev = in_chans
        for c in chans:
            self.down.append(_block(prev, c))
            prev = c
        self.up = nn.ModuleList()
        for c in reversed(chans[:-1]):
            self.up.append(_block(prev + c, c))
            prev = c
        self.head = nn.Conv2d(prev, out_chans, 1)

    @property
    def stride(self) -> int:
        """Input sides must be a multiple of this (`pad_to_stride` does it)."""
        return 2 ** (len(self.channels) - 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for i, block in enumerate(self.down):
            if i:
                x = F.max_pool2d(x, 2)
            x = block(x)
            skips.append(x)
        for block, skip in zip(self.up, reversed(skips[:-1]), strict=True):
            x = F.interpolate(x, size=skip.shape[-2:], mode="nearest")
            x = block(torch.cat([x, skip], dim=1))
        return self.head(x)


def pad_to_stride(x: torch.Tensor, stride: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """Pad (B, C, H, W) on the bottom/right with the image's border values to a multiple of `stride`;
    returns the padded tensor and the original (H, W) to crop the output back to."""
    h, w = x.shape[-2:]
    ph, pw = (-h) % stride, (-w) % stride
    if ph or pw:
        x = F.pad(x, (0, pw, 0, ph), mode="replicate")
    return x, (h, w)
