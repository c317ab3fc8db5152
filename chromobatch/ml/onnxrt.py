"""ONNX Runtime as an engine behind `ml.forward` (optional: `pip install chromobatch[onnxruntime]`).

Runs the ONNX file `ml.runtime.converted_onnx` makes from the model folder, on the CPU execution provider, in
fp32 (ONNX Runtime has no bf16 kernels for these networks on the CPU). Imported only when chosen.
"""

from __future__ import annotations

from pathlib import Path

import onnxruntime as ort
import torch


class OnnxRuntimeEngine:
    runtime = "onnxruntime"
    precision = "fp32"
    device = torch.device("cpu")

    def __init__(self, path: Path, threads: int) -> None:
        options = ort.SessionOptions()
        options.intra_op_num_threads = max(1, threads)
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3  # warnings about unused initialisers are noise here
        self.path = path
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        emb, logits = self.session.run(["emb", "logits"], {"x": x.detach().cpu().contiguous().numpy()})
        return torch.from_numpy(emb), torch.from_numpy(logits)

    def __repr__(self) -> str:
        return f"OnnxRuntimeEngine({self.path}, fp32)"
