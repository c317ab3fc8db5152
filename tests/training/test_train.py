"""Data loading, the paired sampler, augmentation, training, resume, and `chromobatch train/evaluate` end to end."""

from __future__ import annotations

import json
import logging
import math
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from typer.testing import CliRunner

from chromobatch import CLASSES
from chromobatch.cli.main import app
from chromobatch.errors import ConfigError, DataError
from chromobatch.ml.folders import load_model
from chromobatch.ml.runtime import native_bf16
from chromobatch.training.config import TrainConfig
from chromobatch.training.loop import lr_factor, train
from chromobatch.training.records import (
    AugmentConfig,
    PairSampler,
    augment,
    load_records,
    records_from_arrays,
    split_records,
)

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    """Tiny models on a shared 2-core machine: one intra-op thread is ~10x faster than two under load."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def blob(k: int, rng: np.random.Generator) -> np.ndarray:
    """A banded dark bar on white whose length and band period depend on the class: learnable in a few steps."""
    length = 10 + 2 * k + int(rng.integers(-1, 2))
    arr = np.full((length + 4, 10), 245, dtype=np.uint8)
    rows = np.arange(length)
    shade = np.where((rows // (2 + k % 4)) % 2 == 0, 40, 120).astype(np.uint8)
    arr[2:-2, 2:-2] = shade[:, None]
    return arr


def blob_records(cells: int, seed: int = 0, split: str = "") -> list:
    """Records of `cells` cells, each with two homologs of every class."""
    rng = np.random.default_rng(seed)
    crops, labels, cell_ids = [], [], []
    for c in range(cells):
        for k in range(len(CLASSES)):
            for _ in range(2):
                crops.append(blob(k, rng))
                labels.append(CLASSES[k])
                cell_ids.append(f"c{c}")
    return records_from_arrays(crops, labels, patients=cell_ids, cells=cell_ids,
                               splits=[split] * len(crops) if split else None)  # fmt: skip


def tiny_config(**kw: object) -> TrainConfig:
    base: dict = dict(backbone="test_resnet", input_size=32, embed_dim=32, steps=20, warmup_steps=2, val_every=10,
                      checkpoint_every=10, log_every=1, patience=0, device="cpu")  # fmt: skip
    base.update(kw)
    return TrainConfig(**base)


# ---------------------------------------------------------------------------------------------- loading


def test_load_records_from_folder_and_manifest(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    rng = np.random.default_rng(0)
    rows = ["path,label,patient,cell,split"]
    for k, name in enumerate(["1", "X", "Y"]):
        (tmp_path / "tree" / name).mkdir(parents=True)
        img = blob(k, rng)
        Image.fromarray(img).save(tmp_path / "tree" / name / "a.png")
        Image.fromarray(255 - img).save(tmp_path / "tree" / name / "b.bmp")  # bright-on-dark: inverted on load
        rows.append(f"tree/{name}/a.png,{name},p1,p1.1,train")
        rows.append(f"tree/{name}/b.bmp,chr{name},p2,p2.1,test")
    (tmp_path / "tree" / "notes").mkdir()
    (tmp_path / "tree" / "X" / "broken.png").write_bytes(b"not an image")
    recs = load_records(tmp_path / "tree")
    assert sorted(CLASSES[r.label] for r in recs) == ["1", "1", "X", "X", "Y", "Y"]
    a, b = [r for r in recs if r.source.startswith("1/")]
    assert np.array_equal(a.crop, b.crop)  # polarity detected and undone
    assert "broken.png" in caplog.text
    manifest = tmp_path / "manifest.csv"
    manifest.write_text("\n".join(rows) + "\n")
    test = load_records(manifest, splits=["test"])
    assert len(test) == 3 and {r.split for r in test} == {"test"} and test[0].cell_key == "p2/p2.1"
    manifest.write_text("path,label\ntree/1/a.png,25\n")
    with pytest.raises(DataError, match="row 2"):
        load_records(manifest)
    with pytest.raises(DataError, match="header must hold the columns"):
        (tmp_path / "bad.csv").write_text("file,class\n")
        load_records(tmp_path / "bad.csv")


def test_split_records_honours_split_column_or_holds_out_whole_cells() -> None:
    recs = blob_records(10)
    train_r, val_r = split_records(recs, seed=0)
    assert len(val_r) == 48 and {r.cell for r in val_r}.isdisjoint({r.cell for r in train_r})
    marked = blob_records(2, split="val") + blob_records(3, split="train")
    t2, v2 = split_records(marked)
    assert len(v2) == 96 and len(t2) == 144


# ---------------------------------------------------------------------------------------------- sampler


def test_sampler_one_image_per_class_and_b2_differs() -> None:
    recs = blob_records(4)
    labels = [r.label for r in recs]
    cells = [r.cell_key for r in recs]
    sampler = PairSampler(labels, cells, seed=0)
    for _ in range(50):
        i1, i2 = sampler.sample()
        assert [labels[i] for i in i1] == list(range(24))
        assert [labels[i] for i in i2] == list(range(24))
        assert all(a != b for a, b in zip(i1, i2, strict=True))
        assert all(cells[a] == cells[b] for a, b in zip(i1, i2, strict=True))  # the homolog of the same cell


def test_sampler_falls_back_to_other_cells_and_rejects_missing_classes(caplog: pytest.LogCaptureFixture) -> None:
    labels = list(range(24)) * 3 + [23]  # every cell has one of each class; class Y has a 4th image
    cells = [f"c{i // 24}" for i in range(72)] + ["c9"]
    sampler = PairSampler(labels, cells, seed=1)
    i1, i2 = sampler.sample()
    assert all(a != b and labels[a] == labels[b] for a, b in zip(i1, i2, strict=True))
    with caplog.at_level(logging.WARNING):
        single = PairSampler(list(range(24)), seed=0)
    assert "one training image" in caplog.text
    s1, s2 = single.sample()
    assert list(s1) == list(s2) == list(range(24))
    with pytest.raises(DataError, match="no image of class"):
        PairSampler(list(range(23)), seed=0)


def test_augment_is_batched_random_and_keeps_background() -> None:
    x = torch.zeros(48, 1, 32, 32)
    x[:, :, 8:24, 14:18] = 0.8
    g = torch.Generator().manual_seed(0)
    y = augment(x, AugmentConfig(), g)
    assert y.shape == x.shape and float(y.min()) >= 0 and float(y.max()) <= 1
    assert float(y[:, :, 0, 0].abs().max()) == 0.0  # corners stay background
    assert not torch.allclose(y[0], y[1])  # every sample perturbed on its own
    again = augment(x, AugmentConfig(), torch.Generator().manual_seed(0))
    assert torch.equal(y, again)
    zero = augment(torch.zeros(4, 1, 16, 16), AugmentConfig())
    assert float(zero.abs().max()) == 0.0


# --------------------------------------------------------------------------------------------- training


def test_tiny_model_trains_and_loss_goes_down(tmp_path: Path) -> None:
    recs = blob_records(6)
    res = train(tiny_config(steps=60, lr=3e-3, val_every=30), recs, tmp_path / "m", progress=False)
    rows = [json.loads(line) for line in res.history_path.read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == 60
    assert np.mean(losses[-10:]) < 0.7 * np.mean(losses[:10])
    assert all(r["t"] <= 100 for r in rows if "t" in r)
    assert res.best_val_accuracy is not None and res.best_val_accuracy > 1 / 24
    meta = json.loads((tmp_path / "m" / "model.json").read_text())
    assert meta["training"]["loss"]["lambda_con"] == 1.0 and meta["data"]["train"]["n"] == len(recs) - 48
    assert meta["preprocess"]["mode"] == "fixed" and meta["metrics"]["val_accuracy"] == res.best_val_accuracy


def test_no_scl_baseline_has_no_contrastive_term(tmp_path: Path) -> None:
    res = train(tiny_config(steps=4, no_scl=True), blob_records(3), tmp_path / "m", progress=False)
    rows = [json.loads(line) for line in res.history_path.read_text().splitlines()]
    assert all("con" not in r for r in rows)
    assert res.final_temperature == pytest.approx(1 / 0.07, rel=1e-5)  # untouched: not a parameter being trained


def test_bf16_training_on_a_cpu_only_where_it_is_native(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="precision"):
        tiny_config(precision="fp16")
    cfg = tiny_config(steps=40, lr=3e-3, val_every=40, precision="bf16")
    if not native_bf16(torch.device("cpu")):
        with pytest.raises(ConfigError, match="no native bf16"):
            train(cfg, blob_records(3), tmp_path / "m", progress=False)
        pytest.skip("this CPU has no native bf16 (avx512_bf16 / amx_bf16): bf16 training not run here")
    res = train(cfg, blob_records(6), tmp_path / "m", progress=False)
    losses = [json.loads(line)["loss"] for line in res.history_path.read_text().splitlines() if '"loss"' in line]
    assert len(losses) == 40 and np.mean(losses[-8:]) < 0.8 * np.mean(losses[:8])
    meta = json.loads((tmp_path / "m" / "model.json").read_text())
    assert meta["training"]["precision"] == "bf16" and meta["training"]["config"]["precision"] == "bf16"
    assert next(iter(load_model(tmp_path / "m").net.state_dict().values())).dtype == torch.float32  # fp32 weights


def test_lr_factor_anneals_over_the_time_budget_when_it_runs_out_first() -> None:
    cfg = tiny_config(steps=1000, warmup_steps=10, min_lr_ratio=0.01)
    assert lr_factor(500, cfg) == pytest.approx(0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * 490 / 990)))
    assert lr_factor(500, cfg, time_frac=0.9) == pytest.approx(0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * 0.9)))
    assert lr_factor(500, cfg, time_frac=2.0) == pytest.approx(0.01)
    assert lr_factor(500, cfg, time_frac=0.1) == lr_factor(500, cfg)  # steps ahead of time: steps decide
    assert lr_factor(3, cfg, time_frac=0.9) == pytest.approx(0.4)  # warm-up is by steps


def test_time_budget_stops_with_a_validated_model_and_a_checkpoint(tmp_path: Path) -> None:
    recs = blob_records(3)
    res = train(tiny_config(steps=100_000, val_every=100_000, checkpoint_every=100_000, time_budget_s=1.5),
                recs, tmp_path / "m", progress=False)  # fmt: skip
    assert res.out_of_time and not res.stopped_early
    assert 2 <= res.steps_done < 100_000
    rows = [json.loads(line) for line in res.history_path.read_text().splitlines()]
    assert rows[-1] == {"step": res.steps_done, "val_acc": pytest.approx(res.best_val_accuracy, abs=1e-5)}
    lrs = [r["lr"] for r in rows if "lr" in r]
    assert lrs[-1] < 0.2 * max(lrs)  # the cosine ran down over the budget, not over the 100,000 steps
    state = json.loads((tmp_path / "m" / "checkpoint" / "state.json").read_text())
    assert state["step"] == res.steps_done and state["loop_seconds"] >= 1.5
    assert (tmp_path / "m" / "model.safetensors").is_file()
    # the budget covers the whole run: resuming a run that spent it trains no further
    again = train(tiny_config(steps=100_000, val_every=100_000, checkpoint_every=100_000, time_budget_s=1.5),
                  recs, tmp_path / "m", resume=True, progress=False)  # fmt: skip
    assert again.out_of_time and again.steps_done == res.steps_done
    # a larger budget on resume continues where the run stopped
    more = train(tiny_config(steps=100_000, val_every=100_000, checkpoint_every=100_000, time_budget_s=3.0),
                 recs, tmp_path / "m", resume=True, progress=False)  # fmt: skip
    assert more.out_of_time and more.steps_done > res.steps_done
    with pytest.raises(ConfigError):
        tiny_config(time_budget_s=0)


def test_resume_continues_exactly(tmp_path: Path) -> None:
    recs = blob_records(3, split="train")  # no validation: the final model is written at the end
    cfg = dict(warmup_steps=0, min_lr_ratio=1.0, checkpoint_every=6, val_every=1000)
    train(tiny_config(steps=12, **cfg), recs, tmp_path / "straight", progress=False)
    train(tiny_config(steps=6, **cfg), recs, tmp_path / "split", progress=False)
    res = train(tiny_config(steps=12, **cfg), recs, tmp_path / "split", resume=True, progress=False)
    assert res.steps_done == 12
    a = load_file(str(tmp_path / "straight" / "model.safetensors"))
    b = load_file(str(tmp_path / "split" / "model.safetensors"))
    for k in a:
        assert torch.allclose(a[k].float(), b[k].float(), atol=1e-6), k


def test_init_from_starts_at_the_given_weights_and_records_it(tmp_path: Path) -> None:
    recs = blob_records(3, split="train")
    first = train(tiny_config(steps=8, val_every=1000, scale=0.5), recs, tmp_path / "first", progress=False)
    # A zero-step-like check: with lr tiny, the warm-started model stays next to its start, far from random init.
    start = load_file(str(first.model_dir / "model.safetensors"))
    res = train(tiny_config(steps=1, lr=1e-9, warmup_steps=0, min_lr_ratio=1.0, val_every=1000,
                            init_from=str(first.model_dir)), recs, tmp_path / "warm", progress=False)  # fmt: skip
    warm = load_file(str(res.model_dir / "model.safetensors"))
    cold = load_file(str(train(tiny_config(steps=1, lr=1e-9, warmup_steps=0, min_lr_ratio=1.0, val_every=1000,
                                           seed=5), recs, tmp_path / "cold", progress=False).model_dir
                         / "model.safetensors"))  # fmt: skip
    w = "embed.weight"
    assert torch.allclose(warm[w], start[w], atol=1e-5)
    assert not torch.allclose(cold[w], start[w], atol=1e-3)
    meta = json.loads((res.model_dir / "model.json").read_text())
    first_meta = json.loads((first.model_dir / "model.json").read_text())
    assert meta["preprocess"] == first_meta["preprocess"]  # the scale is inherited, not re-chosen
    info = meta["training"]["init_from"]
    assert info["steps"] == 8 and info["total_steps"] == 8 and len(info["sha256"]) == 64
    # A chained warm start counts every step behind it.
    again = train(tiny_config(steps=1, val_every=1000, init_from=str(res.model_dir)), recs, tmp_path / "again",
                  progress=False)  # fmt: skip
    chained = json.loads((again.model_dir / "model.json").read_text())["training"]["init_from"]
    assert chained["total_steps"] == 9


def test_init_from_at_another_input_size_with_frozen_layers(tmp_path: Path) -> None:
    """A convolutional warm start may change the input size; frozen tensors do not move, the rest does."""
    recs = blob_records(3, split="train")
    first = train(tiny_config(steps=4, val_every=1000, scale=0.5), recs, tmp_path / "first", progress=False)
    start = load_file(str(first.model_dir / "model.safetensors"))
    # parameters only: BatchNorm's running statistics still adapt in a frozen layer
    frozen = sorted(k for k in start
                    if k.startswith("backbone.conv1") and "running_" not in k and "num_batches" not in k)
    assert frozen
    res = train(tiny_config(steps=3, val_every=1000, input_size=48, init_from=str(first.model_dir),
                            freeze=("backbone.conv1", " ")), recs, tmp_path / "warm", progress=False)  # fmt: skip
    warm = load_file(str(res.model_dir / "model.safetensors"))
    assert all(torch.equal(warm[k], start[k]) for k in frozen)
    assert not torch.allclose(warm["embed.weight"], start["embed.weight"])
    meta = json.loads((res.model_dir / "model.json").read_text())
    assert meta["preprocess"]["input_size"] == 48 and meta["training"]["config"]["freeze"] == ["backbone.conv1"]
    assert "stain" not in meta  # none recorded at the start: none here (G-band)
    from chromobatch.ml.folders import update_meta

    update_meta(res.model_dir, lambda m: m.update(stain="Q"))
    again = train(tiny_config(steps=1, val_every=1000, input_size=48, init_from=str(res.model_dir)), recs,
                  tmp_path / "again", progress=False)  # fmt: skip
    assert json.loads((again.model_dir / "model.json").read_text())["stain"] == "Q"  # inherited
    with pytest.raises(ConfigError, match="no parameter name starts with"):
        train(tiny_config(steps=1, freeze=("nothing.",)), recs, tmp_path / "x", progress=False)


def test_init_from_rejects_a_different_architecture(tmp_path: Path) -> None:
    from chromobatch.errors import ConfigError

    recs = blob_records(2, split="train")
    first = train(tiny_config(steps=2, val_every=1000), recs, tmp_path / "first", progress=False)
    with pytest.raises(ConfigError, match="embed_dim 32 .this run: 16."):
        train(tiny_config(steps=2, embed_dim=16, init_from=str(first.model_dir)), recs, tmp_path / "x",
              progress=False)  # fmt: skip


# ------------------------------------------------------------------------------------------------- CLI


@pytest.fixture(scope="module")
def synth_manifest(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small synthetic dataset from chromobatch.synth (the project's generator)."""
    from chromobatch.synth.cases import generate_dataset

    return generate_dataset(tmp_path_factory.mktemp("synth") / "data", cells=10, seed=3)


