"""`chromobatch segment evaluate` and `segment train` as a user runs them (real subprocesses) on a tiny
synthetic set written in the bioimlab-metaphase layout."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from chromobatch.synth.metaphase import write_segmentation_set


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-P", "-m", "chromobatch.cli", *args], capture_output=True, text=True,
                          timeout=300)


@pytest.fixture(scope="module")
def tiny_set(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("segset")
    write_segmentation_set(root, 3, "G", np.random.default_rng(5), size=(512, 384), val_fraction=0.34)
    return root


def test_evaluate_classical(tiny_set: Path) -> None:
    r = _cli("segment", "evaluate", "--model", "classical", "--data", str(tiny_set), "--split", "train", "--json")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    s = res["summary"]
    assert s["images"] == 2 and s["annotated"] > 0
    assert 0.0 <= s["f1"] <= 1.0 and s["predicted"] > 0
    assert res["seconds_per_image"] > 0


def test_bad_inputs_one_red_line(tmp_path: Path, tiny_set: Path) -> None:
    r = _cli("segment", "evaluate", "--model", str(tmp_path / "none"), "--data", str(tiny_set))
    assert r.returncode == 1 and "error:" in r.stderr and "none" in r.stderr and "Traceback" not in r.stderr
    r = _cli("segment", "evaluate", "--model", "classical", "--data", str(tmp_path))
    assert r.returncode == 1 and "manifest.csv" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.slow
def test_train_a_few_steps(tmp_path: Path, tiny_set: Path) -> None:
    """Two steps and one validation: a loadable model folder with its record (not a quality test)."""
    out = tmp_path / "seg"
    r = _cli("segment", "train", "--data", str(tiny_set), "--out", str(out), "--steps", "2", "--val-every", "2",
             "--batch-size", "1")
    assert r.returncode == 0, r.stderr
    meta = json.loads((out / "model.json").read_text())
    assert meta["format"] == "chromobatch-segmenter" and meta["training"]["steps_run"] == 2
    assert set(meta["postprocess"]) >= {"fg_threshold", "core_threshold", "min_seed", "cluster_factor",
                                        "cluster_divisor", "cluster_branched_below"}
    assert (out / "history.json").is_file()


@pytest.mark.slow
def test_train_continues_from_a_segmenter_folder(tmp_path: Path, tiny_set: Path) -> None:
    """--init-from starts at the given weights (the first step moves them only a little) and records where
    it started; a folder that is not a segmenter is one red line."""
    from chromobatch.segment.learned import load_segmenter_folder, update_meta

    first, second = tmp_path / "first", tmp_path / "second"
    common = ("--data", str(tiny_set), "--steps", "1", "--val-every", "1", "--batch-size", "1")
    assert _cli("segment", "train", "--out", str(first), *common).returncode == 0
    tuned = {**json.loads((first / "model.json").read_text())["postprocess"], "min_area": 77}
    update_meta(first, {"postprocess": tuned})  # a value neither the defaults nor the grid has
    r = _cli("segment", "train", "--out", str(second), "--init-from", str(first), "--lr", "1e-6", *common)
    assert r.returncode == 0, r.stderr
    meta = json.loads((second / "model.json").read_text())
    assert meta["training"]["init_from"]["folder"] == str(first) and meta["training"]["config"]["lr"] == 1e-6
    # checkpoints are chosen with the start's tuned post-processing, not the untrained defaults
    assert meta["training"]["val_postprocess"] == tuned
    a = load_segmenter_folder(first).net.state_dict()
    b = load_segmenter_folder(second).net.state_dict()
    fresh = load_segmenter_folder(first).net.__class__(tuple(meta["channels"])).state_dict()
    weights = [k for k in a if k.endswith("weight") and a[k].dim() == 4]
    assert all(float((a[k] - b[k]).abs().max()) < 1e-3 for k in weights)  # lr 1e-6: barely moved
    assert any(float((a[k] - fresh[k]).abs().max()) > 1e-2 for k in weights)  # and not a new random init
    r = _cli("segment", "train", "--out", str(tmp_path / "third"), "--init-from", str(tmp_path), *common)
    assert r.returncode == 1 and "error:" in r.stderr and "Traceback" not in r.stderr
    # --channels with --init-from grows the start by a level and records it
    grown = tmp_path / "grown"
    r = _cli("segment", "train", "--out", str(grown), "--init-from", str(first), "--channels", "8,16,32,64,128",
             *common)
    assert r.returncode == 0, r.stderr
    meta = json.loads((grown / "model.json").read_text())
    assert meta["channels"] == [8, 16, 32, 64, 128]
    assert meta["training"]["init_from"]["grown_from"] == [8, 16, 32, 64]
    assert load_segmenter_folder(grown).net.channels == [8, 16, 32, 64, 128]
    r = _cli("segment", "train", "--out", str(tmp_path / "bad"), "--init-from", str(first), "--channels", "16,32",
             *common)
    assert r.returncode == 1 and "cannot grow" in r.stderr and "Traceback" not in r.stderr
