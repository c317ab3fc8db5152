"""One active model per stain: a Q-band case is read by the Q-band model, a G-band case by the G-band one.

Tiny random models (they cannot classify; what is checked is which model read which case), registered with
their stain in model.json, and synthetic G- and Q-band cases from chromobatch.synth.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from pypdf import PdfReader
from typer.testing import CliRunner

from chromobatch.cli.main import app
from chromobatch.config import load_settings
from chromobatch.errors import ConfigError
from chromobatch.intake.scan import scan_case
from chromobatch.ml.factory import create_model
from chromobatch.ml.folders import load_model, save_model
from chromobatch.ml.preprocess import PreprocessSpec
from chromobatch.registry import register
from chromobatch.registry.promote import list_models, promote, rollback
from chromobatch.registry.register import load_predictor, register_model
from chromobatch.report.render import render_case_report
from chromobatch.service.pipeline import process_case
from chromobatch.store import db
from chromobatch.store.states import Stain
from chromobatch.synth.cases import generate_case


def _tiny(folder: Path, name: str, stain: str | None, seed: int) -> Path:
    torch.manual_seed(seed)
    net = create_model("test_resnet", embed_dim=16, input_size=32)
    meta = {"backbone": "test_resnet", "embed_dim": 16, "name": name, "version": "1",
            "preprocess": PreprocessSpec(mode="fit", input_size=32).to_dict()}
    if stain is not None:
        meta["stain"] = stain
    save_model(net, meta, folder / name)
    return folder / name


@pytest.fixture(scope="module")
def cases(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("cases")
    return {style: generate_case(out, f"CASE{style}", cells=1, fmt="png", karyotype="46,XY", seed=3, style=style)
            for style in "GQ"}


def _read_by(database: db.Database, case_id: str) -> set[int]:
    """The model version ids of the case's predictions (and the case's own)."""
    with database.session() as s:
        case = s.query(db.Case).filter_by(case_id=case_id).one()
        ids = {p.model_version_id for p in s.query(db.Prediction).join(db.Chromosome)
               .filter(db.Chromosome.case_pk == case.id)}
        assert case.model_version_id in ids and case.summary["model"]["stain"] in ("G", "Q")
        return ids


def test_synthetic_cases_show_their_stain(cases: dict[str, Path]) -> None:
    assert scan_case(cases["G"]).meta["polarity"] == "dark_on_light"
    assert scan_case(cases["Q"]).meta["polarity"] == "bright_on_dark"


def test_each_case_is_read_by_the_model_of_its_stain(sqlite_path: Path, tmp_path: Path,
                                                     cases: dict[str, Path]) -> None:
    database = db.connect(sqlite_path)
    g = register_model(database, load_model(_tiny(tmp_path, "gmodel", None, 1)))  # no stain recorded: G-band
    q = register_model(database, load_model(_tiny(tmp_path, "qmodel", "Q", 2)))
    assert g.status == q.status == "active"  # the first model of each stain becomes its active one
    assert (g.metrics["stain"], q.metrics["stain"]) == ("G", "Q")
    settings = load_settings({})
    predictor = load_predictor(database, settings)
    assert predictor.version_id == g.id
    for style in "QG":
        process_case(database, cases[style], predictor=predictor, settings=settings)
    assert _read_by(database, "CASEG") == {g.id}
    assert _read_by(database, "CASEQ") == {q.id}
    with database.session() as s:
        assert s.query(db.Case).filter_by(case_id="CASEQ").one().summary["model"]["stain"] == "Q"
    # the report names the model that read the cells and the stain it serves
    for case_id, band in (("CASEQ", "Q-band"), ("CASEG", "G-band")):
        text = " ".join(p.extract_text() for p in PdfReader(render_case_report(database, case_id,
                                                                                tmp_path / f"{case_id}.pdf").pdf).pages)
        assert f"all 1 (a {band} model)" in text and ("qmodel" if band == "Q-band" else "gmodel") in text, text

    # a new Q-band model promoted: the G-band model stays active, the old Q-band one is retired, and the next
    # Q-band case is read by the new one (the same predictor, as a watcher's worker keeps it)
    q2 = register_model(database, load_model(_tiny(tmp_path, "qmodel2", "Q", 3)))
    assert q2.status == "candidate"
    promote(database, str(q2.id))
    status = {r["name"]: (r["status"], r["stain"]) for r in list_models(database)}
    assert status == {"gmodel": ("active", "G"), "qmodel": ("retired", "Q"), "qmodel2": ("active", "Q")}
    process_case(database, cases["Q"], predictor=predictor, settings=settings, force=True)
    with database.session() as s:
        assert s.query(db.Case).filter_by(case_id="CASEQ").one().model_version_id == q2.id
    out = CliRunner().invoke(app, ["models", "list", "--db", str(sqlite_path)]).output
    lines = {line.split()[3]: line for line in out.splitlines()[1:]}
    assert "G-band" in lines["gmodel"] and "Q-band" in lines["qmodel2"] and "(Q-band)" in lines["qmodel"], out

    # rolling back the Q-band model leaves the G-band one alone
    old, new = rollback(database, stain="Q")
    assert (old.id, new.id) == (q2.id, q.id)
    status = {r["name"]: r["status"] for r in list_models(database)}
    assert status == {"gmodel": "active", "qmodel": "active", "qmodel2": "retired"}
    with pytest.raises(ConfigError, match="unknown stain"):
        rollback(database, stain="R")


def test_shipped_models_serve_their_stain_and_g_band_alone_still_works(
        sqlite_path: Path, tmp_path: Path, cases: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """An empty database: the shipped G-band model reads G-band cases as before; a Q-band case is read by
    the shipped Q-band model when there is one, else (logged) by the G-band model."""
    shipped_g = _tiny(tmp_path, "default", "G", 4)
    monkeypatch.setattr(register, "DEFAULT_MODEL_DIR", shipped_g)
    monkeypatch.setattr(register, "SHIPPED", {Stain.G: shipped_g, Stain.Q: tmp_path / "no-qband"})
    database = db.connect(sqlite_path)
    settings = load_settings({})
    predictor = load_predictor(database, settings)
    for style in "GQ":
        process_case(database, cases[style], predictor=predictor, settings=settings)
    assert _read_by(database, "CASEG") == _read_by(database, "CASEQ") == {predictor.version_id}

    shipped_q = _tiny(tmp_path, "qband", "Q", 5)
    monkeypatch.setattr(register, "SHIPPED", {Stain.G: shipped_g, Stain.Q: shipped_q})
    predictor = load_predictor(database, settings)
    process_case(database, cases["Q"], predictor=predictor, settings=settings, force=True)
    with database.session() as s:
        row = s.query(db.ModelVersion).filter_by(name="qband").one()
        assert (row.status, row.metrics["stain"]) == ("active", "Q")
        assert s.query(db.Case).filter_by(case_id="CASEQ").one().model_version_id == row.id
    process_case(database, cases["G"], predictor=predictor, settings=settings, force=True)
    assert _read_by(database, "CASEG") == {predictor.version_id}


def test_an_explicit_model_reads_every_stain(sqlite_path: Path, tmp_path: Path, cases: dict[str, Path]) -> None:
    database = db.connect(sqlite_path)
    q = register_model(database, load_model(_tiny(tmp_path, "qmodel", "Q", 2)))
    settings = load_settings({"model": str(_tiny(tmp_path, "pinned", None, 6))})
    predictor = load_predictor(database, settings)
    for style in "GQ":
        process_case(database, cases[style], predictor=predictor, settings=settings)
    assert _read_by(database, "CASEG") == _read_by(database, "CASEQ") == {predictor.version_id} != {q.id}


def test_g_band_retraining_leaves_q_band_crops_out(sqlite_path: Path, cases: dict[str, Path]) -> None:
    """Nightly retraining trains the G-band model: labelled Q-band chromosomes must not be in its data."""
    from chromobatch.intake.ingest import ingest_case
    from chromobatch.registry.retrain import build_training_set

    database = db.connect(sqlite_path)
    for style in "GQ":
        ingest_case(database, cases[style])  # labels.csv: imported labels
    every = build_training_set(database, val_fraction=0.0)
    g_only = build_training_set(database, val_fraction=0.0, polarity="dark_on_light")
    assert len(every.train) + len(every.val) == 92
    assert len(g_only.train) + len(g_only.val) == 46
    with database.session() as s:
        polarities = {p for (p,) in s.query(db.Chromosome.polarity).filter(
            db.Chromosome.id.in_([int(r.source.split(":")[1]) for r in g_only.train + g_only.val]))}
    assert polarities == {"dark_on_light"}