def test_cli_train_then_evaluate_end_to_end(tmp_path: Path, synth_manifest: Path) -> None:
    runner = CliRunner()
    model = tmp_path / "model"
    r = runner.invoke(app, ["train", "--data", str(synth_manifest), "--out", str(model), "--backbone", "test_resnet",
                            "--input-size", "32", "--embed-dim", "32", "--steps", "20", "--val-every", "10",
                            "--checkpoint-every", "10", "--device", "cpu", "--no-progress"])  # fmt: skip
    assert r.exit_code == 0, r.output
    assert "trained test_resnet: 20 steps" in r.output
    assert (model / "model.safetensors").is_file() and (model / "checkpoint" / "checkpoint.safetensors").is_file()
    r = runner.invoke(app, ["train", "--data", str(synth_manifest), "--out", str(model), "--backbone", "test_resnet",
                            "--input-size", "32", "--embed-dim", "32", "--steps", "24", "--val-every", "10",
                            "--device", "cpu", "--no-progress", "--resume"])  # fmt: skip
    assert r.exit_code == 0, r.output
    assert "24 steps" in r.output
    assert "size prior:" in r.output  # fitted on the training cells, weight tuned on the validation cells
    tuned = json.loads((model / "model.json").read_text())["metrics"]["size_prior"]
    assert set(tuned["val_accuracy_by_weight"]) >= {"0", "0.5"} and tuned["val_n"] > 0
    assert ("size_prior" in json.loads((model / "model.json").read_text())) == (tuned["weight"] > 0)
    r = runner.invoke(app, ["calibrate", "--model", str(model), "--data", str(synth_manifest)])
    assert r.exit_code == 0 and "size prior:" in r.output, r.output
    report, metrics = tmp_path / "report", tmp_path / "metrics.json"
    r = runner.invoke(app, ["evaluate", "--model", str(model), "--data", str(synth_manifest), "--json", str(metrics),
                            "--out", str(report)])  # fmt: skip
    assert r.exit_code == 0, r.output
    m = json.loads(metrics.read_text())
    assert m["split"] == "test" and m["n"] > 0 and 0 <= m["accuracy"] <= 1
    assert {"accuracy", "recall_macro", "auc_macro", "per_class"} <= set(m)
    for name in ("confusion.png", "tsne.png", "cam.png", "report.html"):
        assert (report / name).is_file(), name
    r = runner.invoke(app, ["evaluate", "--model", str(tmp_path / "nope"), "--data", str(synth_manifest)])
    assert r.exit_code == 1 and "error:" in r.output and "nope" in r.output
    r = runner.invoke(app, ["train", "--data", str(tmp_path / "missing.csv"), "--out", str(tmp_path / "x")])
    assert r.exit_code == 1 and "missing.csv" in r.output


