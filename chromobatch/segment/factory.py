"""Choosing a segmenter by name: "classical" (the scikit-image baseline), "default" (the shipped
models/segmenter/ folder) or a segmenter model folder."""

from __future__ import annotations

from pathlib import Path

from chromobatch.errors import ModelError
from chromobatch.segment.base import Segmenter

#: The shipped learned segmenter (repository root / models / segmenter).
DEFAULT_DIR = Path(__file__).resolve().parents[2] / "models" / "segmenter"


def load_segmenter(name_or_dir: str | Path = "default", threads: int | None = None) -> Segmenter:
    """A ready segmenter; ModelError names what was asked for when it is neither a name nor a folder."""
    key = str(name_or_dir)
    if key == "classical":
        from chromobatch.segment.classical import ClassicalSegmenter

        return ClassicalSegmenter()
    folder = DEFAULT_DIR if key == "default" else Path(key)
    if not folder.is_dir():
        raise ModelError(f"{folder}: no such segmenter folder (use 'classical', 'default' or a folder holding "
                         "model.safetensors + model.json)")
    from chromobatch.segment.learned import load_segmenter_folder

    return load_segmenter_folder(folder, threads=threads)
