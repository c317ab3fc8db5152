"""Synthetic G-band spreads for segmenter training (`synth.metaphase.write_segmentation_set`), written in
the bioimlab-metaphase layout so `segment.data.load_set` reads them like the real set.

Why: the only annotated real metaphases (bioimlab-metaphase) are Q-band; a lab's G-band spreads have
banding of the opposite character (pale bands near background level), so synthetic G-band spreads with
exact masks are mixed into training to keep the shipped segmenter working on G-band.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def write_synth_set(out: Path, n: int, seed: int = 0, stain: str = "G") -> Path:
    """Write `n` synthetic spreads under `out` (once: an existing set is reused); returns the folder."""
    from chromobatch.synth.metaphase import write_segmentation_set

    out = Path(out)
    if not (out / "manifest.csv").is_file():
        write_segmentation_set(out, n, stain, np.random.default_rng(seed))
    return out
