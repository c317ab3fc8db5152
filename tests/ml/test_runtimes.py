"""Runtimes and precisions behind the one forward loop (ml.runtime, ml.onnxrt, ml.openvino_rt).

* every runtime installed gives the same top-1 class as PyTorch fp32 on generated chromosomes (a runtime
  that is not installed is skipped with the reason);
* bf16 runs only where the hardware has it, and auto offers it only with the model's measured agreement;
* the converted model is cached by the model's checksum and never trusted when its key or bytes differ;
* auto picks the fastest combination that agrees, logs it and remembers it;
* a predictor primed with several cases' crops gives each case the same probabilities without a new pass.
"""

from __future__ import annotations

import importlib.util
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import chromosome_array

from chromobatch.config import load_settings
from chromobatch.errors import ConfigError
from chromobatch.files import sha256_file
from chromobatch.ml import runtime as rt
from chromobatch.ml.folders import load_model
from chromobatch.ml.forward import TorchEngine, forward_batch
from chromobatch.ml.preprocess import render, to_tensor

OPTIONAL = ["onnxruntime", "openvino"]


def needs(name: str) -> pytest.MarkDecorator:
    return pytest.mark.skipif(importlib.util.find_spec(name) is None,
                              reason=f"{name} is not installed (pip install 'chromobatch[{name}]')")


def generated_batch(model_dir: Path) -> torch.Tensor:
    """64 generated inputs: banded rods rendered by the model's own preprocessing, and calibration bars."""
    lm = load_model(model_dir)
    rods = np.stack([render(chromosome_array(20 + 2 * k, 6 + k % 5, seed=k), lm.spec) for k in range(32)])
    bars = rt.calibration_canvases(32, lm.spec.input_size, seed=3).numpy()
    return to_tensor(torch.from_numpy(np.concatenate([rods, bars]))).unsqueeze(1)


