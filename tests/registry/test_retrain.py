"""Training from the database, the model registry, the training lock, and the whole review -> retrain ->
promote -> running-watcher-switches loop end to end."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from helpers import chromosome_array
from typer.testing import CliRunner

from chromobatch import CLASSES
from chromobatch.cli.main import app
from chromobatch.config import load_settings
from chromobatch.errors import LOCKED_EXIT_CODE, TrainingLocked
from chromobatch.intake.imaging import encode_png
from chromobatch.ml.factory import create_model
from chromobatch.ml.folders import load_model, save_model
from chromobatch.ml.preprocess import PreprocessSpec
from chromobatch.registry.lock import TrainingLock, default_lock_path
from chromobatch.registry.promote import list_models, promote, rollback
from chromobatch.registry.register import load_predictor, register_model
from chromobatch.registry.retrain import (
    RetrainOptions,
    assign_validation,
    build_training_set,
    decide,
    patient_key,
    retrain,
    warm_start_config,
)
from chromobatch.service.pipeline import process_case
from chromobatch.store import db
from chromobatch.training.config import TrainConfig

TINY_TRAIN = ["--backbone", "test_resnet", "--input-size", "32", "--embed-dim", "32", "--steps", "4",
              "--val-every", "2", "--device", "cpu", "--no-progress"]


def tiny_config() -> TrainConfig:
    return TrainConfig(backbone="test_resnet", input_size=32, embed_dim=32, steps=4, val_every=2, warmup_steps=1,
                       device="cpu")


def add_case(s: Any, case_id: str, *, patient: str | None = None, cells: int = 1, per_class: int = 2,
             labels: list[tuple[str, ...]] | None = None, seed: int = 0) -> db.Case:
    """A case with `cells` cells holding `per_class` chromosomes of every class, each with an imported label."""
    case = db.Case(case_id=case_id, source_path=f"/x/{case_id}", status="done",
                   meta={"dicom": {"PatientID": patient}} if patient else {})
    s.add(case)
    s.flush()
    for c in range(cells):
        cell = db.Cell(case_pk=case.id, name=f"cell{c}", index=c)
        s.add(cell)
        s.flush()
        for k, cls in enumerate(CLASSES):
            for j in range(per_class):
                crop = chromosome_array(14 + k, 8, seed=seed + 100 * c + 10 * k + j)
                chrom = db.Chromosome(case_pk=case.id, cell_id=cell.id, source_file=f"cell{c}/{cls}_{j}.png",
                                      sha256=f"{case_id}-{c}-{k}-{j}", width=crop.shape[1], height=crop.shape[0],
                                      polarity="dark_on_light", crop_png=encode_png(crop))
                s.add(chrom)
                s.flush()
                s.add(db.Label(chromosome_id=chrom.id, label=cls, source="imported"))
    return case


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def database(request: pytest.FixtureRequest, sqlite_path: Path) -> Iterator[db.Database]:
    """A migrated database: a SQLite file, or a throw-away PostgreSQL database (skipped when unreachable)."""
    if request.param == "sqlite":
        target = str(sqlite_path)
    else:
        target = request.getfixturevalue("pg_url")
        db.upgrade(target)
    database = db.connect(target)
    yield database
    database.dispose()


# --------------------------------------------------------------------------------------------------
# Training set and split


def test_patient_key_and_split_are_stable() -> None:
    assert patient_key("C1", {"dicom": {"PatientID": "P-7"}}) == "pid:P-7"
    assert patient_key("C1", {}) == "case:C1"
    keys = {f"case:C{i}" for i in range(2000)}
    val = assign_validation(keys, 0.2)
    assert val == assign_validation(set(sorted(keys, reverse=True)), 0.2)  # order-independent
    assert 0.17 < len(val) / len(keys) < 0.23
    assert assign_validation(keys, 0.2, salt="other") != val
    two = {"case:A", "case:B"}
    assert len(assign_validation(two, 0.2)) == 1 and len(assign_validation(two, 0.99)) == 1
    assert assign_validation({"case:A"}, 0.2) <= {"case:A"}


def test_build_training_set_newest_label_patient_split(database: db.Database) -> None:
    with database.session() as s:
        add_case(s, "A1", patient="SECRET-1")
        add_case(s, "A2", patient="SECRET-1", seed=1)  # same patient, second specimen
        for i in range(8):
            add_case(s, f"B{i}", seed=10 + i)
        # B0: one chromosome corrected by a reviewer, one label superseded by an unknown-source row
        chroms = s.query(db.Chromosome).join(db.Case).filter(db.Case.case_id == "B0").order_by(db.Chromosome.id)
        first, second = chroms[0], chroms[1]
        old = s.query(db.Label).filter_by(chromosome_id=first.id).one()
        s.add(db.Label(chromosome_id=first.id, label="22", source="reviewed", reviewer="r", supersedes_id=old.id))
        old2 = s.query(db.Label).filter_by(chromosome_id=second.id).one()
        s.add(db.Label(chromosome_id=second.id, label="1", source="predicted", supersedes_id=old2.id))
        # an unlabelled chromosome is not training data
        cell = s.query(db.Cell).filter_by(case_pk=first.case_pk).first()
        s.add(db.Chromosome(case_pk=first.case_pk, cell_id=cell.id, source_file="extra.png", sha256="extra",
                            width=10, height=10, polarity="dark_on_light", crop_png=encode_png(chromosome_array())))
    ts = build_training_set(database, val_fraction=0.3)
    per_case = 2 * len(CLASSES)
    assert len(ts.train) + len(ts.val) == 10 * per_case - 1
    assert ts.n_cases == 10 and ts.n_patients == 9 and 1 <= ts.n_val_patients < 9
    assert ts.label_sources == {"imported": 10 * per_case - 2, "reviewed": 1}
    corrected = [r for r in ts.train + ts.val if r.source == f"chromosome:{first.id}"]
    assert [CLASSES[r.label] for r in corrected] == ["22"]
    assert all(r.split == "" for r in ts.train) and all(r.split == "val" for r in ts.val)
    assert {r.patient for r in ts.train}.isdisjoint({r.patient for r in ts.val})
    same = {r.patient for r in ts.train + ts.val if r.cell in {str(c) for c in _cell_ids(database, "A1", "A2")}}
    assert len(same) == 1 and "SECRET" not in next(iter(same))  # one pseudonymous patient for both cases
    assert ts.train[0].crop.dtype.name == "uint8" and ts.train[0].crop.ndim == 2


def _cell_ids(database: db.Database, *case_ids: str) -> list[int]:
    with database.session() as s:
        return [c for (c,) in s.query(db.Cell.id).join(db.Case).filter(db.Case.case_id.in_(case_ids))]


# --------------------------------------------------------------------------------------------------
# Decision, registry, lock


def test_decide_rules() -> None:
    cand, act = {"accuracy": 0.895, "n": 100}, {"accuracy": 0.90, "n": 100}
    assert decide(cand, act, margin=1.0, n_patients=3)[0] is True
    promoted, reason = decide(cand, act, margin=0.0, n_patients=3)
    assert promoted is False and "0.8950 vs active 0.9000" in reason and "margin 0 points" in reason
    assert decide({"accuracy": 0.9, "n": 1}, act, 0.0)[0] is True  # a tie promotes (newer data)
    assert decide(None, act, 5.0)[0] is False
    assert decide(cand, None, 0.0)[0] is True
    assert decide(cand, act, 5.0, active_error="gone")[0] is False


def _fake_version(s: Any, name: str, status: str, promoted: bool = True) -> db.ModelVersion:
    row = db.ModelVersion(name=name, version=name, backbone="x", file=f"/m/{name}", sha256=name * 8, metrics={},
                          status=status, promoted_at=db.utcnow() if promoted else None)
    s.add(row)
    s.flush()
    return row


def test_promote_and_rollback_keep_history(sqlite_path: Path) -> None:
    database = db.connect(sqlite_path)
    with database.session() as s:
        _fake_version(s, "a", "active")
        _fake_version(s, "b", "candidate", promoted=False)
        _fake_version(s, "c", "candidate", promoted=False)
    promote(database, "b", reason="better on 2026 cases")
    promote(database, "3")  # by id
    statuses = {r["name"]: r["status"] for r in list_models(database)}
    assert statuses == {"a": "retired", "b": "retired", "c": "active"}
    old, new = rollback(database, reason="c misreads 21s")
    assert (old.name, new.name) == ("c", "b")
    rows = {r["name"]: r for r in list_models(database)}
    assert {k: r["status"] for k, r in rows.items()} == {"a": "retired", "b": "active", "c": "retired"}
    events = [h["event"] for h in rows["b"]["history"]]
    assert events == ["promoted", "retired", "rollback"]
    assert [h["event"] for h in rows["c"]["history"]] == ["promoted", "retired", "rolled_back"]
    assert rows["b"]["reason"] == "c misreads 21s"
    old, new = rollback(database)  # again: back to c (the one active before b)
    assert (old.name, new.name) == ("b", "c")
    with pytest.raises(Exception, match="already the active one"):
        promote(database, "c")
    with pytest.raises(Exception, match="no model version"):
        promote(database, "zzz")
    runner = CliRunner()
    r = runner.invoke(app, ["models", "list", "--db", str(sqlite_path)])
    assert r.exit_code == 0 and "active" in r.output and "retired" in r.output, r.output
    r = runner.invoke(app, ["models", "rollback", "--db", str(sqlite_path)])
    assert r.exit_code == 0 and "is active again" in r.output, r.output
    r = runner.invoke(app, ["models", "promote", "nope", "--db", str(sqlite_path)])
    assert r.exit_code == 1 and "no model version" in r.output
    database.dispose()


def test_lock_second_run_exits_with_its_own_code(sqlite_path: Path, tmp_path: Path) -> None:
    database = db.connect(sqlite_path)
    lock_path = default_lock_path(database, tmp_path / "models")
    assert lock_path == Path(str(sqlite_path.resolve()) + ".train.lock")
    with TrainingLock(lock_path):
        with pytest.raises(TrainingLocked):
            TrainingLock(lock_path).acquire()
        r = CliRunner().invoke(app, ["train", "--db", str(sqlite_path), "--models-dir", str(tmp_path / "models"),
                                     *TINY_TRAIN])
        assert r.exit_code == LOCKED_EXIT_CODE, r.output
        assert "another training run holds the lock" in r.output
    TrainingLock(lock_path).acquire().release()  # free again
    r = CliRunner().invoke(app, ["train", *TINY_TRAIN])
    assert r.exit_code == 1 and "give either --data" in r.output
    database.dispose()


@pytest.mark.postgres
def test_postgres_advisory_lock_across_hosts(pg_url: str, tmp_path: Path) -> None:
    """Two hosts have two lock files; the database's advisory lock still lets only one train."""
    db.upgrade(pg_url)
    database = db.connect(pg_url)
    other = db.connect(pg_url)
    try:
        assert default_lock_path(database, tmp_path) == tmp_path / ".train.lock"
        with TrainingLock(tmp_path / "host1.lock", database):
            with pytest.raises(TrainingLocked, match="advisory"):
                TrainingLock(tmp_path / "host2.lock", other).acquire()
        TrainingLock(tmp_path / "host2.lock", other).acquire().release()
    finally:
        database.dispose()
        other.dispose()


