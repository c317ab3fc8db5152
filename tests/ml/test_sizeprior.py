"""The size prior: ink measurement, per-class fitting, weight tuning, model folders, evaluate and the pipeline."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
from helpers import chromosome_array, write_png

from chromobatch import CLASSES, NUM_CLASSES
from chromobatch.config import load_settings
from chromobatch.errors import ModelError
from chromobatch.intake.imaging import decode_png
from chromobatch.ml.folders import attach_size_prior, load_model
from chromobatch.ml.sizeprior import SizePrior, cell_median_inks, ink, relative, relative_inks
from chromobatch.registry.register import load_predictor
from chromobatch.service.pipeline import process_case
from chromobatch.store import db
from chromobatch.training.calibrate import calibrate, fit, record_relative_inks, tune_weight
from chromobatch.training.evaluate import evaluate
from chromobatch.training.records import Record


def _bar(length: int, darkness: int = 100, width: int = 8) -> np.ndarray:
    img = np.full((length + 12, width + 12), 240, dtype=np.uint8)
    img[6:6 + length, 6:6 + width] = 240 - darkness
    return img


def test_ink_is_integrated_darkness_and_zero_when_blank() -> None:
    assert ink(_bar(40)) == pytest.approx(40 * 8 * 100, rel=0.02)
    assert ink(_bar(20)) == pytest.approx(ink(_bar(40)) / 2, rel=0.03)
    assert ink(_bar(40, darkness=50)) == pytest.approx(ink(_bar(40)) / 2, rel=0.03)
    assert ink(np.full((30, 30), 200, dtype=np.uint8)) == 0.0


def test_cell_medians_need_a_known_and_large_enough_cell() -> None:
    inks = [1.0, 2.0, 3.0, 10.0, 20.0, 0.0]
    cells = ["a", "a", "a", "b", "b", ""]
    assert cell_median_inks(inks, cells, min_cell=3) == [2.0, 2.0, 2.0, None, None, None]
    assert cell_median_inks(inks, cells, min_cell=2) == [2.0, 2.0, 2.0, 15.0, 15.0, None]
    rel = relative([4.0, 1.0, 0.0], [2.0, None, 2.0])
    assert rel[0] == pytest.approx(math.log(2.0)) and np.isnan(rel[1]) and np.isnan(rel[2])


def _prior(weight: float = 1.0, min_cell: int = 3) -> SizePrior:
    mean = [5.0] * NUM_CLASSES
    mean[0], mean[20] = 0.7, -0.7  # class "1" large, class "21" small
    return SizePrior(mean=tuple(mean), std=(0.2,) * NUM_CLASSES, weight=weight, min_cell=min_cell)


def test_apply_decides_a_tie_by_size_and_leaves_unmeasured_rows_alone() -> None:
    p = np.full((3, NUM_CLASSES), 0.01, dtype=np.float32)
    p[:, 0] = p[:, 20] = (1 - 0.01 * 22) / 2  # the image model cannot tell 1 from 21
    out = _prior().apply(p, np.array([0.7, -0.7, np.nan]))
    assert out[0].argmax() == 0 and out[1].argmax() == 20
    assert np.allclose(out.sum(1), 1, atol=1e-5)
    assert np.allclose(out[2], p[2])
    assert np.allclose(_prior(weight=0.0).apply(p, np.array([0.7, -0.7, 0.0])), p)


def test_round_trip_and_malformed_priors() -> None:
    prior = _prior(0.4)
    assert SizePrior.from_dict(json.loads(json.dumps(prior.to_dict()))) == prior
    with pytest.raises(ModelError, match="malformed"):
        SizePrior.from_dict({"mean": [0.0] * NUM_CLASSES})
    with pytest.raises(ModelError, match="24"):
        SizePrior(mean=(0.0,), std=(1.0,), weight=1.0)
    with pytest.raises(ModelError, match="invalid"):
        SizePrior(mean=(0.0,) * NUM_CLASSES, std=(0.0,) * NUM_CLASSES, weight=1.0)


def _size_records(n_cells: int, seed: int) -> list[Record]:
    """Cells holding one bar per class whose length grows with the class index (plus noise)."""
    rng = np.random.default_rng(seed)
    out = []
    for c in range(n_cells):
        for k in range(NUM_CLASSES):
            length = int(round(20 + 2 * k + rng.normal(0, 0.5)))
            out.append(Record(crop=_bar(length), label=k, patient=f"p{seed}", cell=f"c{c}"))
    return out


def test_fit_learns_the_size_order_and_tuning_picks_a_weight_only_when_it_helps() -> None:
    train = _size_records(6, seed=1)
    prior = fit(train, min_cell=10)
    assert prior is not None and prior.weight == 0.0
    assert all(a < b for a, b in zip(prior.mean, prior.mean[1:], strict=False))  # longer class, more ink
    val = _size_records(2, seed=2)
    rel = record_relative_inks(val, 10)
    y = np.array([r.label for r in val])
    uninformative = np.full((len(val), NUM_CLASSES), 1 / NUM_CLASSES, dtype=np.float32)
    weight, accs = tune_weight(prior, uninformative, rel, y)
    assert weight > 0 and accs[weight] > 0.8 and accs[0.0] < 0.1
    perfect = np.eye(NUM_CLASSES, dtype=np.float32)[y] * 0.9 + 0.1 / NUM_CLASSES
    assert tune_weight(prior, perfect, rel, y)[0] == 0.0  # nothing to gain: the prior stays off
    no_y = [r for r in train if r.label != NUM_CLASSES - 1]  # say, female cells only
    broad = fit(no_y, min_cell=10)
    assert broad is not None and broad.std[-1] > 5 * max(broad.std[:-1])  # Y: broad, neither favoured nor ruled out
    assert np.diff(broad.mean[:-1]) == pytest.approx(np.diff(prior.mean[:-1]), abs=0.01)  # cell median shifts only
    few = [r for r in train if r.label < NUM_CLASSES - 5]  # five classes missing: too little data
    assert fit(few, min_cell=10) is None


def test_a_prior_changes_the_model_identity_and_its_predictions(tiny_model_dir: Path, tmp_path: Path) -> None:
    folder = tmp_path / "m"
    shutil.copytree(tiny_model_dir, folder)
    plain = load_model(folder)
    attach_size_prior(folder, _prior(weight=5.0), {"weight": 5.0, "note": "test"})
    with_prior = load_model(folder)
    assert with_prior.size_prior == _prior(weight=5.0)
    assert with_prior.sha256 != plain.sha256  # the database must see another model version
    assert with_prior.meta["metrics"]["size_prior"]["note"] == "test"
    crops = [_bar(60), _bar(20)]
    base, _ = with_prior.predict(crops)
    assert np.allclose(base, plain.predict(crops)[0], atol=1e-6)  # no cell inks: the image model alone
    cell_ink = math.sqrt(ink(crops[0]) * ink(crops[1]))  # geometric middle: one big, one small
    probs, _ = with_prior.predict(crops, rel_inks=relative([ink(c) for c in crops], [cell_ink, cell_ink]))
    assert [CLASSES[i] for i in probs.argmax(1)] == ["1", "21"]
    attach_size_prior(folder, None, {"weight": 0.0})
    assert load_model(folder).sha256 == plain.sha256


def test_calibrate_and_evaluate_with_and_without_the_prior(tiny_model_dir: Path, tmp_path: Path) -> None:
    folder = tmp_path / "m"
    shutil.copytree(tiny_model_dir, folder)
    info = calibrate(folder, _size_records(6, seed=1), _size_records(2, seed=2))
    assert info["weight"] > 0 and info["val_accuracy_with"] > info["val_accuracy_without"]
    assert load_model(folder).size_prior is not None
    test = _size_records(2, seed=3)
    with_prior = evaluate(folder, test, split=None)
    without = evaluate(folder, test, split=None, size_prior=False)
    assert with_prior["model"]["size_prior"]["applied_to"] == len(test)
    assert without["model"]["size_prior"] is None
    assert with_prior["accuracy"] > without["accuracy"] + 0.3  # the random tiny model alone is near chance
    info = calibrate(folder, _size_records(6, seed=1), [])  # nothing to tune on: the prior is removed
    assert info["weight"] == 0.0 and load_model(folder).size_prior is None


def test_pipeline_uses_the_cell_for_the_size_prior(sqlite_path: Path, tmp_path: Path,
                                                   tiny_model_dir: Path) -> None:
    folder = tmp_path / "m"
    shutil.copytree(tiny_model_dir, folder)
    attach_size_prior(folder, _prior(weight=5.0), {"weight": 5.0})
    case = tmp_path / "CASE9"
    lengths = [70, 68, 72, 69, 71, 22, 21, 23, 20, 22]  # five large, five small in one cell
    for i, length in enumerate(lengths):
        write_png(case / "cell01" / f"c{i:02d}.png", chromosome_array(length, 10, seed=i))
    write_png(case / "cell02" / "lonely.png", chromosome_array(70, 10, seed=99))  # too small a cell
    database = db.connect(sqlite_path)
    settings = load_settings({"model": str(folder)})
    predictor = load_predictor(database, settings)
    result = process_case(database, case, predictor=predictor, settings=settings)
    assert result.status == "done" and result.n_chromosomes == 11
    with database.session() as s:
        rows = (s.query(db.Prediction, db.Chromosome, db.Cell)
                .join(db.Chromosome, db.Prediction.chromosome_id == db.Chromosome.id)
                .join(db.Cell, db.Chromosome.cell_id == db.Cell.id).all())
        top = {(cell.name, chrom.height): pred.label for pred, chrom, cell in rows}
        lonely = [(pred.probabilities, decode_png(chrom.crop_png)) for pred, chrom, cell in rows
                  if cell.name == "cell02"]
    big = {label for (cell, h), label in top.items() if cell == "cell01" and h >= 60}
    small = {label for (cell, h), label in top.items() if cell == "cell01" and h < 60}
    assert big == {"1"} and small == {"21"}
    plain = load_model(tiny_model_dir)
    image_only = plain.predict([lonely[0][1]])[0][0]
    assert np.allclose(lonely[0][0], image_only, atol=1e-5)  # no cell median: image model only
    # A later delivery of the same case: one crop gone from the folder, one new. The cell median still counts
    # the stored crop, and the new large crop is measured against the whole cell.
    (case / "cell01" / "c00.png").unlink()
    write_png(case / "cell01" / "c10.png", chromosome_array(70, 10, seed=10))
    again = process_case(database, case, predictor=predictor, settings=settings)
    assert again.status == "done" and again.n_chromosomes == 12
    with database.session() as s:
        preds = (s.query(db.Prediction.label).join(db.Chromosome, db.Prediction.chromosome_id == db.Chromosome.id)
                 .join(db.Cell, db.Chromosome.cell_id == db.Cell.id)
                 .filter(db.Chromosome.height >= 60, db.Cell.name == "cell01").all())
    assert sorted(label for (label,) in preds) == ["1"] * 6
    # Another model version (same weights, another prior weight) on that delivery: the stored crop c00, no
    # longer in the folder, is predicted from the database, measured against its whole cell too.
    folder2 = tmp_path / "m2"
    shutil.copytree(folder, folder2)
    attach_size_prior(folder2, _prior(weight=4.0), {"weight": 4.0})
    settings2 = load_settings({"model": str(folder2)})
    predictor2 = load_predictor(database, settings2)
    assert predictor2.version_id != predictor.version_id  # same name and version in model.json, other identity
    assert predictor2.version_name == predictor.version_name + "+" + predictor2.sha256[:8]
    third = process_case(database, case, predictor=predictor2, settings=settings2)
    assert third.status == "done" and third.n_chromosomes == 12
    with database.session() as s:
        stored = {chrom.sha256: (decode_png(chrom.crop_png), pred)
                  for pred, chrom, cell in (s.query(db.Prediction, db.Chromosome, db.Cell)
                                            .join(db.Chromosome, db.Prediction.chromosome_id == db.Chromosome.id)
                                            .join(db.Cell, db.Chromosome.cell_id == db.Cell.id)
                                            .filter(db.Cell.name == "cell01",
                                                    db.Prediction.model_version_id == predictor2.version_id))}
        c00_sha = next(ch.sha256 for ch in s.query(db.Chromosome) if ch.source_file.endswith("c00.png"))
    assert len(stored) == 11 and c00_sha in stored
    shas = list(stored)
    rel = dict(zip(shas, relative_inks([ink(stored[h][0]) for h in shas], ["cell01"] * 11), strict=True))
    m2 = load_model(folder2)
    expected = m2.predict([stored[c00_sha][0]], rel_inks=[rel[c00_sha]])[0][0]
    image_only = m2.predict([stored[c00_sha][0]])[0][0]
    got = np.asarray(stored[c00_sha][1].probabilities)
    assert np.allclose(got, expected, atol=1e-5) and not np.allclose(got, image_only, atol=1e-3)
    database.dispose()
