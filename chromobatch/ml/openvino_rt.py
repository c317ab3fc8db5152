"""OpenVINO as an engine behind `ml.forward` (optional: `pip install chromobatch[openvino]`).

Reads the ONNX file `ml.runtime.converted_onnx` makes from the model folder and compiles it for the CPU at
the asked precision (`INFERENCE_PRECISION_HINT`): bf16 where the CPU has AMX or AVX-512 BF16, else fp32. The
precision the plugin actually runs is read back, so an engine never claims bf16 while computing fp32 (or
the reverse). Imported only when chosen.
"""

from __future__ import annotations

from pathlib import Path

import openvino as ov
import torch

from chromobatch.errors import ConfigError

_HINT = {"fp32": "f32", "bf16": "bf16"}


def precision_of(hint: object) -> str:
    """The precision a compiled model runs, from the element type OpenVINO reads back.

    Compared as a type: its text is "<Type: 'bfloat16'>", so looking for "bf16" in it never matched and
    bf16 was refused on every CPU until 2026-12-07.
    """
    names = {ov.Type.bf16: "bf16", ov.Type.f32: "fp32"}
    return names.get(hint, str(hint))  # anything else is refused by the caller, named as OpenVINO names it


class OpenVinoEngine:
    runtime = "openvino"
    device = torch.device("cpu")

    def __init__(self, path: Path, precision: str, threads: int) -> None:
        core = ov.Core()
        self.path = path
        self.compiled = core.compile_model(core.read_model(str(path)), "CPU", {
            "INFERENCE_PRECISION_HINT": _HINT[precision], "PERFORMANCE_HINT": "LATENCY",
            "INFERENCE_NUM_THREADS": max(1, threads)})
        self.precision = precision_of(self.compiled.get_property("INFERENCE_PRECISION_HINT"))
        if self.precision != precision:
            raise ConfigError(f"OpenVINO runs {self.precision} on this CPU, not the {precision} asked for",
                              hint="Use precision = auto.")
        self.request = self.compiled.create_infer_request()

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.request.infer({0: x.detach().cpu().contiguous().numpy()})
        # copies: the request reuses its output buffers on the next call
        return torch.from_numpy(out[0].copy()), torch.from_numpy(out[1].copy())

    def __repr__(self) -> str:
        return f"OpenVinoEngine({self.path}, {self.precision})"