# --------------------------------------------------------------------------------------------------
# Promotion decisions with a stand-in trainer (fast: no real training)


@pytest.fixture
def fake_training(monkeypatch: pytest.MonkeyPatch) -> dict[str, float]:
    """train() writes a fresh random tiny model; _evaluate returns the accuracies set in the returned dict."""
    from chromobatch.registry import retrain as retrain_mod

    scores: dict[str, float] = {"candidate": 0.5, "active": 0.5}
    seeds = iter(range(100, 200))

    def fake_train(config: TrainConfig, data: list, out: Path, *, progress: bool = False) -> SimpleNamespace:
        assert data and all(r.split == "" for r in data)
        torch.manual_seed(next(seeds))
        net = create_model("test_resnet", embed_dim=32, input_size=32)
        save_model(net, {"backbone": "test_resnet", "embed_dim": 32,
                         "preprocess": PreprocessSpec(mode="fixed", input_size=32, scale=0.4).to_dict()}, out)
        (out / "checkpoint").mkdir()
        return SimpleNamespace(steps_done=config.steps, best_val_accuracy=0.5, seconds=0.1)

    def fake_eval(folder: str | Path, records: list, device: str) -> dict[str, Any]:
        assert records and all(r.split == "val" for r in records)
        which = "candidate" if "registry" in str(folder) else "active"
        return {"n": len(records), "accuracy": scores[which]}

    monkeypatch.setattr("chromobatch.training.loop.train", fake_train)
    monkeypatch.setattr(retrain_mod, "_evaluate", fake_eval)
    return scores


