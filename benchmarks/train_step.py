"""Time one SCL training step against one plain (--no-scl) step: same backbone, same 48 images per step.

    .venv/bin/python benchmarks/train_step.py [--backbone resnet18] [--input-size 96] [--steps 30]

Steps alternate (plain, SCL, plain, SCL, ...) on the same model so both modes see the same machine load;
the median of each is reported with the ratio (target <= 1.10) and training images/s. Each step is the
real one: sampler indices -> augmentation -> forward -> loss -> backward -> Adam step.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import time

import numpy as np
import torch

from chromobatch import NUM_CLASSES
from chromobatch.ml.factory import create_model
from chromobatch.ml.preprocess import to_tensor
from chromobatch.training.losses import LossConfig, total_loss
from chromobatch.training.records import AugmentConfig, PairSampler, augment


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    return platform.processor() or "unknown"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backbone", default="resnet18")
    ap.add_argument("--input-size", type=int, default=96)
    ap.add_argument("--embed-dim", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=30, help="timed steps per mode")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()

    dev = torch.device(args.device)
    torch.manual_seed(0)
    s = args.input_size
    images = torch.randint(0, 256, (24 * 50, s, s), dtype=torch.uint8, device=dev)
    labels = np.repeat(np.arange(NUM_CLASSES), 50)
    sampler = PairSampler(labels, [f"c{i // 48}" for i in range(len(labels))], seed=0)
    net = create_model(args.backbone, embed_dim=args.embed_dim, input_size=s).to(dev)
    cuda = dev.type == "cuda"
    if cuda:
        net = net.to(memory_format=torch.channels_last)
    opt = torch.optim.Adam(net.parameters(), lr=1e-4)
    targets = torch.arange(NUM_CLASSES, device=dev)
    gen = torch.Generator(device=dev).manual_seed(0)
    aug = AugmentConfig()
    modes = {"plain": LossConfig(lambda_con=0.0), "scl": LossConfig()}

    def step(cfg: LossConfig) -> float:
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        i1, i2 = sampler.sample()
        idx = torch.from_numpy(np.concatenate([i1, i2])).to(dev)
        x = augment(to_tensor(images[idx]).unsqueeze(1), aug, gen)
        if cuda:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast("cuda", dtype=torch.bfloat16) if cuda else torch.autocast("cpu", enabled=False):
            emb, logits = net(x)
        e1, e2 = emb.float().chunk(2)
        p1, p2 = logits.float().chunk(2)
        loss, _ = total_loss(e1, e2, p1, p2, net.logit_scale, cfg, targets=targets)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        net.clamp_logit_scale()
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    for _ in range(args.warmup):
        for cfg in modes.values():
            step(cfg)
    times: dict[str, list[float]] = {k: [] for k in modes}
    for _ in range(args.steps):
        for name, cfg in modes.items():
            times[name].append(step(cfg))
    med = {k: statistics.median(v) for k, v in times.items()}
    ratio = med["scl"] / med["plain"]
    print(f"machine: {cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, device {dev}")  # fmt: skip
    print(f"backbone {args.backbone} at {s}px, embed {args.embed_dim}, 48 images/step, {args.steps} steps per mode")
    for k in modes:
        print(f"  {k:5s}: median {1000 * med[k]:7.1f} ms/step  ({48 / med[k]:6.1f} images/s)")
    print(f"SCL/plain step time ratio: {ratio:.3f} (target <= 1.10)")


if __name__ == "__main__":
    main()
