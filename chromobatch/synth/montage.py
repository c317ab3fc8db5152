"""A montage of synthetic chromosomes, all 24 classes at one pixel scale, to judge realism by eye (docs/)."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

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


def write_metaphase_figure(path: Path, *, stain: str = "G", real: Path | None = None, seed: int = 0,
                           **spread: Any) -> Path:
    """A real metaphase (when given) beside a synthetic one and the synthetic one's ground truth, for docs/.

    Why: the synthetic spreads train a segmenter meant for real ones; the figure is how their realism is
    judged by eye. Ground truth panel: one colour per chromosome, overlaps white, nuclei and debris grey.
    ``spread`` goes to synth.metaphase.render_metaphase (size, scale, crowding, resolution, rates ...).
    """
    from matplotlib.figure import Figure

    from chromobatch.synth.metaphase import render_metaphase

    check_style(stain)
    m = render_metaphase(seeded_rng(seed, 0x3E7A), stain=stain, **spread)
    colours = seeded_rng(seed, 0xC0).uniform(0.25, 1.0, (m.count + 1, 3))
    truth = colours[m.labels]
    truth[m.labels == 0] = 0.0
    truth[m.nuclei | m.debris] = 0.35
    truth[m.overlap] = 1.0
    panels: list[tuple[np.ndarray, str]] = []
    if real is not None:
        from PIL import Image

        with Image.open(real) as im:
            grey = np.asarray(im.convert("L"))
        panels.append((grey, f"real: {Path(real).name} ({grey.shape[1]} x {grey.shape[0]})"))
    flags = f"{sum(m.touching)} touching, {sum(m.overlapping)} overlapping"
    panels.append((m.image, f"synthetic {stain}-band, {m.karyotype}, {m.count} chromosomes "
                            f"({m.shape[1]} x {m.shape[0]})"))
    panels.append((truth, f"its exact instance masks ({flags}; overlaps white)"))
    fig = Figure(figsize=(5.2 * len(panels), 4.3), dpi=100)
    axes = fig.subplots(1, len(panels))
    for ax, (img, title) in zip(np.atleast_1d(axes), panels, strict=True):
        ax.imshow(img, cmap="gray", vmin=0, vmax=255, interpolation="antialiased")
        ax.set_title(title, fontsize=9)
        ax.set_axis_off()
    fig.tight_layout(pad=0.3)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, metadata={"Software": None})
    return path
