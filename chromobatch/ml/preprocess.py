"""Turn a normalised chromosome crop into the model's input tensor: ONE function for training and inference.

Input: a crop from `imaging.normalise` (uint8, dark chromosome on a light background, native pixel scale).
Output: float tensor (1, S, S) in [0, 1], "ink" convention: chromosome bright, background exactly 0, so
rotations and padding fill with background for free and the stain's background level does not matter.

Three ways to choose the pixel scale, because a chromosome's size is a strong cue to its class:

- ``fixed``: one scale for the whole dataset (chosen from the training crops, stored in the model), so
  relative sizes survive; a crop too large for the canvas is shrunk only as much as needed.
- ``cell``: the scale that maps the cell's median chromosome length to a fixed fraction of the canvas, so
  size is relative to the cell (robust to microscope magnification and chromosome condensation). Falls back
  to ``fixed`` when the cell is unknown.
- ``fit``: every crop resized to fill the canvas (size thrown away; kept for comparison).

``size_power`` < 1 compresses the size range of ``fixed``/``cell`` without reordering it: a crop that would
come out L pixels long comes out M * (L / M) ** size_power, M the largest allowed length. Small chromosomes
then get more pixels for their bands while a 1 still comes out longer than a 21 (1.0: plain fixed scale;
docs/results.md measures fixed vs fit vs compressed).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import asdict, dataclass, fields
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from PIL import Image

from chromobatch.errors import ModelError
from chromobatch.ml.geometry import median, upright

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

Mode = Literal["fixed", "cell", "fit"]
MODES: tuple[str, ...] = ("fixed", "cell", "fit")
SPEC_VERSION = 1


@dataclass(frozen=True)
class PreprocessSpec:
    """Everything `preprocess` needs; stored in model.json so inference repeats training exactly."""

    mode: str = "fixed"
    input_size: int = 96
    #: fixed mode: canvas pixels per native pixel (see `choose_scale`); also the cell-mode fallback.
    scale: float = 1.0
    #: cell mode: the cell's median chromosome length becomes this fraction of the canvas side.
    cell_fraction: float = 0.42
    #: fit mode, and the upper bound in every mode: the longest side may fill at most this fraction.
    max_fill: float = 0.95
    #: polarity the input crop must have (imaging.normalise guarantees it).
    input_polarity: str = "dark_on_light"
    #: tensor convention: background-subtracted darkness, stretched so the darkest pixel is 1.
    value: str = "ink_stretched"
    #: "upright": turn the crop's long axis vertical first (orient.upright), for crops cut at any angle;
    #: "none": take the crop as it comes (karyogram crops are upright already).
    orient: str = "none"
    #: fixed/cell: exponent compressing the size range (1.0 = none; see the module docstring).
    size_power: float = 1.0
    version: int = SPEC_VERSION

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ModelError(f"unknown preprocessing mode {self.mode!r} (expected one of {', '.join(MODES)})")
        if self.orient not in ("none", "upright"):
            raise ModelError(f"unknown orientation {self.orient!r} (expected none or upright)")
        if self.input_size < 8:
            raise ModelError(f"input_size {self.input_size} is too small (at least 8)")
        if not (self.scale > 0 and self.cell_fraction > 0 and 0 < self.max_fill <= 1 and 0 < self.size_power <= 1):
            raise ModelError(f"invalid preprocessing numbers in {self!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PreprocessSpec:
        """Build from model.json; unknown keys are an error so a newer format is not half-understood."""
        known = {f.name for f in fields(cls)}
        extra = set(data) - known
        if extra:
            raise ModelError(f"preprocessing spec has unknown keys {sorted(extra)} (newer chromobatch?)")
        if int(data.get("version", SPEC_VERSION)) > SPEC_VERSION:
            raise ModelError(f"preprocessing spec version {data['version']} is newer than this chromobatch")
        return cls(**data)


def chromosome_length(crop: np.ndarray) -> float:
    """Length proxy of a cropped chromosome: its longest side in native pixels (crops are tight boxes)."""
    return float(max(crop.shape[:2]))


def choose_scale(lengths: Iterable[float], input_size: int, *, quantile: float = 0.99, fill: float = 0.9) -> float:
    """Fixed-mode scale for a dataset: its `quantile` chromosome length fills `fill` of the canvas.

    One number per dataset keeps relative sizes; the rare longer crop is shrunk at preprocessing time.
    """
    arr = np.asarray(list(lengths), dtype=np.float64)
    if arr.size == 0:
        return 1.0
    ref = float(np.quantile(arr, quantile))
    return float(fill * input_size / max(ref, 1.0))


def render(crop: np.ndarray, spec: PreprocessSpec, cell_median_length: float | None = None) -> np.ndarray:
    """The preprocessed canvas as uint8 (S, S); `preprocess` is this divided by 255.

    Training caches these bytes (4x less memory than float), inference converts them the same way.
    """
    arr = np.asarray(crop)
    if arr.ndim != 2 or arr.size == 0:
        raise ValueError(f"expected a non-empty 2-D crop, got shape {arr.shape}")
    if spec.orient == "upright":
        arr = upright(arr)[0]
    arr = arr.astype(np.float32)
    h, w = arr.shape
    size = spec.input_size
    border = np.concatenate([arr[0, :], arr[-1, :], arr[:, 0], arr[:, -1]])
    background = median(border)
    ink = np.clip(background - arr, 0.0, None)
    peak = float(ink.max())
    if peak > 0:
        ink /= peak

    longest = float(max(h, w))
    if spec.mode == "fit":
        s = spec.max_fill * size / longest
    elif spec.mode == "cell" and cell_median_length is not None and cell_median_length > 0:
        s = spec.cell_fraction * size / float(cell_median_length)
    else:
        s = spec.scale
    if spec.mode != "fit" and spec.size_power != 1.0:
        most = spec.max_fill * size
        s = most * min(1.0, longest * s / most) ** spec.size_power / longest
    s = min(s, spec.max_fill * size / longest)  # shrink only as much as needed to fit

    nh, nw = max(1, round(h * s)), max(1, round(w * s))
    if (nh, nw) != (h, w):
        ink = np.asarray(Image.fromarray(ink).resize((nw, nh), Image.Resampling.BILINEAR))
    canvas = np.zeros((size, size), dtype=np.float32)
    top, left = (size - nh) // 2, (size - nw) // 2
    canvas[top : top + nh, left : left + nw] = ink
    return np.round(np.clip(canvas, 0.0, 1.0) * 255.0).astype(np.uint8)


def to_tensor(canvases: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 canvases (..., S, S) -> float in [0, 1]; the single conversion used everywhere."""
    import torch  # here, not at the top: render pool workers (`ml.renderpool`) import this module without torch

    t = torch.as_tensor(canvases)
    return t.float().div_(255.0)


def preprocess(crop: np.ndarray, spec: PreprocessSpec, cell_median_length: float | None = None) -> torch.Tensor:
    """Normalised crop (uint8, dark-on-light) -> float tensor (1, S, S) as the model expects it."""
    return to_tensor(render(crop, spec, cell_median_length)).unsqueeze(0)
