"""intake.metaphase: a crop is a crop, a metaphase is a metaphase, and what is neither is refused with a
reason a lab can act on (synthetic spreads and negatives of both stains; real data in the realdata test)."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np
import pytest
from helpers import chromosome_array

from chromobatch.intake.imaging import ImageRejected, decode_grey, detect_polarity, to_dark_on_light
from chromobatch.intake.metaphase import check_metaphase, classify_image
from chromobatch.synth import metaphase as synth

DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"


def normalised(img: np.ndarray) -> np.ndarray:
    return to_dark_on_light(img, detect_polarity(img))


@pytest.mark.parametrize("stain", ["G", "Q"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_spreads_are_metaphases_and_negatives_are_refused(stain: str, seed: int) -> None:
    rng = np.random.default_rng(seed)
    spread = normalised(synth.render_metaphase(rng, stain=stain).image)
    assert classify_image(spread) == "metaphase"
    check_metaphase(spread)  # does not raise
    with pytest.raises(ImageRejected, match="karyogram sheet"):
        check_metaphase(normalised(synth.render_karyogram_sheet(rng, stain=stain)))


@pytest.mark.parametrize(("render", "words"),
                         [("render_nucleus_only", "nucleus"), ("render_blank_field", "blank field")])
def test_nucleus_only_and_blank_fields_are_refused_at_intake_in_most_cases(render: str, words: str) -> None:
    """A nucleus that breaks into pale fragments, or a field with several clouds of debris, can pass intake;
    the segmenter's own check refuses those (segment.cut: fewer than 5 chromosomes found), so here most,
    not all, are refused already."""
    rng = np.random.default_rng(11)
    refused = 0
    for i in range(12):
        img = normalised(getattr(synth, render)(rng, stain="GQ"[i % 2]))
        try:
            check_metaphase(img)
        except ImageRejected as exc:
            assert words in str(exc)
            refused += 1
    assert refused >= 10


def test_crops_are_crops() -> None:
    for seed in range(5):
        crop = chromosome_array(60 + 10 * seed, 12, seed=seed)
        assert classify_image(crop) == "crop"


@pytest.mark.realdata
@pytest.mark.skipif(not DATA.is_dir(), reason="../shared/data is absent")
def test_real_metaphases_and_crops(tmp_path: Path) -> None:
    import tarfile

    with tarfile.open(DATA / "bioimlab-metaphase.tar.gz") as tar:
        members = [m for m in tar.getmembers() if m.name.endswith(".png")][:20]
        tar.extractall(tmp_path, members=members, filter="data")
    for m in members:
        img = normalised(decode_grey((tmp_path / m.name).read_bytes()))
        assert classify_image(img) == "metaphase", m.name
    with tarfile.open(DATA / "bioimlab.tar.gz") as tar:
        manifest = tar.extractfile("bioimlab/manifest.csv")
        assert manifest is not None
        rows = list(csv.DictReader(io.TextIOWrapper(manifest, encoding="utf-8")))[:60:3]
        for row in rows:
            f = tar.extractfile(f"bioimlab/{row['path']}")
            assert f is not None
            assert classify_image(normalised(decode_grey(f.read()))) == "crop", row["path"]
