"""Defects found by the independent review of the web review (issue 16), each shown by a test that failed
before its fix."""

from __future__ import annotations

import logging
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from conftest import CASE_ID, PASSWORD
from typer.testing import CliRunner

from chromobatch.cli.main import app as cli_app
from chromobatch.store import db
from chromobatch.web import edits


def test_login_rate_limit_holds_for_the_name_as_authenticated(web: SimpleNamespace, client: Any) -> None:
    """The limiter keyed on the name as typed while sign-in strips it: 'alice ' (or ' alice', 'alice  ', ...)
    was a fresh account to the limiter but the same account to the password check, so the per-account limit
    could be walked around one space at a time."""
    c = client(None)
    for _ in range(5):
        r = c.post("/login", data={"username": "alice", "password": "wrong password!", "csrf_token": c.csrf})
        assert r.status_code == 401
    for variant in ("alice ", " alice", "\talice\t"):
        r = c.post("/login", data={"username": variant, "password": PASSWORD, "csrf_token": c.csrf})
        assert r.status_code == 429, (variant, r.status_code)


def test_cli_cannot_change_labels_of_a_signed_case(web: SimpleNamespace, tmp_path: Path) -> None:
    """A signed case is read-only until reopened, from the CLI too: `chromobatch label`, `label --import` and
    `review --accept` wrote reviewed labels under a sign-off (the report then showed a signature over labels
    the signer never saw)."""
    edits.sign_off(web.database, web.case_pk, "alice", "46,XY", "done")
    before = _label_rows(web.database)
    runner = CliRunner()
    db_args = ["--db", str(web.path), "--reviewer", "carol"]
    r = runner.invoke(cli_app, ["label", CASE_ID, "--cell", "1", "--chromosome", "1", "--as", "8", *db_args])
    assert r.exit_code == 1 and "signed off" in r.output, r.output
    corrections = tmp_path / "fix.csv"
    corrections.write_text("cell,chromosome,label\n1,1,8\n")
    r = runner.invoke(cli_app, ["label", CASE_ID, "--import", str(corrections), *db_args])
    assert r.exit_code == 1 and "signed off" in r.output, r.output
    r = runner.invoke(cli_app, ["review", CASE_ID, "--accept", *db_args])
    assert r.exit_code == 1 and "signed off" in r.output, r.output
    assert _label_rows(web.database) == before
    # reopened, the same command works again
    edits.reopen(web.database, web.case_pk, "alice", "one more look", admin=False)
    r = runner.invoke(cli_app, ["label", CASE_ID, "--cell", "1", "--chromosome", "1", "--as", "8", *db_args])
    assert r.exit_code == 0, r.output
    assert len(_label_rows(web.database)) == len(before) + 1


def _label_rows(database: db.Database) -> list[tuple[int, int, str]]:
    with database.session() as s:
        return [(r.id, r.chromosome_id, r.label) for r in s.query(db.Label).order_by(db.Label.id)]


def test_no_log_line_of_any_logger_names_the_case_id(web: SimpleNamespace, client: Any,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    """The serve process logs every logger's lines, not only chromobatch.web's: sign-off and reopening
    render the PDF again, and the report code's own log line named the case ID (test_logs_name_no_case_id
    looked at chromobatch.web lines only)."""
    caplog.set_level(logging.DEBUG)
    c = client("alice")
    h = {"Accept": "application/json", "X-CSRF-Token": c.csrf}
    chrom = next(iter(web.chroms))
    c.post("/search", data={"q": CASE_ID, "csrf_token": c.csrf})
    c.post(f"/cases/{web.case_pk}/labels", data={"chromosome": chrom, "label": "7"}, headers=h)
    r = c.post(f"/cases/{web.case_pk}/signoff", data={"karyotype": "46,XY", "comment": ""}, headers=h)
    assert r.status_code == 200 and r.json()["report"] is True
    r = c.post(f"/cases/{web.case_pk}/reopen", data={"comment": "again"}, headers=h)
    assert r.status_code == 200
    lines = [f"{r.name}: {r.getMessage()}" for r in caplog.records]
    assert any("chromobatch.report" in line for line in lines)  # the report code did log
    assert [line for line in lines if CASE_ID in line] == []
