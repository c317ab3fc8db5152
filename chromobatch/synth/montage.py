"""A montage of synthetic chromosomes, all 24 classes at one pixel scale, to judge realism by eye (docs/)."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import numpy as np

from chromobatch import CLASSES
from chromobatch.synth.render import Imaging, check_style, draw_imaging, render_chromosome, seeded_rng


def write_montage(path: Path, *, style: str = "G", seed: int = 0, per_class: int = 3) -> Path:
    """A labelled PNG of all 24 classes at one pixel scale, so realism can be judged by eye (docs/).

    Each panel holds ``per_class`` copies: all but the last upright (karyogram-like), the last free.
    """
    from matplotlib.figure import Figure  # no pyplot: leaves the caller's backend alone

    check_style(style)
    rng = seeded_rng(seed, 0x3047)
    imaging = Imaging(**{**asdict(draw_imaging(rng, style)), "clean_background": True})
    panels: dict[str, np.ndarray] = {}
    for label in CLASSES:
        crops = [render_chromosome(label, rng, style=style, condensation=1.0 + 0.1 * (k % 2), imaging=imaging,
                                   upright=k < max(per_class - 1, 1)) for k in range(per_class)]
        height = max(c.shape[0] for c in crops)
        bg = int(np.median(np.concatenate([c[0] for c in crops])))
        padded = [np.pad(c, ((0, height - c.shape[0]), (0, 0)), constant_values=bg) for c in crops]
        panels[label] = np.concatenate(padded, axis=1)
    ph = max(p.shape[0] for p in panels.values())
    pw = max(p.shape[1] for p in panels.values())
    zoom = 2.0  # screen pixels per image pixel
    face = (imaging.background / 255.0,) * 3  # panels blend into the figure
    ink = "black" if style == "G" else "white"
    fig = Figure(figsize=(6 * pw * zoom / 100, 4 * (ph * zoom + 30) / 100 + 0.3), dpi=100, facecolor=face)
    axes = fig.subplots(4, 6)
    for ax, label in zip(axes.ravel(), CLASSES, strict=True):  # rows 1-6, 7-12, 13-18, 19-22 X Y
        img = panels[label]
        ax.set_axis_off()
        ax.imshow(img, cmap="gray", vmin=0, vmax=255, interpolation="nearest",
                  extent=(0, img.shape[1], img.shape[0], 0))
        ax.set_xlim(0, pw)
        ax.set_ylim(ph, 0)
        ax.set_title(label, color=ink, fontsize=11)
    fig.suptitle(f"chromobatch synth, {style}-band style (seed {seed}; same pixel scale in every panel)",
                 color=ink, fontsize=10)
    fig.tight_layout(pad=0.4, h_pad=0.2, w_pad=0.2, rect=(0, 0, 1, 0.97))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, facecolor=face, metadata={"Software": None})
    return path
