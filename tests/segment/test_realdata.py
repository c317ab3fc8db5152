"""The shipped segmenter on real annotated metaphases (bioimlab-metaphase test images): it reaches the F1
its model card documents for them. Skipped on a machine without ../shared/data."""

from __future__ import annotations

import csv
import io
import tarfile
from pathlib import Path

import pytest
from helpers import SHARED_DATA

from chromobatch.segment.evaluate import evaluate_segmenter
from chromobatch.segment.factory import DEFAULT_DIR, load_segmenter
from chromobatch.segment.learned import read_meta

TARBALL = SHARED_DATA / "bioimlab-metaphase.tar.gz"


def _extract(names: list[str], dest: Path) -> Path:
    root = dest / "bioimlab-metaphase"
    with tarfile.open(TARBALL) as tar:
        member = tar.extractfile("bioimlab-metaphase/manifest.csv")
        assert member is not None
        rows = [r for r in csv.DictReader(io.StringIO(member.read().decode())) if Path(r["image"]).stem in names]
        wanted = {f"bioimlab-metaphase/{r[k]}" for r in rows for k in ("image", "annotation")}
        tar.extractall(dest, members=[m for m in tar.getmembers() if m.name in wanted], filter="data")
    with (root / "manifest.csv").open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return root


@pytest.mark.realdata
@pytest.mark.skipif(not TARBALL.exists(), reason="../shared/data/bioimlab-metaphase.tar.gz absent")
def test_shipped_segmenter_reaches_its_documented_f1(tmp_path: Path) -> None:
    check = read_meta(DEFAULT_DIR).get("metrics", {}).get("test_check")
    assert check, f"{DEFAULT_DIR}/model.json documents no test_check (images and their F1)"
    root = _extract(list(check["images"]), tmp_path)
    res = evaluate_segmenter(load_segmenter("default", threads=1), root, "test")
    s = res["summary"]
    assert s["images"] == len(check["images"])
    assert s["f1"] >= check["f1"] - 0.01, (s, check)
    assert s["mean_abs_count_error"] <= check["mean_abs_count_error"] + 0.5, (s, check)
