"""Accuracy is not traded: every runtime x precision against PyTorch fp32 on a labelled test split.

    .venv/bin/python benchmarks/runtime_accuracy.py --data /work/data/g612/manifest.csv [--model models/default]
        [--write-model] [--json out.json]

For each combination this machine runs (torch fp32 is the reference; onnxruntime fp32, openvino fp32 when
installed; torch bf16 and openvino bf16 only on hardware with native bf16), on the crops of the `test` split:
top-1 agreement with torch fp32 and accuracy, both on the image probabilities and on the probabilities as
served (with the model's size prior). Plus `bf16-simulated`: PyTorch fp32 with bf16 rounding of every
convolution's and linear layer's weights, inputs and outputs (what bf16 matrix hardware computes, with fp32
accumulation), for machines without bf16 hardware; labelled as simulated wherever it is reported.

A combination passes with agreement >= 99.9% and accuracy within 0.1 point (ml.runtime.agreement_passes).
--write-model records the results in the model folder's model.json (metrics.runtime_agreement), which
`runtime = auto` reads before it offers bf16 (ml.runtime.bf16_measured).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from common import cpu_name  # noqa: E402

from chromobatch.errors import ConfigError  # noqa: E402
from chromobatch.ml import runtime as rt  # noqa: E402
from chromobatch.ml.folders import load_model, update_meta  # noqa: E402
from chromobatch.ml.forward import TorchEngine, forward_batch  # noqa: E402
from chromobatch.ml.preprocess import render, to_tensor  # noqa: E402
from chromobatch.registry.register import DEFAULT_MODEL_DIR  # noqa: E402
from chromobatch.training.calibrate import record_relative_inks  # noqa: E402
from chromobatch.training.records import cell_median_lengths, load_records  # noqa: E402


class SimulatedBf16:
    """torch fp32 with bf16 rounding at every Conv2d / Linear: weights, inputs and outputs (fp32 accumulate)."""

    runtime = "torch"
    precision = "bf16-simulated"

    def __init__(self, net: torch.nn.Module) -> None:
        self.net = copy.deepcopy(net).eval()
        self.device = torch.device("cpu")

        def rnd(t: torch.Tensor) -> torch.Tensor:
            return t.to(torch.bfloat16).to(torch.float32)

        with torch.no_grad():
            for m in self.net.modules():
                if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
                    m.weight.copy_(rnd(m.weight))
                    if m.bias is not None:
                        m.bias.copy_(rnd(m.bias))
                    m.register_forward_pre_hook(lambda _m, args: tuple(rnd(a) for a in args))
                    m.register_forward_hook(lambda _m, _a, out: rnd(out))

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        emb, logits = self.net(x)
        return emb, logits


def run(engine: object, canvases: torch.Tensor, batch: int) -> tuple[np.ndarray, float]:
    out = []
    t = time.perf_counter()
    for i in range(0, len(canvases), batch):
        x = to_tensor(canvases[i:i + batch]).unsqueeze(1)
        p, _ = forward_batch(engine, x, torch.device("cpu"))  # type: ignore[arg-type]
        out.append(p.numpy())
    return np.concatenate(out), time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL_DIR)
    ap.add_argument("--split", default="test")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--cache-dir", default="")
    ap.add_argument("--write-model", action="store_true")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    lm = load_model(args.model)
    records = load_records(args.data, splits=[args.split])
    meds = cell_median_lengths(records) if lm.spec.mode == "cell" else [None] * len(records)
    canvases = torch.from_numpy(np.stack([render(r.crop, lm.spec, m) for r, m in zip(records, meds, strict=True)]))
    y = np.array([r.label for r in records])
    rel = record_relative_inks(records, lm.size_prior.min_cell) if lm.size_prior is not None else None

    # the reference: the network as trained, eager PyTorch fp32; then every engine as `runtime` builds it for
    # serving (torch: BatchNorm folded into the convolutions)
    combos: list[tuple[str, object]] = [("torch/fp32", TorchEngine(lm.net, lm.device, "fp32")),
                                        ("torch/fp32-folded", rt.build_engine(lm, "torch", "fp32"))]
    for r in rt.installed_runtimes()[1:]:
        combos.append((f"{r}/fp32", rt.build_engine(lm, r, "fp32", args.cache_dir)))
    if rt.native_bf16(lm.device):
        combos.append(("torch/bf16", rt.build_engine(lm, "torch", "bf16")))
        if "openvino" in rt.installed_runtimes():
            try:
                combos.append(("openvino/bf16", rt.build_engine(lm, "openvino", "bf16", args.cache_dir)))
            except ConfigError as exc:  # OpenVINO may run fp32 only on a CPU that has the flag
                print(f"openvino/bf16 left out: {exc}")
    combos.append(("bf16-simulated", SimulatedBf16(lm.net)))

    results: dict[str, dict[str, object]] = {}
    ref_img = ref_served = None
    for name, engine in combos:
        img, seconds = run(engine, canvases, args.batch_size)
        served = lm.apply_size_prior(img, rel)
        if ref_img is None:
            ref_img, ref_served = img, served
        assert ref_served is not None
        agree_img = float((img.argmax(1) == ref_img.argmax(1)).mean())
        agree = float((served.argmax(1) == ref_served.argmax(1)).mean())
        acc = float((served.argmax(1) == y).mean())
        acc_img = float((img.argmax(1) == y).mean())
        drop = 100 * (float((ref_served.argmax(1) == y).mean()) - acc)
        drop_img = 100 * (float((ref_img.argmax(1) == y).mean()) - acc_img)
        results[name] = {
            "agreement": round(agree, 6), "agreement_image_only": round(agree_img, 6), "accuracy": round(acc, 6),
            "accuracy_image_only": round(acc_img, 6), "accuracy_drop_pt": round(drop, 4),
            "max_abs_prob_diff": float(np.abs(served - ref_served).max()), "seconds": round(seconds, 1),
            "passed": rt.agreement_passes(min(agree, agree_img), max(drop, drop_img)),
            "n": len(y), "cpu": cpu_name(), "simulated": name == "bf16-simulated",
            "date": datetime.now(UTC).strftime("%Y-%m-%d"), "data": f"{args.data} ({args.split})",
        }
        print(f"{name:16s} agreement {100 * agree:7.3f}% (image only {100 * agree_img:7.3f}%)  accuracy "
              f"{100 * acc:6.2f}% (image only {100 * acc_img:6.2f}%)  drop {drop:+.2f} pt  "
              f"{'PASS' if results[name]['passed'] else 'FAIL'}  ({seconds:.0f}s)", flush=True)
    out = {"model": str(args.model), "sha256": lm.sha256, "machine": cpu_name(), "results": results}
    if args.json:
        args.json.write_text(json.dumps(out, indent=2) + "\n")
    if args.write_model:
        def change(meta: dict) -> None:
            meta.setdefault("metrics", {}).setdefault("runtime_agreement", {}).update(results)
        update_meta(args.model, change)
        print(f"recorded in {args.model / 'model.json'} (metrics.runtime_agreement)")


if __name__ == "__main__":
    main()