@pytest.mark.parametrize("runtime", ["torch", *[pytest.param(r, marks=needs(r)) for r in OPTIONAL]])
def test_each_installed_runtime_agrees_with_torch_fp32(runtime: str, tiny_model_dir: Path, tmp_path: Path) -> None:
    lm = load_model(tiny_model_dir)
    x = generated_batch(tiny_model_dir)
    ref, ref_emb = forward_batch(TorchEngine(lm.net, lm.device, "fp32"), x, lm.device)
    engine = rt.build_engine(lm, runtime, "fp32", tmp_path / "cache", threads=1)
    assert (engine.runtime, engine.precision) == (runtime, "fp32")
    probs, emb = forward_batch(engine, x, engine.device)
    assert probs.shape == ref.shape and emb.shape == ref_emb.shape
    assert torch.equal(probs.argmax(1), ref.argmax(1)), "top-1 class differs from torch fp32"
    assert torch.allclose(probs, ref, atol=1e-4)
    assert torch.allclose(emb, ref_emb, atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("runtime", ["torch", pytest.param("openvino", marks=needs("openvino"))])
def test_bf16_where_the_hardware_has_it(runtime: str, tiny_model_dir: Path, tmp_path: Path) -> None:
    lm = load_model(tiny_model_dir)
    if not rt.native_bf16(lm.device):
        with pytest.raises(ConfigError, match="no native bf16"):
            rt.choose_engine(lm, runtime, "bf16", tmp_path)
        pytest.skip("this CPU has no native bf16 (avx512_bf16 / amx_bf16): bf16 agreement not measurable here")
    x = generated_batch(tiny_model_dir)
    ref, _ = forward_batch(TorchEngine(lm.net, lm.device, "fp32"), x, lm.device)
    try:
        engine = rt.build_engine(lm, runtime, "bf16", tmp_path, threads=1)
    except ConfigError as exc:
        # OpenVINO's CPU plugin decides itself and may keep fp32 on a CPU with the flag; the engine then says
        # so rather than claim bf16 (on an Intel Xeon with avx512_bf16 and no AMX it runs bf16: 2026-12-07)
        if runtime != "openvino":
            raise
        assert "runs fp32 on this CPU" in str(exc)
        pytest.skip(f"OpenVINO keeps fp32 on this CPU ({rt.cpu_model()}): its bf16 is not measurable here")
    assert engine.precision == "bf16"
    probs, _ = forward_batch(engine, x, engine.device)
    margin = ref.topk(2, dim=1).values
    clear = (margin[:, 0] - margin[:, 1]) > 0.02  # a random tiny model has near-ties bf16 may flip
    assert torch.equal(probs.argmax(1)[clear], ref.argmax(1)[clear])


@needs("openvino")
def test_openvino_precision_is_read_back_as_a_type() -> None:
    import openvino as ov

    from chromobatch.ml.openvino_rt import precision_of

    assert precision_of(ov.Type.bf16) == "bf16"
    assert precision_of(ov.Type.f32) == "fp32"
    assert precision_of(ov.Type.f16) not in ("bf16", "fp32")  # never claimed as either


def test_bf16_is_offered_to_auto_only_with_native_hardware_and_a_measured_pass(tiny_model_dir: Path) -> None:
    lm = load_model(tiny_model_dir)
    amx = frozenset({"avx2", "avx512f", "avx512_bf16", "amx_bf16"})
    avx2 = frozenset({"avx2", "fma"})
    assert ("torch", "bf16") not in rt.candidates(lm, "torch", "auto", amx)  # not measured for this model
    lm.meta.setdefault("metrics", {})["runtime_agreement"] = {"bf16-simulated": {"passed": True}}
    assert rt.candidates(lm, "torch", "auto", amx) == [("torch", "fp32"), ("torch", "bf16")]
    assert rt.candidates(lm, "torch", "auto", avx2) == [("torch", "fp32")]
    assert ("onnxruntime", "bf16") not in rt.candidates(lm, "onnxruntime", "auto", amx)
    lm.meta["metrics"]["runtime_agreement"]["torch/bf16"] = {"passed": False}  # its own measurement failed
    assert rt.candidates(lm, "torch", "auto", amx) == [("torch", "fp32")]
    assert rt.agreement_passes(0.9995, -0.05) and not rt.agreement_passes(0.998, 0.0)
    assert not rt.agreement_passes(1.0, -0.2)


def test_settings_check_runtime_and_precision() -> None:
    assert load_settings({"runtime": "openvino", "precision": "fp32"}).runtime == "openvino"
    with pytest.raises(ConfigError, match="runtime must be one of"):
        load_settings({"runtime": "tensorrt"})
    with pytest.raises(ConfigError, match="precision must be one of"):
        load_settings({"precision": "fp16"})


def test_a_runtime_not_installed_is_a_clear_error(tiny_model_dir: Path, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    lm = load_model(tiny_model_dir)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "openvino" else real(n, *a))
    with pytest.raises(ConfigError, match="openvino is not installed") as err:
        rt.choose_engine(lm, "openvino", "fp32", tmp_path)
    assert "chromobatch[openvino]" in err.value.hint
    assert "openvino" not in rt.installed_runtimes()


@needs("onnxruntime")
def test_converted_model_is_cached_by_checksum_and_never_trusted_when_its_key_differs(
        tiny_model_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    lm = load_model(tiny_model_dir)
    cache = tmp_path / "cache"
    caplog.set_level(logging.INFO, logger="chromobatch.ml.runtime")
    path = rt.converted_onnx(lm, cache)
    assert path == cache / lm.sha256 / "model.onnx"
    key = json.loads((path.parent / "key.json").read_text())
    assert key["model_sha256"] == lm.sha256 and key["file_sha256"] == sha256_file(path)
    assert caplog.text.count("converted model") == 1
    rt.converted_onnx(lm, cache)  # found, not converted again
    assert caplog.text.count("converted model") == 1

    key["model_sha256"] = "0" * 64  # a key that names another model: converted again
    (path.parent / "key.json").write_text(json.dumps(key))
    rt.converted_onnx(lm, cache)
    assert caplog.text.count("converted model") == 2 and "does not match" in caplog.text

    good = path.read_bytes()
    path.write_bytes(good[:-10] + b"0123456789")  # same key, other bytes (a torn or altered file)
    rt.converted_onnx(lm, cache)
    assert caplog.text.count("converted model") == 3
    assert path.read_bytes() == good

    other = load_model(tiny_model_dir)  # another model's checksum: its folder is its own, never this file
    other.sha256 = "f" * 64
    (cache / other.sha256).mkdir()
    (cache / other.sha256 / "model.onnx").write_bytes(good)
    (cache / other.sha256 / "key.json").write_text(json.dumps(dict(key, file_sha256=sha256_file(path))))
    rt.converted_onnx(other, cache)
    assert caplog.text.count("converted model") == 4


def test_auto_picks_the_fastest_that_agrees_logs_and_remembers_it(tiny_model_dir: Path, tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch,
                                                                    caplog: pytest.LogCaptureFixture) -> None:
    lm = load_model(tiny_model_dir)
    monkeypatch.setattr(rt, "installed_runtimes", lambda: ["torch", "onnxruntime", "openvino"])
    built: list[tuple[str, str]] = []
    monkeypatch.setattr(rt, "build_engine", lambda m, r, p, *a, **k: built.append((r, p)) or TorchEngine(
        m.net, m.device, "fp32"))
    calls: list[list[tuple[str, str]]] = []

    def fake_calibration(model, pairs, *args, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(pairs)
        speeds = {"torch": 10.0, "onnxruntime": 30.0, "openvino": 50.0}
        agree = {"torch": 1.0, "onnxruntime": 1.0, "openvino": 0.9}  # the fastest disagrees: left out
        return [rt.Measured(r, p, speeds[r], agree[r]) for r, p in pairs]

    caplog.set_level(logging.INFO, logger="chromobatch.ml.runtime")
    rt.choose_engine(lm, "auto", "auto", tmp_path, 64, calibrate_fn=fake_calibration)
    assert built[-1] == ("onnxruntime", "fp32")
    assert "inference: onnxruntime fp32" in caplog.text and "openvino fp32 left out" in caplog.text
    rt.choose_engine(lm, "auto", "auto", tmp_path, 64, calibrate_fn=fake_calibration)
    assert len(calls) == 1, "the choice is remembered per model and machine"
    assert built[-1] == ("onnxruntime", "fp32") and "measured fastest earlier" in caplog.text


def test_auto_calibration_runs_for_real(tiny_model_dir: Path, tmp_path: Path) -> None:
    """With whatever is installed: every candidate measured, the chosen one among them and runnable."""
    lm = load_model(tiny_model_dir)
    pairs = rt.candidates(lm, "auto", "auto")
    measured = rt.calibrate(lm, pairs, tmp_path, batch=4, repeats=1, threads=1)
    assert [(m.runtime, m.precision) for m in measured] == pairs
    assert all(m.images_per_s > 0 and m.agreement == 1.0 for m in measured)
    engine = rt.choose_engine(lm, "auto", "auto", tmp_path, 8, threads=1)
    assert (engine.runtime, engine.precision) in pairs


def test_a_primed_predictor_needs_no_second_pass(tiny_model_dir: Path, sqlite_path: Path) -> None:
    from chromobatch.registry.register import load_predictor
    from chromobatch.store.db import connect

    with connect(sqlite_path) as database:
        predictor = load_predictor(database, load_settings({"model": str(tiny_model_dir), "runtime": "torch",
                                                            "batch_size": 64}))
    case_a = [chromosome_array(30 + k, 8, seed=k) for k in range(5)]
    case_b = [chromosome_array(20 + k, 7, seed=50 + k) for k in range(4)]
    plain_a, plain_b = predictor.predict(case_a), predictor.predict(case_b)
    before = predictor.forward_calls
    assert predictor.prime(case_a + case_b) == 9
    assert predictor.forward_calls == before + 1
    np.testing.assert_allclose(predictor.predict(case_b), plain_b, atol=1e-6)
    np.testing.assert_allclose(predictor.predict(case_a), plain_a, atol=1e-6)
    assert predictor.forward_calls == before + 1, "primed crops must not run the network again"
    predictor.predict(case_a)  # taken once: a later call for the same crops predicts again
    assert predictor.forward_calls == before + 2


def test_torch_bf16_keeps_the_head_in_fp32(tiny_model_dir: Path) -> None:
    """bf16 rounds logits to 8 bits of mantissa, which swapped near-tied classes on real crops (docs/results.md):
    the backbone runs in bf16, the two linear layers of the head take and give fp32."""
    lm = load_model(tiny_model_dir)
    seen: dict[str, torch.dtype] = {}
    convs = [m for m in lm.net.backbone.modules() if isinstance(m, torch.nn.Conv2d)]
    hooks = [convs[-1].register_forward_hook(lambda _m, _a, out: seen.__setitem__("backbone", out.dtype)),
             lm.net.embed.register_forward_hook(lambda _m, a, out: seen.update(embed_in=a[0].dtype, embed=out.dtype)),
             lm.net.classifier.register_forward_hook(lambda _m, _a, out: seen.__setitem__("logits", out.dtype))]
    try:
        engine = TorchEngine(lm.net, lm.device, "bf16")  # unfolded: the hooks sit on the modules that run
        emb, logits = engine(generated_batch(tiny_model_dir)[:4])
    finally:
        for h in hooks:
            h.remove()
    assert seen == {"backbone": torch.bfloat16, "embed_in": torch.float32, "embed": torch.float32,
                    "logits": torch.float32}
    assert emb.dtype == logits.dtype == torch.float32
