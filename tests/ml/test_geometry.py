"""ml.geometry's hand-tuned pieces against the plain numpy/scipy formulations they replace (the pipeline
runs them several times per chromosome, so they were rewritten for speed; the results must not move)."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import chromosome_array
from PIL import Image
from scipy import ndimage

from chromobatch.ml.geometry import background_level, chromosome_mask, median, upright


@pytest.mark.parametrize("dtype", [np.uint8, np.int64, np.float32, np.float64])
@pytest.mark.parametrize("n", [1, 2, 3, 10, 181, 400])
def test_median_is_numpys_to_the_bit(dtype: type, n: int) -> None:
    rng = np.random.default_rng(n)
    values = rng.integers(0, 256, n).astype(dtype) if np.dtype(dtype).kind in "iu" else \
        (rng.normal(100, 30, n)).astype(dtype)
    got, want = median(values), float(np.median(values))
    assert got == want and type(got) is float


def _reference_mask(arr: np.ndarray, bg: float, noise: float) -> np.ndarray:
    smooth = ndimage.uniform_filter(arr.astype(np.float32), size=3, mode="nearest")
    mask = smooth < bg - max(10.0, 3.0 * noise)
    labels, n = ndimage.label(mask)
    if n > 1:
        sizes = np.bincount(labels.ravel())[1:]
        keep = np.flatnonzero(sizes >= max(4, 0.02 * sizes.max())) + 1
        mask = np.isin(labels, keep)
    return mask


def _reference_axis(crop: np.ndarray, bg: float, mask: np.ndarray) -> np.ndarray:
    ys, xs = np.nonzero(mask)
    w = np.clip(bg - crop[ys, xs].astype(np.float64), 1.0, None)
    mx, my = np.average(xs, weights=w), np.average(ys, weights=w)
    dx, dy = xs - mx, ys - my
    return np.array([[np.average(dx * dx, weights=w), np.average(dx * dy, weights=w)],
                     [np.average(dx * dy, weights=w), np.average(dy * dy, weights=w)]])


@pytest.mark.parametrize("seed", range(6))
def test_mask_and_upright_match_the_plain_formulation(seed: int) -> None:
    """Chromosomes at random angles with specks around them: the speck rule keeps the same pixels, and
    the upright turn (weighted covariance written out instead of np.average) gives the same angle."""
    rng = np.random.default_rng(seed)
    rod = chromosome_array(int(rng.integers(25, 70)), int(rng.integers(6, 14)), seed=seed)
    angle = float(rng.uniform(-90, 90))
    crop = np.asarray(Image.fromarray(rod).rotate(angle, resample=Image.Resampling.BICUBIC, expand=True,
                                                  fillcolor=245))
    crop = crop.copy()
    for _ in range(int(rng.integers(0, 4))):  # specks: some dropped by the size rule, some kept
        y, x = int(rng.integers(0, crop.shape[0] - 3)), int(rng.integers(0, crop.shape[1] - 3))
        s = int(rng.integers(1, 4))
        crop[y:y + s, x:x + s] = 40
    bg, noise = background_level(crop)
    mask = chromosome_mask(crop, bg, noise)
    assert np.array_equal(mask, _reference_mask(crop, bg, noise))
    cov = _reference_axis(crop, bg, mask)
    evals, evecs = np.linalg.eigh(cov)
    vx, vy = evecs[:, 1]
    want = (np.degrees(np.arctan2(vy, vx)) - 90.0 + 90.0) % 180.0 - 90.0
    _, got = upright(crop)
    got = (got + 90.0) % 180.0 - 90.0  # upright may add 180 (short arm up)
    assert got == pytest.approx(want if abs(want) >= 2.0 else 0.0, abs=1e-9)
