"""Decode one chromosome image and normalise it: greyscale, dark-on-light, cropped to the chromosome.

Shared by ingest (case folders), training data loading and inference, so a chromosome looks the same to
the model wherever it came from. The native pixel scale is kept: a chromosome's size is information.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image

Polarity = Literal["dark_on_light", "bright_on_dark"]
POLARITIES: tuple[str, ...] = ("dark_on_light", "bright_on_dark")

#: Largest image we decode (pixels); larger files are rejected as decompression bombs before decoding.
MAX_PIXELS = 4096 * 4096
#: File suffixes read as images (a file without a suffix is tried as one too).
IMAGE_SUFFIXES = frozenset({".png", ".tif", ".tiff", ".bmp", ".jpg", ".jpeg"})
#: A chromosome crop is never smaller than this on either side, nor larger than MAX_SIDE.
MIN_SIDE = 4
MAX_SIDE = 4096


class ImageRejected(ValueError):
    """The bytes are not a usable chromosome image; the message is the reason shown to the lab."""


def decode_grey(data: bytes | Path, *, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Decode PNG/TIFF/BMP/JPEG bytes (or a path) to a 2-D uint8 array.

    RGB/RGBA become luminance (transparent pixels become white background); 16-bit becomes 8-bit by range.
    """
    raw = data.read_bytes() if isinstance(data, Path) else data
    if not raw:
        raise ImageRejected("empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(raw))
            w, h = img.size
            if w * h > max_pixels:
                raise ImageRejected(f"image too large ({w}x{h} pixels; limit {max_pixels} pixels)")
            img.load()
    except ImageRejected:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageRejected(f"decompression bomb refused: {exc}") from exc
    except Image.UnidentifiedImageError as exc:
        raise ImageRejected("not an image Pillow can read") from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageRejected(f"truncated or corrupt image: {exc}") from exc
    return image_to_grey(img)


def image_to_grey(img: Image.Image) -> np.ndarray:
    """Any Pillow image to a 2-D uint8 array."""
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(white, rgba)
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        return rescale_to_uint8(arr)
    return np.asarray(img.convert("L"), dtype=np.uint8).copy()


def rescale_to_uint8(arr: np.ndarray) -> np.ndarray:
    """Stretch any numeric array linearly to 0..255 (a flat array becomes mid-grey-free white)."""
    arr = np.asarray(arr, dtype=np.float64)
    lo, hi = float(arr.min()), float(arr.max())
    if hi <= lo:
        return np.full(arr.shape, 255, dtype=np.uint8)
    return np.round((arr - lo) * (255.0 / (hi - lo))).astype(np.uint8)


def border_pixels(arr: np.ndarray) -> np.ndarray:
    return np.concatenate([arr[0, :], arr[-1, :], arr[:, 0], arr[:, -1]])


def detect_polarity(arr: np.ndarray) -> Polarity:
    """G-band crops are dark on a light background, Q-band bright on dark: decided by the border."""
    return "dark_on_light" if float(np.median(border_pixels(arr))) >= 128 else "bright_on_dark"


def to_dark_on_light(arr: np.ndarray, polarity: Polarity) -> np.ndarray:
    return (255 - arr).astype(np.uint8) if polarity == "bright_on_dark" else arr


def crop_to_chromosome(arr: np.ndarray, *, margin: int = 2, min_contrast: int = 12) -> np.ndarray:
    """Crop a dark-on-light image to the bounding box of its non-background pixels."""
    background = float(np.median(border_pixels(arr)))
    mask = arr.astype(np.int16) < background - min_contrast
    if not mask.any():
        raise ImageRejected("blank image: no chromosome found (no pixel darker than the background)")
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    r0, r1 = max(rows[0] - margin, 0), min(rows[-1] + margin + 1, arr.shape[0])
    c0, c1 = max(cols[0] - margin, 0), min(cols[-1] + margin + 1, arr.shape[1])
    return np.ascontiguousarray(arr[r0:r1, c0:c1])


def normalise(
    arr: np.ndarray, polarity: str = "auto", *, min_side: int = MIN_SIDE, max_side: int = MAX_SIDE
) -> tuple[np.ndarray, Polarity]:
    """Greyscale array -> (dark-on-light crop at native scale, the polarity the input had)."""
    if arr.ndim != 2:
        raise ImageRejected(f"expected a greyscale image, got shape {arr.shape}")
    h, w = arr.shape
    if min(h, w) < min_side or max(h, w) > max_side:
        raise ImageRejected(f"absurd dimensions {w}x{h} (each side must be {min_side}..{max_side} px)")
    pol: Polarity = detect_polarity(arr) if polarity == "auto" else polarity  # type: ignore[assignment]
    if pol not in POLARITIES:
        raise ImageRejected(f"unknown polarity {polarity!r}")
    crop = crop_to_chromosome(to_dark_on_light(arr, pol))
    return crop, pol


def load_chromosome(path: Path, polarity: str = "auto") -> tuple[np.ndarray, Polarity]:
    """Decode and normalise one image file (training data, manifests)."""
    return normalise(decode_grey(path), polarity)


def encode_png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def decode_png(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("L"), dtype=np.uint8)
