from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from helpers import chromosome_array, write_png
from typer.testing import CliRunner

from chromobatch import CLASSES
from chromobatch.cli.main import app
from chromobatch.config import load_settings
from chromobatch.errors import EmptyCase
from chromobatch.karyotype.assign import assign_cell
from chromobatch.karyotype.iscn import cell_karyotype, summarise
from chromobatch.registry.register import load_predictor
from chromobatch.service.pipeline import process_case
from chromobatch.store import db

NORMAL = [c for c in CLASSES[:22] for _ in range(2)]


def _probs_for(labels: list[str], confidence: float = 0.9, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    p = rng.uniform(0.0, 1.0, (len(labels), 24))
    for i, lab in enumerate(labels):
        p[i] *= (1 - confidence) / p[i].sum()
        p[i, CLASSES.index(lab)] += confidence
    return p


def test_assignment_fixes_a_confusion_but_keeps_a_real_trisomy() -> None:
    labels = NORMAL + ["X", "Y"]
    p = _probs_for(labels)
    # one chromosome 5 looks a bit more like a 4 -> raw top-1 says three 4s and one 5
    i5 = labels.index("5")
    p[i5] = 0.0
    p[i5, CLASSES.index("4")], p[i5, CLASSES.index("5")] = 0.5, 0.4
    a = assign_cell(p)
    assert a.labels == labels and a.changed[i5]
    # a confident third 21 stays a trisomy
    t21 = labels + ["21"]
    a = assign_cell(_probs_for(t21, 0.95))
    assert a.labels == t21 and not any(a.changed)


def test_assignment_sex_chromosomes() -> None:
    # 47,XXY is kept when the scores say so; a Y that looks a bit like a 21 stays the Y of a 46,XY cell
    xxy = NORMAL + ["X", "X", "Y"]
    assert assign_cell(_probs_for(xxy, 0.95)).labels == xxy
    xy = NORMAL + ["X", "Y"]
    p = _probs_for(xy)
    iy = xy.index("Y")
    p[iy] = 0.0
    p[iy, CLASSES.index("21")], p[iy, CLASSES.index("Y")] = 0.55, 0.35
    assert assign_cell(p).labels == xy


def test_assignment_of_monosomy_leaves_a_slot_empty() -> None:
    labels = NORMAL + ["X"]
    assert assign_cell(_probs_for(labels)).labels == labels


@pytest.mark.parametrize("cells,expected", [
    ([NORMAL + ["X", "Y", "21"]] * 3, "47,XY,+21"),
    ([NORMAL + ["X"]] * 3, "45,X"),
    ([NORMAL + ["X", "X", "Y"]] * 3 + [NORMAL + ["X", "Y"]] * 7, "mos 47,XXY[3]/46,XY[7]"),
    ([NORMAL + ["X", "X", "13"]] * 2 + [NORMAL + ["X", "X"]] * 3, "mos 47,XX,+13[2]/46,XX[3]"),
    # every cell has 47 chromosomes but the extra one is identified differently: an unidentified marker
    ([NORMAL + ["X", "Y", "21"], NORMAL + ["X", "Y", "3"], NORMAL + ["X", "Y", "19"]], "47,XY,+mar"),
    # a gain in one cell only, a loss in two cells only: not clonal
    ([NORMAL + ["X", "Y", "18"]] + [NORMAL[:-1] + ["X", "Y"]] * 2 + [NORMAL + ["X", "Y"]] * 3, "46,XY"),
])
def test_case_karyotype_with_clonality_rule(cells: list[list[str]], expected: str) -> None:
    summary = summarise([cell_karyotype(f"c{i}", labels) for i, labels in enumerate(cells)])
    assert summary["karyotype"] == expected


def _case(root: Path, name: str, n_cells: int = 2, per_cell: int = 6) -> Path:
    case = root / name
    for c in range(n_cells):
        for k in range(per_cell):
            write_png(case / f"cell{c}" / f"k{k}.png", chromosome_array(15 + 7 * k, 8 + k % 3, seed=100 * c + k))
    return case


def test_process_case_stores_everything_once(sqlite_path: Path, tmp_path: Path, tiny_model_dir: Path) -> None:
    database = db.connect(sqlite_path)
    settings = load_settings({"model": str(tiny_model_dir)})
    predictor = load_predictor(database, settings)
    case = _case(tmp_path, "P1")
    result = process_case(database, case, predictor=predictor, settings=settings)
    assert (result.status, result.n_chromosomes, result.n_cells) == ("done", 12, 2)
    with database.session() as s:
        row = s.query(db.Case).one()
        assert row.status == "done" and row.karyotype == result.karyotype and row.model_version_id
        assert len(row.summary["cells"]) == 2 and row.summary["model"]["sha256"] == predictor.sha256
        preds = s.query(db.Prediction).all()
        assert len(preds) == 12
        for p in preds:
            assert len(p.probabilities) == 24 and abs(sum(p.probabilities) - 1) < 1e-3
            assert p.label in CLASSES and p.assigned_label in CLASSES
        mv = s.query(db.ModelVersion).one()
        assert mv.status == "active" and mv.sha256 == predictor.sha256
    again = process_case(database, case, predictor=predictor, settings=settings)
    assert again.status == "skipped"
    forced = process_case(database, case, predictor=predictor, settings=settings, force=True)
    assert forced.status == "done"
    with database.session() as s:
        assert s.query(db.Prediction).count() == 12 and s.query(db.Chromosome).count() == 12
    database.dispose()


def test_process_empty_case_fails_clearly(sqlite_path: Path, tmp_path: Path, tiny_model_dir: Path) -> None:
    database = db.connect(sqlite_path)
    settings = load_settings({"model": str(tiny_model_dir)})
    predictor = load_predictor(database, settings)
    case = tmp_path / "E1"
    (case / "c").mkdir(parents=True)
    (case / "c" / "a.png").write_text("no image")
    with pytest.raises(EmptyCase, match="c/a.png"):
        process_case(database, case, predictor=predictor, settings=settings)
    with database.session() as s:
        assert s.query(db.Case).one().status == "failed"
        assert s.query(db.Prediction).count() == 0
    database.dispose()


def test_process_cli(sqlite_path: Path, tmp_path: Path, tiny_model_dir: Path) -> None:
    case = _case(tmp_path, "CLI1", n_cells=1)
    runner = CliRunner()
    args = ["process", str(case), "--db", str(sqlite_path), "--model", str(tiny_model_dir),
            "--reports", str(tmp_path / "reports")]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "CLI1" in result.output and "done" in result.output
    result = runner.invoke(app, args)
    assert result.exit_code == 0 and "skipped" in result.output


@pytest.mark.postgres
def test_process_case_on_postgres(pg_url: str, tmp_path: Path, tiny_model_dir: Path) -> None:
    database = db.connect(pg_url, migrate=True)
    settings = load_settings({"model": str(tiny_model_dir)})
    predictor = load_predictor(database, settings)
    result = process_case(database, _case(tmp_path, "PG1"), predictor=predictor, settings=settings)
    assert result.n_chromosomes == 12
    with database.session() as s:
        assert s.query(db.Prediction).count() == 12
    database.dispose()


def test_crops_of_an_earlier_delivery_are_predicted_outside_the_write_transaction(
        sqlite_path: Path, tmp_path: Path, tiny_model_dir: Path) -> None:
    """A second delivery of a case (one new file) re-predicts the crops the first one stored (force): the
    forward pass over them must not hold the database's write lock, or every other worker waits for it."""
    import sqlite3

    settings = load_settings({"db": str(sqlite_path), "model": str(tiny_model_dir), "device": "cpu"})
    first = tmp_path / "one" / "CASE9"
    for k in range(4):
        write_png(first / "cell1" / f"k{k}.png", chromosome_array(20 + 5 * k, 8, seed=k))
    database = db.connect(sqlite_path)
    predictor = load_predictor(database, settings)
    process_case(database, first, predictor=predictor, settings=settings)
    second = tmp_path / "two" / "CASE9"
    write_png(second / "cell1" / "late.png", chromosome_array(44, 8, seed=9))

    calls: list[tuple[int, bool]] = []
    predict = predictor.predict

    def predict_and_try_to_write(crops, *args, **kwargs):  # type: ignore[no-untyped-def]
        other = sqlite3.connect(sqlite_path, timeout=0.05, isolation_level=None)
        try:
            other.execute("BEGIN IMMEDIATE")  # fails while another connection holds the write lock
            other.execute("ROLLBACK")
            free = True
        except sqlite3.OperationalError:
            free = False
        finally:
            other.close()
        calls.append((len(crops), free))
        return predict(crops, *args, **kwargs)

    predictor.predict = predict_and_try_to_write  # type: ignore[method-assign]
    result = process_case(database, second, predictor=predictor, settings=settings, force=True)
    database.dispose()
    assert result.status == "done" and result.n_chromosomes == 5
    assert (4, True) in calls  # the four stored crops, predicted while the database was free
    assert all(free for _, free in calls), calls
