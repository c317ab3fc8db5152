"""The one interface every segmenter implements: a metaphase image in, chromosome instances out.

Why an interface: the classical baseline and the learned segmenter are measured side by side on the same
images, and the pipeline should not care which one a lab runs (the classifier is model-agnostic the
same way).

Convention: the image handed to a segmenter is *normalised*, as chromosome crops are: greyscale uint8,
dark chromosomes on a light background (Q-band input is inverted by intake before it gets here).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import numpy as np


@dataclass
class Instance:
    """One object found in a metaphase: a chromosome, or a cluster kept whole for review."""

    #: Boolean mask of the object inside its box (shape (y1 - y0, x1 - x0)).
    mask: np.ndarray
    #: Bounding box in the metaphase image: x0, y0, x1, y1 (x1, y1 exclusive).
    box: tuple[int, int, int, int]
    #: How sure the segmenter is that this is one whole chromosome (0..1).
    score: float = 1.0
    #: About how many chromosomes the object holds; > 1 means a cluster that could not be separated with
    #: confidence: it is kept and flagged for review ("cluster, about N chromosomes"), never guessed apart.
    cluster: int = 1
    notes: dict[str, object] = field(default_factory=dict)

    @property
    def area(self) -> int:
        return int(self.mask.sum())

    def full_mask(self, shape: tuple[int, int]) -> np.ndarray:
        """The mask placed in an image of the given (height, width)."""
        out = np.zeros(shape, dtype=bool)
        x0, y0, x1, y1 = self.box
        out[y0:y1, x0:x1] = self.mask
        return out


class Segmenter(Protocol):
    #: A name and version recorded with every cell it segmented (e.g. "unet-resnet18", "2026.12.07.1").
    name: str
    version: str

    def segment(self, grey: np.ndarray) -> list[Instance]:
        """Every chromosome (or flagged cluster) in a normalised metaphase; nuclei and debris left out."""