def test_candidate_kept_or_promoted_by_margin(database: db.Database, tmp_path: Path, tiny_model_dir: Path,
                                              fake_training: dict[str, float]) -> None:
    with database.session() as s:
        for i in range(6):
            add_case(s, f"K{i}", seed=i, per_class=1)
    first = register_model(database, load_model(tiny_model_dir))
    assert first.status == "active"
    opts = RetrainOptions(models_dir=tmp_path / "registry", margin=1.0)

    fake_training.update(candidate=0.80, active=0.90)
    kept = retrain(database, tiny_config(), opts)
    assert kept is not None and not kept.promoted and kept.status == "candidate"
    assert "not promoted" in kept.reason and "0.8000 vs active 0.9000" in kept.reason
    assert not (kept.model_dir / "checkpoint").exists()
    meta = load_model(kept.model_dir).meta
    assert meta["name"] == "chromobatch" and meta["version"] == kept.version
    assert "SECRET" not in (kept.model_dir / "model.json").read_text()

    time.sleep(1.05)  # versions are timestamps to the second
    fake_training.update(candidate=0.895, active=0.90)
    promoted = retrain(database, tiny_config(), opts)
    assert promoted is not None and promoted.promoted, promoted.reason
    rows = {r["id"]: r for r in list_models(database)}
    assert rows[first.id]["status"] == "retired"
    assert rows[kept.version_id]["status"] == "candidate" and rows[kept.version_id]["reason"] == kept.reason
    assert rows[promoted.version_id]["status"] == "active"
    assert rows[promoted.version_id]["val_accuracy"] == 0.895
    with database.session() as s:
        row = s.get(db.ModelVersion, promoted.version_id)
        assert row.metrics["active_val"]["accuracy"] == 0.90 and row.metrics["data"]["val_patients"] >= 1
        assert [h["event"] for h in row.metrics["history"]] == ["registered", "promoted"]

    time.sleep(1.05)
    fake_training.update(candidate=0.99, active=0.5)
    only = retrain(database, tiny_config(), RetrainOptions(models_dir=tmp_path / "registry", promote=False))
    assert only is not None and only.status == "candidate" and "--no-promote" in only.reason


