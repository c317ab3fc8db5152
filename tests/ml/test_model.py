"""Model construction, preprocessing and model folders (save -> load gives the same outputs)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from chromobatch import CLASSES
from chromobatch.errors import ModelError
from chromobatch.ml.factory import create_model
from chromobatch.ml.folders import load_model, save_model
from chromobatch.ml.preprocess import PreprocessSpec, choose_scale, preprocess, render
from chromobatch.training.evaluate import class_activation_maps, compute_metrics

REPO = Path(__file__).resolve().parents[2]


def bar(length: int, width: int = 8) -> np.ndarray:
    """A dark vertical bar on white, like a normalised crop (2 px margin)."""
    arr = np.full((length + 4, width + 4), 250, dtype=np.uint8)
    arr[2:-2, 2:-2] = 40
    return arr


def rendered_length(canvas: np.ndarray) -> int:
    return int((canvas > 0).any(axis=1).sum())


# ------------------------------------------------------------------------------------------- preprocess


def test_fixed_scale_keeps_relative_size_and_shrinks_only_too_large() -> None:
    spec = PreprocessSpec(mode="fixed", input_size=64, scale=0.5)
    short, long_ = render(bar(20), spec), render(bar(40), spec)
    assert rendered_length(long_) == pytest.approx(2 * rendered_length(short), abs=2)
    huge = render(bar(400), spec)  # 0.5 * 404 px would not fit: shrunk just enough
    assert rendered_length(huge) <= 64
    assert rendered_length(huge) >= int(0.9 * 64)


def test_fit_mode_discards_size_and_cell_mode_uses_the_cell_median() -> None:
    fit = PreprocessSpec(mode="fit", input_size=64)
    # both fill the canvas (up to the 2 px crop margin, which scales with them)
    assert abs(rendered_length(render(bar(20), fit)) - rendered_length(render(bar(40), fit))) <= 5
    cell = PreprocessSpec(mode="cell", input_size=64, scale=0.5, cell_fraction=0.4)
    a = render(bar(40), cell, cell_median_length=40.0)
    b = render(bar(80), cell, cell_median_length=80.0)  # same chromosome, twice the magnification
    assert abs(rendered_length(a) - rendered_length(b)) <= 2
    assert render(bar(40), cell, None).tobytes() == render(bar(40), PreprocessSpec(input_size=64, scale=0.5)).tobytes()


def test_size_power_compresses_the_size_range_but_keeps_the_order() -> None:
    plain = PreprocessSpec(mode="fixed", input_size=96, scale=0.5)
    half = PreprocessSpec(mode="fixed", input_size=96, scale=0.5, size_power=0.5)
    lengths = [16, 30, 60, 120, 200]  # 200 px at scale 0.5 would not fit: capped either way
    a = [rendered_length(render(bar(n), plain)) for n in lengths]
    b = [rendered_length(render(bar(n), half)) for n in lengths]
    assert b == sorted(b) and len(set(b)) == len(b)  # a longer chromosome still comes out longer
    assert all(y >= x for x, y in zip(a, b, strict=True))  # nothing shrinks
    assert b[-1] / b[0] < 0.7 * (a[-1] / a[0])  # the range is compressed
    assert b[-1] == a[-1]  # the largest allowed size stays the largest allowed size
    assert PreprocessSpec.from_dict({k: v for k, v in plain.to_dict().items() if k != "size_power"}) == plain
    with pytest.raises(ModelError):
        PreprocessSpec(size_power=0.0)


def test_preprocess_tensor_convention() -> None:
    spec = PreprocessSpec(mode="fixed", input_size=48, scale=1.0)
    x = preprocess(bar(30), spec)
    assert x.shape == (1, 48, 48) and x.dtype == torch.float32
    assert float(x.min()) == 0.0 and float(x.max()) == pytest.approx(1.0)
    assert float(x[0, 0, 0]) == 0.0  # background is 0 ("ink" convention)
    assert torch.equal(x, torch.from_numpy(render(bar(30), spec)).float().div(255).unsqueeze(0))


def test_spec_round_trip_and_validation() -> None:
    spec = PreprocessSpec(mode="cell", input_size=80, scale=0.7)
    assert PreprocessSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
    with pytest.raises(ModelError):
        PreprocessSpec(mode="stretch")
    with pytest.raises(ModelError):
        PreprocessSpec.from_dict({**spec.to_dict(), "future_key": 1})
    assert choose_scale([100.0] * 10, 96) == pytest.approx(0.9 * 96 / 100)


# ----------------------------------------------------------------------------------------------- model


@pytest.mark.parametrize("backbone", ["test_resnet", "test_vit"])
def test_create_model_outputs_embeddings_and_logits(backbone: str) -> None:
    net = create_model(backbone, embed_dim=24, input_size=32)
    emb, logits = net(torch.rand(3, 1, 32, 32))
    assert emb.shape == (3, 24) and logits.shape == (3, len(CLASSES))
    cams, method = class_activation_maps(net, torch.rand(2, 1, 32, 32))
    assert cams.shape == (2, 32, 32) and 0.0 <= cams.min() and cams.max() <= 1.0
    assert ("Grad-CAM" in method) == (backbone == "test_resnet")


def test_unknown_backbone_is_a_model_error() -> None:
    with pytest.raises(ModelError, match="unknown timm backbone"):
        create_model("no_such_net")


# --------------------------------------------------------------------------------------------- modelio


def _save_tiny(folder: Path, half: bool = False) -> torch.nn.Module:
    torch.manual_seed(0)
    net = create_model("test_resnet", embed_dim=16, input_size=32)
    with torch.no_grad():
        net.logit_scale.fill_(3.0)
    spec = PreprocessSpec(mode="fixed", input_size=32, scale=0.4)
    save_model(net, {"backbone": "test_resnet", "embed_dim": 16, "preprocess": spec.to_dict(),
                     "metrics": {"val_accuracy": 0.5}}, folder, half=half)  # fmt: skip
    return net.eval()


def test_model_folder_round_trips_exactly(tmp_path: Path) -> None:
    net = _save_tiny(tmp_path / "m")
    lm = load_model(tmp_path / "m")
    crops = [bar(30 + 5 * i) for i in range(5)]
    assert all(torch.equal(v, lm.net.state_dict()[k]) for k, v in net.state_dict().items())
    # load_model serves channels_last (faster on the CPU); the same layout gives the same floats bit for bit
    net = net.to(memory_format=torch.channels_last)
    x = torch.stack([preprocess(c, lm.spec) for c in crops]).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        e_ref, l_ref = net(x)
        e_new, l_new = lm.net(x)
    assert torch.equal(e_ref, e_new) and torch.equal(l_ref, l_new)
    probs, emb = lm.predict(crops, batch_size=8)
    assert np.array_equal(emb, e_ref.numpy())
    assert np.allclose(probs, torch.softmax(l_ref, -1).numpy(), atol=1e-7)
    assert np.allclose(lm.predict(crops, batch_size=2)[1], emb, atol=1e-5)  # batching does not matter
    assert probs.shape == (5, 24) and np.allclose(probs.sum(1), 1.0, atol=1e-5)
    assert not lm.net.training
    assert lm.sha256 == hashlib.sha256((tmp_path / "m" / "model.safetensors").read_bytes()).hexdigest()
    meta = lm.meta
    assert meta["classes"] == list(CLASSES) and meta["temperature"] == pytest.approx(np.exp(3.0), rel=1e-6)
    assert meta["input_size"] == 32 and meta["chromobatch_version"] and meta["metrics"]["val_accuracy"] == 0.5
    for k, v in net.state_dict().items():
        assert torch.equal(v, lm.net.state_dict()[k]), k


def test_fp16_storage_loads_back_as_fp32(tmp_path: Path) -> None:
    _save_tiny(tmp_path / "full")
    _save_tiny(tmp_path / "half", half=True)
    full, half = load_model(tmp_path / "full"), load_model(tmp_path / "half")
    size = {k: (tmp_path / k / "model.safetensors").stat().st_size for k in ("full", "half")}
    assert size["half"] < 0.6 * size["full"]
    assert all(v.dtype != torch.float16 for v in half.net.state_dict().values())
    crops = [bar(40), bar(25)]
    assert np.allclose(full.predict(crops)[0], half.predict(crops)[0], atol=2e-2)


def test_broken_model_folders_raise_model_error_naming_the_file(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="not found"):
        load_model(tmp_path / "nothing")
    folder = tmp_path / "m"
    _save_tiny(folder)
    weights = folder / "model.safetensors"
    good = weights.read_bytes()
    weights.write_bytes(good[: len(good) // 2])
    with pytest.raises(ModelError, match="model.safetensors"):
        load_model(folder)
    weights.unlink()
    with pytest.raises(ModelError, match="model.safetensors: missing"):
        load_model(folder)
    weights.write_bytes(good)
    meta = json.loads((folder / "model.json").read_text())
    (folder / "model.json").write_text(json.dumps({**meta, "embed_dim": 8}))
    with pytest.raises(ModelError, match="wrong shape"):
        load_model(folder)
    (folder / "model.json").write_text("{not json")
    with pytest.raises(ModelError, match="model.json"):
        load_model(folder)


def test_shipped_default_model_loads_and_predicts() -> None:
    folder = REPO / "models" / "default"
    assert (folder / "model.safetensors").is_file(), "the shipped default model is missing"
    assert (folder / "model.safetensors").stat().st_size < 25 * 1024 * 1024
    lm = load_model(folder)
    probs, emb = lm.predict([bar(40), bar(70)])
    assert probs.shape == (2, 24) and emb.shape[0] == 2
    assert (folder / "README.md").is_file()
    prior = lm.size_prior  # relative DNA content per class, fitted on real cells: the big ones hold more
    assert prior is not None and 0 < prior.weight <= 1
    assert prior.mean[0] > prior.mean[11] > prior.mean[17] > prior.mean[20]  # 1 > 12 > 18 > 21


def test_metrics_on_a_known_confusion() -> None:
    y = np.array([0, 0, 1, 1, 2, 2])
    probs = np.full((6, 24), 0.01)
    pred = [0, 1, 1, 1, 2, 0]
    for i, p in enumerate(pred):
        probs[i, p] = 0.9
    m = compute_metrics(y, probs)
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["recall_macro"] == pytest.approx((0.5 + 1 + 0.5) / 3)
    assert m["n"] == 6 and m["classes_present"] == 3
    assert m["confusion_matrix"][0][1] == 1 and m["per_class"][1]["recall"] == 1.0
