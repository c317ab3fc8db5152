"""Defects found by the independent review of the web review (issue 16), each shown by a test that failed
before its fix."""

from __future__ import annotations

import logging
import re
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


def _signoff_form(html: str) -> dict[str, str]:
    form = html.split('id="signoff-form"')[1].split("</form>")[0]
    return dict(re.findall(r'<input type="hidden" name="([^"]+)" value="([^"]*)"', form))


def test_sign_off_refuses_changes_made_after_the_signer_opened_the_case(web: SimpleNamespace, client: Any) -> None:
    """Alice opens the case, Bob relabels a chromosome, Alice signs: she would sign labels she never saw. The
    case page's sign-off form carries the review state it showed; a sign-off over a newer state is refused
    (409, nothing signed) and the reloaded page signs."""
    alice, bob = client("alice"), client("bob")
    form = _signoff_form(alice.get(f"/cases/{web.case_pk}").text)
    assert form.get("seen"), "the sign-off form carries the state it showed"
    chrom = next(iter(web.chroms))
    r = bob.post(f"/cases/{web.case_pk}/labels", data={"chromosome": chrom, "label": "21"},
                 headers={"Accept": "application/json", "X-CSRF-Token": bob.csrf})
    assert r.status_code == 200
    r = alice.post(f"/cases/{web.case_pk}/signoff", data={**form, "karyotype": "46,XY", "comment": "ok"})
    assert r.status_code == 409 and "changed" in r.text, r.text
    with web.database.session() as s:
        assert s.query(db.SignOff).count() == 0
        assert s.query(db.Case.review_state).scalar() != "signed"
    form = _signoff_form(alice.get(f"/cases/{web.case_pk}").text)
    r = alice.post(f"/cases/{web.case_pk}/signoff", data={**form, "karyotype": "46,XY", "comment": "ok"})
    assert r.status_code == 303
    with web.database.session() as s:
        assert s.query(db.Case.review_state).scalar() == "signed"


def test_a_token_of_another_session_is_refused_and_downloads_need_sign_in(web: SimpleNamespace,
                                                                          client: Any) -> None:
    """Checks that held on review (no fix needed): a CSRF token is bound to its session (another user's valid
    token does not do), and the metaphase picture, like crops and reports, needs a signed-in user."""
    alice, bob = client("alice"), client("bob")
    chrom = next(iter(web.chroms))
    r = alice.post(f"/cases/{web.case_pk}/labels", data={"chromosome": chrom, "label": "7"},
                   headers={"Accept": "application/json", "X-CSRF-Token": bob.csrf})
    assert r.status_code == 403 and "security token" in r.json()["error"]
    r = alice.post(f"/cases/{web.case_pk}/signoff", data={"karyotype": "46,XY", "csrf_token": bob.csrf})
    assert r.status_code == 403
    with web.database.session() as s:
        assert s.query(db.Label).filter(db.Label.source == "reviewed").count() == 0
        assert s.query(db.SignOff).count() == 0
    anonymous = client(None)
    for url in (f"/cells/{web.cells[0]}/metaphase.png", f"/chromosomes/{chrom}/image.png",
                f"/cases/{web.case_pk}/report.pdf"):
        r = anonymous.get(url, headers={"Accept": "application/json"})
        assert r.status_code == 401, url


def test_a_session_cookie_copied_before_sign_out_no_longer_works(web: SimpleNamespace, client: Any) -> None:
    """Sessions are signed cookies kept by the browser: signing out cleared this browser's cookie, but a copy
    taken before (a shared workstation's profile, a stolen cookie) stayed signed in for the whole session
    lifetime. Sign-out now ends the session itself (in the serving process)."""
    from fastapi.testclient import TestClient

    c = client("alice")
    copied = c.cookies.get("chromobatch_session")
    assert copied
    assert c.post("/logout", data={"csrf_token": c.csrf}).status_code == 303
    with TestClient(web.app, follow_redirects=False) as other:
        other.cookies.set("chromobatch_session", copied)
        assert other.get("/").status_code == 303  # to the login page
        r = other.post(f"/cases/{web.case_pk}/karyotype", data={"karyotype": "46,XY", "csrf_token": c.csrf},
                       headers={"Accept": "application/json"})
        assert r.status_code == 401
    assert client("alice").get("/").status_code == 200  # signing in again works


def test_secure_cookies_option_marks_the_session_cookie_secure(web: SimpleNamespace) -> None:
    """`serve --secure-cookies` (behind the TLS proxy): the session cookie carries Secure, HttpOnly and
    SameSite=strict (held on review; the other cookie test runs without the option)."""
    from fastapi.testclient import TestClient

    from chromobatch.web.app import WebOptions, create_app

    app = create_app(web.database, WebOptions(reports_dir=web.reports, secret="s", cookie_secure=True))
    with TestClient(app, base_url="https://testserver", follow_redirects=False) as c:
        token = re.search(r'name="csrf-token" content="([^"]+)"', c.get("/login").text)
        assert token is not None
        r = c.post("/login", data={"username": "vera", "password": PASSWORD, "csrf_token": token.group(1)})
        assert r.status_code == 303
        cookie = r.headers["set-cookie"].lower()
    flags = {part.strip() for part in cookie.split(";")}
    assert {"secure", "httponly", "samesite=strict"} <= flags, cookie


@pytest.mark.parametrize("status", ["received", "ingested", "processing", "failed"])
def test_only_a_processed_case_can_be_signed(web: SimpleNamespace, client: Any, status: str) -> None:
    """A signature covers the karyograms the signer looked at: a case still being processed (a later delivery
    the watcher is adding), not processed yet, or failed has none to sign (it was signed all the same)."""
    with web.database.session() as s:
        s.query(db.Case).filter(db.Case.id == web.case_pk).update({"status": status})
    c = client("alice")
    r = c.post(f"/cases/{web.case_pk}/signoff", data={"karyotype": "46,XY", "comment": ""},
               headers={"Accept": "application/json", "X-CSRF-Token": c.csrf})
    assert r.status_code == 409 and status in r.json()["error"], r.text
    with web.database.session() as s:
        assert s.query(db.SignOff).count() == 0


def test_a_swap_names_two_different_chromosomes(web: SimpleNamespace, client: Any) -> None:
    """A swap posted with the same chromosome twice (labels 1 and 8) kept only the last label silently; it is a
    bad request now and writes nothing."""
    c = client("alice")
    chrom = next(iter(web.chroms))
    r = c.post(f"/cases/{web.case_pk}/labels", data={"chromosome": [chrom, chrom], "label": ["1", "8"]},
               headers={"Accept": "application/json", "X-CSRF-Token": c.csrf})
    assert r.status_code == 400 and "twice" in r.json()["error"], r.text
    with web.database.session() as s:
        assert s.query(db.Label).filter(db.Label.source == "reviewed").count() == 0
