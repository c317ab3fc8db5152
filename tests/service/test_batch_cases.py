"""Several waiting cases share one forward pass (settings.batch_cases); each still commits once on its own.

What a GPU needs to be fed by a queue of small cases; the code path is the same on the CPU, so it is tested
here with a tiny model (not measured on a GPU in this suite).
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from helpers import chromosome_array, write_png
from sqlalchemy import event, func, select

from chromobatch.config import load_settings
from chromobatch.registry.register import load_predictor
from chromobatch.service.batching import GPU_CASES_PER_PASS, cases_per_pass
from chromobatch.service.casefolders import resolve_paths
from chromobatch.service.pipeline import process_case
from chromobatch.service.worker import Worker
from chromobatch.store import db, jobs


def make_case(incoming: Path, name: str, seed: int) -> Path:
    case = incoming / name
    for c in range(2):
        for k in range(3):
            write_png(case / f"cell{c + 1:02d}" / f"c{k}.png",
                      chromosome_array(22 + 9 * k + c, 8, seed=seed + 10 * c + k))
    return case


def test_waiting_cases_are_predicted_in_one_pass_and_each_commits_once(tiny_model_dir: Path,
                                                                       layout: SimpleNamespace) -> None:
    settings = load_settings({"db": str(layout.root / "cases.sqlite"), "model": str(tiny_model_dir),
                              "runtime": "torch", "batch_cases": 4, "batch_size": 64})
    cases = [make_case(layout.incoming, f"CASE{i}", seed=100 * i) for i in range(3)]
    database = db.connect(settings.db)
    try:
        for case in cases:
            jobs.enqueue(database, case)
        worker = Worker(database, settings, resolve_paths(layout.incoming, settings))
        worker.load()
        assert worker.predictor.forward_calls == 0
        commits: list[int] = []
        event.listen(database.engine, "commit", lambda conn: commits.append(1))

        assert worker.step() is True  # one step takes the three waiting cases
        assert worker.predictor.forward_calls == 1, "18 crops of 3 cases: one batched forward pass"
        with database.session() as s:
            states = s.execute(select(db.Job.state, db.Job.attempts)).all()
            assert sorted(states) == [("done", 1)] * 3
            assert {c.case_id: c.status for c in s.query(db.Case)} == {f"CASE{i}": "done" for i in range(3)}
            n_chrom = s.scalar(select(func.count()).select_from(db.Chromosome))
            per_chrom = s.execute(select(db.Prediction.chromosome_id, func.count())
                                  .group_by(db.Prediction.chromosome_id)).all()
            assert n_chrom == 18 and len(per_chrom) == 18 and {n for _, n in per_chrom} == {1}
            batched = {c.sha256: p.probabilities
                       for p, c in s.query(db.Prediction, db.Chromosome).join(db.Chromosome)}
        assert commits, "the engine saw the transactions"
        assert not worker.predictor._primed, "every primed result was taken by its case"
        assert worker.step() is False  # nothing left: no case was processed twice

        # the same cases one by one, in a fresh database: the same probabilities
        single = db.connect(layout.root / "single.sqlite")
        try:
            alone_predictor = load_predictor(single, settings)
            for case in cases:
                process_case(single, layout.processed / case.name, predictor=alone_predictor, settings=settings)
            with single.session() as s:
                alone = {c.sha256: p.probabilities
                         for p, c in s.query(db.Prediction, db.Chromosome).join(db.Chromosome)}
        finally:
            single.dispose()
        assert alone.keys() == batched.keys()
        for k, v in alone.items():
            np.testing.assert_allclose(batched[k], v, atol=1e-5)
    finally:
        database.dispose()


def test_cases_per_pass_is_several_on_a_gpu_and_one_on_the_cpu() -> None:
    auto = load_settings({})
    on = lambda dev: SimpleNamespace(model=SimpleNamespace(device=torch.device(dev)))  # noqa: E731
    assert cases_per_pass(auto, on("cpu")) == 1
    assert cases_per_pass(auto, on("cuda")) == GPU_CASES_PER_PASS
    assert cases_per_pass(load_settings({"batch_cases": 3}), on("cpu")) == 3
