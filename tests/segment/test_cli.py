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
    assert set(meta["postprocess"]) >= {"fg_threshold", "core_threshold", "min_seed"}
    assert (out / "history.json").is_file()
