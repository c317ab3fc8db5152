"""`train --db --signed-only`: only cases signed off in the web review train; "not a chromosome" never does."""

from __future__ import annotations

from types import SimpleNamespace

from typer.testing import CliRunner

from chromobatch.cli.main import app as cli_app
from chromobatch.registry.retrain import build_training_set
from chromobatch.web import edits


def test_signed_only_training_set(web: SimpleNamespace) -> None:
    everything = build_training_set(web.database, val_fraction=0.0)
    n = len(everything.train) + len(everything.val)
    assert n == len(web.chroms)  # every chromosome has an imported label
    assert len(build_training_set(web.database, val_fraction=0.0, signed_only=True).train) == 0
    chrom = next(iter(web.chroms))
    edits.mark_not_chromosome(web.database, chrom, "alice", True)
    edits.sign_off(web.database, web.case_pk, "alice", "46,XY", "")
    signed = build_training_set(web.database, val_fraction=0.0, signed_only=True)
    assert len(signed.train) == n - 1  # the signed case, less the object that is not a chromosome


def test_train_cli_signed_only_refuses_without_signed_cases(web: SimpleNamespace) -> None:
    r = CliRunner().invoke(cli_app, ["train", "--db", str(web.path), "--signed-only", "--steps", "1",
                                     "--models-dir", str(web.path.parent / "models")])
    assert r.exit_code == 1
    assert "no labelled chromosomes to train on in signed-off cases" in r.output
