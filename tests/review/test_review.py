"""Review loop: labels by cell/number/file, corrections CSV, accepting predictions, the audit trail."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from chromobatch.cli.main import app
from chromobatch.config import load_settings
from chromobatch.errors import (
    CaseNotFound,
    CellNotFound,
    ChromobatchError,
    ChromosomeNotFound,
    CorrectionsFileError,
    InvalidLabel,
    ReviewError,
)
from chromobatch.intake.ingest import ingest_case
from chromobatch.registry.register import load_predictor
from chromobatch.review.labels import (
    accept_predictions,
    chromosome_overview,
    history,
    import_corrections,
    set_label,
)
from chromobatch.service.pipeline import process_case
from chromobatch.store import db


def _labels(database: db.Database) -> list[db.Label]:
    with database.session() as s:
        return s.query(db.Label).order_by(db.Label.id).all()


@pytest.fixture
def ingested(sqlite_path: Path, simple_case: Path) -> Iterator[db.Database]:
    """CASE001: cells cell01, cell02; files c00..c03 labelled 1, 1, 21, Y (imported from labels.csv)."""
    database = db.connect(sqlite_path)
    ingest_case(database, simple_case)
    yield database
    database.dispose()


def test_set_label_keeps_the_previous_row_and_who_changed_it(ingested: db.Database) -> None:
    before = len(_labels(ingested))
    change = set_label(ingested, "CASE001", cell="1", chromosome="3", label="chr22", reviewer="alice")
    assert (change.cell, change.number, change.source_file) == ("cell01", 3, "cell01/c02.png")
    assert (change.previous, change.previous_source, change.label, change.changed) == ("21", "imported", "22", True)
    rows = _labels(ingested)
    assert len(rows) == before + 1
    new = rows[-1]
    old = next(r for r in rows if r.id == new.supersedes_id)
    assert (new.source, new.reviewer, new.label) == ("reviewed", "alice", "22")
    assert (old.source, old.label) == ("imported", "21")  # never overwritten
    # the same reviewed label again is a no-op; a new value chains onto the reviewed row
    assert not set_label(ingested, "CASE001", cell="cell01", chromosome="c02.png", label="22", reviewer="bob").changed
    again = set_label(ingested, "CASE001", cell=None, chromosome="cell01/c02.png", label="21", reviewer="bob")
    assert (again.previous, again.previous_source, again.changed) == ("22", "reviewed", True)
    assert _labels(ingested)[-1].supersedes_id == new.id
    trail = [(e.previous, e.label, e.source, e.reviewer) for e in history(ingested, "CASE001")
             if e.source_file == "cell01/c02.png"]
    assert trail == [(None, "21", "imported", None), ("21", "22", "reviewed", "alice"),
                     ("22", "21", "reviewed", "bob")]


@pytest.mark.parametrize("kwargs,error", [
    ({"case_id": "NOPE", "cell": "1", "chromosome": "1"}, CaseNotFound),
    ({"cell": "3", "chromosome": "1"}, CellNotFound),
    ({"cell": "cell09", "chromosome": "1"}, CellNotFound),
    ({"cell": "1", "chromosome": "5"}, ChromosomeNotFound),
    ({"cell": "1", "chromosome": "nothere.png"}, ChromosomeNotFound),
    ({"cell": None, "chromosome": "2"}, ChromosomeNotFound),
    ({"cell": "1", "chromosome": "1", "label": "Z"}, InvalidLabel),
    ({"cell": "1", "chromosome": "1", "reviewer": "  "}, ReviewError),
])
def test_unknown_things_are_clear_errors(ingested: db.Database, kwargs: dict, error: type) -> None:
    args = {"case_id": "CASE001", "label": "5", "reviewer": "alice", **kwargs}
    before = len(_labels(ingested))
    with pytest.raises(error) as info:
        set_label(ingested, args.pop("case_id"), **args)
    assert isinstance(info.value, ChromobatchError) and info.value.hint
    assert len(_labels(ingested)) == before


def test_corrections_csv_both_formats_and_all_or_nothing(ingested: db.Database, tmp_path: Path) -> None:
    by_file = tmp_path / "by_file.csv"
    by_file.write_text("file,label\ncell01/c00.png,2\ncell02/c03.png,X\n")
    changes = import_corrections(ingested, "CASE001", by_file, reviewer="carol")
    assert sorted((c.source_file, c.previous, c.label) for c in changes) == [
        ("cell01/c00.png", "1", "2"), ("cell02/c03.png", "Y", "X")]
    by_number = tmp_path / "by_number.csv"
    by_number.write_text("cell,chromosome,label\ncell02,1,3\n2,2,4\n")
    assert [c.label for c in import_corrections(ingested, "CASE001", by_number, reviewer="carol")] == ["3", "4"]
    before = len(_labels(ingested))
    bad = tmp_path / "bad.csv"
    bad.write_text("cell,chromosome,label\n1,1,5\n1,7,6\n")
    with pytest.raises(ChromosomeNotFound, match="line 3"):
        import_corrections(ingested, "CASE001", bad, reviewer="carol")
    bad.write_text("chrom,label\n1,5\n")
    with pytest.raises(CorrectionsFileError, match="header"):
        import_corrections(ingested, "CASE001", bad, reviewer="carol")
    assert len(_labels(ingested)) == before


def test_accept_confirms_predictions_but_not_reviewed_labels(ingested: db.Database, simple_case: Path,
                                                            tiny_model_dir: Path) -> None:
    with pytest.raises(ReviewError, match="no predictions"):
        accept_predictions(ingested, "CASE001", reviewer="dave")
    settings = load_settings({"model": str(tiny_model_dir), "device": "cpu"})
    process_case(ingested, simple_case, predictor=load_predictor(ingested, settings), settings=settings)
    set_label(ingested, "CASE001", cell="2", chromosome="4", label="X", reviewer="erin")
    changes = accept_predictions(ingested, "CASE001", reviewer="dave")
    assert len(changes) == 7 and all(c.changed for c in changes)
    with ingested.session() as s:
        assigned = {c.source_file: p.assigned_label for c, p in
                    s.query(db.Chromosome, db.Prediction).join(db.Prediction)}
    overview = {ref.source_file: (label, source) for ref, label, source in chromosome_overview(ingested, "CASE001")}
    assert overview["cell02/c03.png"] == ("X", "reviewed")  # erin's label stays
    for c in changes:
        assert overview[c.source_file] == (assigned[c.source_file], "reviewed")
    assert accept_predictions(ingested, "CASE001", reviewer="dave") == []
    reviewers = {r.reviewer for r in _labels(ingested) if r.source == "reviewed"}
    assert reviewers == {"dave", "erin"}


def test_cli_label_review_history(sqlite_path: Path, simple_case: Path, tmp_path: Path,
                                  tiny_model_dir: Path) -> None:
    runner = CliRunner()
    database = db.connect(sqlite_path)
    settings = load_settings({"model": str(tiny_model_dir), "device": "cpu"})
    process_case(database, simple_case, predictor=load_predictor(database, settings), settings=settings)
    database.dispose()
    r = runner.invoke(app, ["label", "CASE001", "--cell", "1", "--chromosome", "3", "--as", "22",
                            "--reviewer", "alice", "--db", str(sqlite_path)])
    assert r.exit_code == 0, r.output
    assert "21 -> 22" in r.output
    corrections = tmp_path / "fix.csv"
    corrections.write_text("file,label\ncell02/c00.png,2\n")
    r = runner.invoke(app, ["label", "CASE001", "--import", str(corrections), "--reviewer", "bob",
                            "--db", str(sqlite_path)])
    assert r.exit_code == 0 and "1 label(s) recorded" in r.output, r.output
    r = runner.invoke(app, ["review", "CASE001", "--accept", "--reviewer", "carol", "--db", str(sqlite_path)])
    assert r.exit_code == 0 and "6 label(s) recorded" in r.output, r.output
    r = runner.invoke(app, ["review", "CASE001", "--db", str(sqlite_path)])
    assert r.exit_code == 0 and "cell 1 (cell01) #3" in r.output and "reviewed" in r.output, r.output
    for cmd in (["history", "CASE001"], ["label", "CASE001", "--history"]):
        r = runner.invoke(app, [*cmd, "--db", str(sqlite_path)])
        assert r.exit_code == 0, r.output
        assert "cell01/c02.png: 21 -> 22  [reviewed by alice]" in r.output
        assert "[reviewed by carol]" in r.output and "[imported]" in r.output
    r = runner.invoke(app, ["label", "CASE001", "--cell", "1", "--chromosome", "9", "--as", "2", "--reviewer", "x",
                            "--db", str(sqlite_path)])
    assert r.exit_code == 1 and "no chromosome number 9" in r.output and "hint:" in r.output
    r = runner.invoke(app, ["label", "CASE001", "--chromosome", "cell01/c00.png", "--as", "2", "--db",
                            str(sqlite_path)])
    assert r.exit_code == 1 and "reviewer" in r.output
    r = runner.invoke(app, ["history", "NOPE", "--db", str(sqlite_path)])
    assert r.exit_code == 1 and "case NOPE not found" in r.output


@pytest.mark.postgres
def test_postgres_concurrent_reviewers_chain_not_fork(pg_url: str, simple_case: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Two reviewers changing one chromosome at once: the rows form one chain (the case row is locked)."""
    import time

    from chromobatch.review import labels as review

    newest = review._newest_labels

    def slow_newest(s, case):  # widen the read-then-write window so an unlocked version would fork
        found = newest(s, case)
        time.sleep(0.05)
        return found

    monkeypatch.setattr(review, "_newest_labels", slow_newest)
    db.upgrade(pg_url)
    database = db.connect(pg_url)
    try:
        ingest_case(database, simple_case)
        errors: list[BaseException] = []

        def change(label: str, who: str) -> None:
            try:
                for _ in range(5):
                    set_label(database, "CASE001", cell="1", chromosome="1", label=label, reviewer=who)
            except BaseException as exc:  # noqa: BLE001 - re-raised in the main thread
                errors.append(exc)

        threads = [threading.Thread(target=change, args=(lab, who)) for lab, who in (("2", "a"), ("3", "b"))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors
        with database.session() as s:
            chrom = s.query(db.Chromosome).filter_by(source_file="cell01/c00.png").one()
            rows = s.query(db.Label).filter_by(chromosome_id=chrom.id).order_by(db.Label.id).all()
        supersedes = [r.supersedes_id for r in rows[1:]]
        assert supersedes == [r.id for r in rows[:-1]]  # each row replaces the one right before it
        assert [e.label for e in history(database, "CASE001") if e.source_file == "cell01/c00.png"][0] == "1"
    finally:
        database.dispose()
