"""Time to render one synthetic whole metaphase (chromobatch.synth.metaphase.render_metaphase).

    .venv/bin/python benchmarks/synth_metaphase.py [--spreads 20] [--size 768x576]

Renders ``--spreads`` spreads per stain (G and Q, 46 or 47 chromosomes, default rates, nuclei and debris
drawn) after one warm-up; prints wall-clock median and best and CPU seconds per spread (CPU stays
meaningful when other work shares the cores), and the 1-minute load average. Goal: well under 0.5 s per
768 x 576 spread, so a segmentation set of thousands of images or a metaphase case is quick to make.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from common import cpu_name  # noqa: E402

from chromobatch.synth.metaphase import render_metaphase  # noqa: E402
from chromobatch.synth.render import seeded_rng  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--spreads", type=int, default=20)
    ap.add_argument("--size", default="768x576")
    args = ap.parse_args()
    w, h = (int(v) for v in args.size.split("x"))
    render_metaphase(seeded_rng(0), size=(w, h))  # warm-up: imports, ideogram tables
    print(f"machine: {cpu_name()}, {os.cpu_count()} cores; date {dt.date.today()}; size {w} x {h}")
    for stain in ("G", "Q"):
        walls, count = [], 0
        cpu = time.process_time()
        for seed in range(args.spreads):
            start = time.perf_counter()
            m = render_metaphase(seeded_rng(seed, 1), stain=stain, size=(w, h))
            walls.append(time.perf_counter() - start)
            count += m.count
        cpu_per = (time.process_time() - cpu) / args.spreads
        print(f"{stain}-band: {args.spreads} spreads, {count / args.spreads:.1f} chromosomes each: wall median "
              f"{statistics.median(walls):.3f} s, best {min(walls):.3f} s; CPU {cpu_per:.3f} s per spread; "
              f"load average {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