@pytest.mark.slow
@pytest.mark.parametrize("budget", [False, True], ids=["steps", "time-budget"])
def test_torchrun_two_processes_gloo(tmp_path: Path, synth_manifest: Path, budget: bool) -> None:
    """The same `chromobatch train` command under torchrun: DistributedDataParallel over gloo on CPU.

    With --time-budget both ranks must stop at the same step (rank 0's clock decides), or the run hangs."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    steps = ["--steps", "100000", "--time-budget", "0.02", "--val-every", "100000"] if budget else \
        ["--steps", "2", "--val-every", "2"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
           "chromobatch.cli", "train", "--data", str(synth_manifest), "--out", str(tmp_path / "ddp"), "--backbone",
           "test_resnet", "--input-size", "32", "--embed-dim", "16", *steps,
           "--device", "cpu", "--no-progress"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    meta = json.loads((tmp_path / "ddp" / "model.json").read_text())
    assert meta["training"]["world_size"] == 2 and meta["training"]["images_per_step"] == 96
    if budget:
        assert "stopped at the time budget" in proc.stdout
        assert 100 <= meta["training"]["step"] < 100000
        state = json.loads((tmp_path / "ddp" / "checkpoint" / "state.json").read_text())
        assert set(state["sampler"]) == {"0", "1"}  # both ranks reached the last checkpoint together