def test_warm_start_fine_tunes_the_active_model(sqlite_path: Path, tmp_path: Path, tiny_model_dir: Path) -> None:
    database = db.connect(str(sqlite_path))
    try:
        with database.session() as s:
            for i in range(4):
                add_case(s, f"W{i}", seed=i, per_class=1)
        active = register_model(database, load_model(tiny_model_dir))
        # Architecture knobs that differ from the active model are overridden by it (else nothing would load).
        cfg = TrainConfig(backbone="resnet18", input_size=48, embed_dim=16, steps=2, val_every=2, warmup_steps=1,
                          device="cpu")  # fmt: skip
        res = retrain(database, cfg, RetrainOptions(models_dir=tmp_path / "registry", warm_start=True))
        assert res is not None
        meta = load_model(res.model_dir).meta
        assert meta["backbone"] == "test_resnet" and meta["embed_dim"] == 32
        assert meta["preprocess"] == load_model(tiny_model_dir).meta["preprocess"]  # scale 0.4 kept
        assert meta["training"]["init_from"]["sha256"] == active.sha256
        assert meta["training"]["database"]["warm_start_from"] == str(tiny_model_dir)
        assert meta["training"]["loss"]["lambda_con"] == 0.0  # a fine-tune defaults to plain (few-label study)
        assert warm_start_config(database, replace(cfg, lambda_con=0.3)).loss_config().lambda_con == 0.3
    finally:
        database.dispose()


def test_cli_warm_start_needs_db(tmp_path: Path) -> None:
    res = CliRunner().invoke(app, ["train", "--data", str(tmp_path), "--out", str(tmp_path / "o"), "--warm-start"])
    assert res.exit_code == 1 and "--warm-start is for --db" in res.output


# --------------------------------------------------------------------------------------------------
# End to end: process -> review -> train --db -> promoted -> a running watcher uses it for the next case


def _wait(cond: Callable[[], bool], timeout: float, what: str, log: Path | None = None) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return
        time.sleep(0.3)
    tail = log.read_text(errors="replace")[-3000:] if log is not None and log.exists() else ""
    raise AssertionError(f"timed out waiting for {what}\n{tail}")


def _case_model(database: db.Database, case_id: str) -> int | None:
    with database.session() as s:
        case = s.query(db.Case).filter_by(case_id=case_id).one_or_none()
        return case.model_version_id if case is not None and case.status == "done" else None


def _drop(src: Path, incoming: Path) -> None:
    (src / "READY").write_text("")
    src.rename(incoming / src.name)


@pytest.fixture
def watcher_proc() -> Iterator[list[subprocess.Popen[bytes]]]:
    procs: list[subprocess.Popen[bytes]] = []
    yield procs
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait()


@pytest.mark.slow
def test_end_to_end_review_retrain_promote_watcher_switches(
        sqlite_path: Path, tmp_path: Path, tiny_model_dir: Path,
        watcher_proc: list[subprocess.Popen[bytes]]) -> None:
    from chromobatch.synth.cases import generate_case

    cases = tmp_path / "cases"
    for i, kt in enumerate(["46,XY", "46,XY", "46,XX", "46,XY"]):
        generate_case(cases, f"P{i}", cells=2, fmt="png", karyotype=kt, seed=1)
    for name in ("W1", "W2"):
        generate_case(tmp_path / "later", name, cells=1, fmt="png", karyotype="46,XX", seed=2)

    # 1. process the cases with the first (tiny) model, which becomes the active one
    database = db.connect(sqlite_path)
    settings = load_settings({"model": str(tiny_model_dir), "device": "cpu"})
    predictor = load_predictor(database, settings)
    for i in range(4):
        process_case(database, cases / f"P{i}", predictor=predictor, settings=settings)
    first_id = predictor.version_id

    # 2. review: accept one case, correct single labels, import a corrections file
    runner = CliRunner()
    dbarg = ["--db", str(sqlite_path)]
    r = runner.invoke(app, ["review", "P0", "--accept", "--reviewer", "alice", *dbarg])
    assert r.exit_code == 0 and "92 label(s) recorded" in r.output, r.output
    r = runner.invoke(app, ["label", "P1", "--cell", "1", "--chromosome", "3", "--as", "22", "--reviewer", "bob",
                            *dbarg])
    assert r.exit_code == 0, r.output
    (tmp_path / "fix.csv").write_text("cell,chromosome,label\n2,1,1\ncell02,2,2\n")
    r = runner.invoke(app, ["label", "P2", "--import", str(tmp_path / "fix.csv"), "--reviewer", "carol", *dbarg])
    assert r.exit_code == 0, r.output

    # 3. a running watcher on the database's active model (not pinned to a folder)
    incoming = tmp_path / "site" / "incoming"
    incoming.mkdir(parents=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHROMOBATCH_")}
    env.update(CHROMOBATCH_DEVICE="cpu", CHROMOBATCH_QUIET_SECONDS="0.5", OMP_NUM_THREADS="1")
    log = tmp_path / "watch.log"
    with log.open("wb") as fh:
        proc = subprocess.Popen([sys.executable, "-m", "chromobatch.cli", "watch", str(incoming), *dbarg,
                                 "--poll", "0.3"], env=env, cwd=tmp_path, stdout=fh, stderr=subprocess.STDOUT)
    watcher_proc.append(proc)
    _drop(tmp_path / "later" / "W1", incoming)
    _wait(lambda: _case_model(database, "W1") is not None, 120, "the watcher to process W1", log)
    assert _case_model(database, "W1") == first_id

    # 4. nightly training from the database: candidate registered and (margin 100 points) promoted
    r = runner.invoke(app, ["train", *dbarg, "--models-dir", str(tmp_path / "registry"), "--margin", "100",
                            *TINY_TRAIN])
    assert r.exit_code == 0, r.output
    assert "active - promoted: validation accuracy" in r.output, r.output
    with database.session() as s:
        new = s.query(db.ModelVersion).filter_by(status="active").one()
        old = s.get(db.ModelVersion, first_id)
        assert new.id != first_id and old.status == "retired"
        assert new.metrics["data"]["label_sources"]["reviewed"] >= 92 + 1 + 2
        assert new.metrics["val"]["n"] > 0 and new.metrics["active_val"]["model_version_id"] == first_id
        assert Path(new.file).parent == tmp_path / "registry"
        new_id = new.id

    # 5. the same watcher process takes the promoted model for its next case, without a restart
    _drop(tmp_path / "later" / "W2", incoming)
    _wait(lambda: _case_model(database, "W2") is not None, 120, "the watcher to process W2", log)
    assert proc.poll() is None, "the watcher restarted or died"
    assert _case_model(database, "W2") == new_id
    assert "switching to model chromobatch" in log.read_text()

    # 6. rollback re-activates the first model (the watcher would switch back before its next case)
    r = runner.invoke(app, ["models", "rollback", *dbarg])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["models", "list", *dbarg])
    lines = {line.split()[0]: line for line in r.output.splitlines()[1:]}
    assert " active " in lines[str(first_id)] and " retired " in lines[str(new_id)], r.output
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 0, log.read_text()[-3000:]
    assert "Traceback" not in log.read_text()
    database.dispose()
