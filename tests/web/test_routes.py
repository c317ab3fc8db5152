"""Route tests of the web review with FastAPI's TestClient over a real SQLite file: sign-in, roles, CSRF on
every state-changing route, bad input, unknown keys, a concurrent edit, sign-off and the re-rendered PDF."""

from __future__ import annotations

import io
import logging
import re
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from conftest import CASE_ID, PASSWORD, USERS
from PIL import Image
from typer.testing import CliRunner

from chromobatch.cli.main import app as cli_app
from chromobatch.review.labels import history
from chromobatch.store import db
from chromobatch.web import edits

JSON = {"Accept": "application/json"}


def _labels(database: db.Database) -> list[tuple[int, str, str | None, int | None]]:
    with database.session() as s:
        return [(r.chromosome_id, r.label, r.reviewer, r.supersedes_id)
                for r in s.query(db.Label).filter(db.Label.source == "reviewed").order_by(db.Label.id)]


def _newest_id(database: db.Database, chromosome: int) -> int | None:
    with database.session() as s:
        return s.query(db.Label.id).filter(db.Label.chromosome_id == chromosome).order_by(db.Label.id.desc()).limit(
            1).scalar()


def _routes(web: SimpleNamespace) -> dict[str, tuple[str, dict[str, Any]]]:
    """Every state-changing route but login/logout/search (which any signed-in role may use)."""
    chrom = next(iter(web.chroms))
    cell = web.cells[0]
    return {
        "labels": (f"/cases/{web.case_pk}/labels", {"chromosome": chrom, "label": "7",
                                                    "seen": _newest_id(web.database, chrom) or ""}),
        "not_chromosome": (f"/chromosomes/{chrom}/not-chromosome", {"value": "true"}),
        "cell_role": (f"/cells/{cell}/role", {"role": "analysed"}),
        "cell_karyotype": (f"/cells/{cell}/karyotype", {"karyotype": "46,XY"}),
        "case_karyotype": (f"/cases/{web.case_pk}/karyotype", {"karyotype": "47,XY,+21"}),
        "signoff": (f"/cases/{web.case_pk}/signoff", {"karyotype": "46,XY", "comment": "ok"}),
        "reopen": (f"/cases/{web.case_pk}/reopen", {"comment": "second look"}),
    }


def _state(web: SimpleNamespace) -> tuple[Any, ...]:
    """Everything a state-changing route could change, to prove a refused request changed nothing."""
    with web.database.session() as s:
        return (s.query(db.Label).count(), s.query(db.ReviewEvent).count(), s.query(db.SignOff).count(),
                s.query(db.Case.review_state, db.Case.reviewed_karyotype).one(),
                tuple(s.query(db.Cell.role, db.Cell.reviewed_karyotype).order_by(db.Cell.id)),
                s.query(db.Chromosome).filter(db.Chromosome.not_chromosome.is_(True)).count())


ROLES = list(USERS)
ROUTES = ["labels", "not_chromosome", "cell_role", "cell_karyotype", "case_karyotype", "signoff", "reopen"]


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("name", ROLES)
@pytest.mark.parametrize("with_csrf", [True, False])
def test_every_role_every_route_with_and_without_csrf(web: SimpleNamespace, client: Any, name: str, route: str,
                                                      with_csrf: bool) -> None:
    if route == "reopen":  # only a signed case can be reopened: alice signs it first
        edits.sign_off(web.database, web.case_pk, "alice", "46,XY", "first")
    url, data = _routes(web)[route]
    c = client(name)
    before = _state(web)
    headers = {"X-CSRF-Token": c.csrf} if with_csrf else {}
    r = c.post(url, data=data, headers={**JSON, **headers})
    role = USERS[name]
    if not with_csrf:
        assert r.status_code == 403 and "security token" in r.json()["error"]
        assert _state(web) == before
    elif role == "viewer":
        assert r.status_code == 403 and "viewer" in r.json()["error"]
        assert _state(web) == before
    elif route == "reopen" and name == "bob":  # a reviewer who did not sign may not reopen; an admin may
        assert r.status_code == 403 and "admin" in r.json()["error"]
        assert _state(web) == before
    else:
        assert r.status_code == 200, r.text
        assert r.json()["ok"] is True
        assert _state(web) != before


@pytest.mark.parametrize("name", ROLES)
@pytest.mark.parametrize("with_csrf", [True, False])
def test_search_and_logout_every_role_with_and_without_csrf(web: SimpleNamespace, client: Any, name: str,
                                                            with_csrf: bool) -> None:
    """The POSTs every signed-in role may make: they too need the CSRF token."""
    c = client(name)
    token = {"csrf_token": c.csrf} if with_csrf else {}
    r = c.post("/search", data={"q": "7731", **token})
    assert r.status_code == (200 if with_csrf else 403)
    r = c.post("/logout", data=token)
    assert r.status_code == (303 if with_csrf else 403)
    assert c.get("/").status_code == (303 if with_csrf else 200)  # signed out only with the token


@pytest.mark.parametrize("route", ROUTES)
def test_not_signed_in_is_refused(web: SimpleNamespace, client: Any, route: str) -> None:
    url, data = _routes(web)[route]
    c = client(None)
    before = _state(web)
    r = c.post(url, data={**data, "csrf_token": c.csrf}, headers=JSON)
    assert r.status_code == 401
    assert _state(web) == before


def test_pages_need_sign_in(web: SimpleNamespace, client: Any) -> None:
    c = client(None)
    chrom = next(iter(web.chroms))
    for url in ["/", f"/cases/{web.case_pk}", f"/cells/{web.cells[0]}", f"/chromosomes/{chrom}/image.png",
                f"/cases/{web.case_pk}/report.pdf"]:
        r = c.get(url)
        assert r.status_code == 303 and r.headers["location"] == "/login", url


def test_session_cookie_flags_and_security_headers(web: SimpleNamespace, client: Any) -> None:
    c = client(None)
    r = c.post("/login", data={"username": "vera", "password": PASSWORD, "csrf_token": c.csrf})
    cookie = r.headers["set-cookie"].lower()
    assert "httponly" in cookie and "samesite=strict" in cookie
    page = c.get("/")
    assert "script-src 'self'" in page.headers["content-security-policy"]
    assert page.headers["x-frame-options"] == "DENY"


def test_login_csrf_wrong_password_and_rate_limit(web: SimpleNamespace, client: Any) -> None:
    c = client(None)
    r = c.post("/login", data={"username": "alice", "password": PASSWORD})
    assert r.status_code == 403
    for _ in range(5):
        r = c.post("/login", data={"username": "alice", "password": "wrong password!", "csrf_token": c.csrf})
        assert r.status_code == 401 and "wrong user name or password" in r.text
    r = c.post("/login", data={"username": "alice", "password": PASSWORD, "csrf_token": c.csrf})
    assert r.status_code == 429 and "too many failed sign-ins" in r.text
    r = c.post("/login", data={"username": "nobody", "password": PASSWORD, "csrf_token": c.csrf})
    assert r.status_code == 401


def test_password_change_ends_sessions(web: SimpleNamespace, client: Any) -> None:
    from chromobatch.web.users import set_password

    c = client("bob")
    assert c.get("/").status_code == 200
    set_password(web.database, "bob", "another long password")
    assert c.get("/").status_code == 303


def test_disabled_user_cannot_sign_in_and_loses_its_session(web: SimpleNamespace, client: Any) -> None:
    from chromobatch.web.users import set_active

    c = client("bob")
    set_active(web.database, "bob", False)
    assert c.get("/").status_code == 303
    fresh = client(None)
    r = fresh.post("/login", data={"username": "bob", "password": PASSWORD, "csrf_token": fresh.csrf})
    assert r.status_code == 401


def test_case_list_case_and_cell_pages(web: SimpleNamespace, client: Any) -> None:
    c = client("vera")
    listing = c.get("/")
    assert listing.status_code == 200 and CASE_ID in listing.text and "unreviewed" in listing.text
    case = c.get(f"/cases/{web.case_pk}")
    assert case.status_code == 200 and "Sign off" not in case.text  # a viewer cannot sign
    cell = c.get(f"/cells/{web.cells[0]}")
    assert cell.status_code == 200
    ids = {int(x) for x in re.findall(r'data-id="(\d+)"', cell.text)}
    assert ids == {k for k, (cell_id, _) in web.chroms.items() if cell_id == web.cells[0]}
    slots = re.findall(r'data-slot="([^"]*)"', cell.text)
    assert slots[:5] == ["1", "2", "3", "4", "5"] and "X" in slots and "Y" in slots
    png = c.get(f"/chromosomes/{next(iter(ids))}/image.png")
    assert png.status_code == 200 and png.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(png.content)).size[1] > 10
    # no case ID (a patient identifier, maybe) and no file name in any URL of the pages
    for page in (listing.text, case.text, cell.text):
        for url in re.findall(r'(?:href|src|action)="([^"]*)"', page):
            assert CASE_ID not in url and ".png" not in url.replace("image.png", "").replace("metaphase.png", "")


def test_search_is_a_post_and_filters(web: SimpleNamespace, client: Any) -> None:
    c = client("vera")
    r = c.post("/search", data={"q": "7731", "csrf_token": c.csrf})
    assert r.status_code == 200 and CASE_ID in r.text and "1 case(s)" in r.text
    r = c.post("/search", data={"q": "NO-SUCH", "csrf_token": c.csrf})
    assert r.status_code == 200 and "0 case(s)" in r.text
    assert c.post("/search", data={"q": "7731"}).status_code == 403
    assert "0 case(s)" in c.get("/?state=signed").text


def test_bad_label_and_unknown_keys(web: SimpleNamespace, client: Any) -> None:
    c = client("alice")
    chrom = next(iter(web.chroms))
    h = {**JSON, "X-CSRF-Token": c.csrf}
    r = c.post(f"/cases/{web.case_pk}/labels", data={"chromosome": chrom, "label": "25"}, headers=h)
    assert r.status_code == 400 and "25" in r.json()["error"]
    r = c.post(f"/cases/{web.case_pk}/karyotype", data={"karyotype": "forty-six"}, headers=h)
    assert r.status_code == 400 and "ISCN" in r.json()["error"]
    assert _labels(web.database) == []
    r = c.post("/cases/99999/labels", data={"chromosome": chrom, "label": "7"}, headers=h)
    assert r.status_code == 404
    other_case_chrom = 99999
    r = c.post(f"/cases/{web.case_pk}/labels", data={"chromosome": other_case_chrom, "label": "7"}, headers=h)
    assert r.status_code == 404 and "no chromosome" in r.json()["error"]
    assert c.get("/cases/99999").status_code == 404
    assert c.get("/cells/99999").status_code == 404
    assert c.get("/chromosomes/99999/image.png").status_code == 404
    assert _labels(web.database) == []


def test_move_swap_and_history_cli(web: SimpleNamespace, client: Any) -> None:
    c = client("alice")
    h = {**JSON, "X-CSRF-Token": c.csrf}
    a, b = list(web.chroms)[:2]
    r = c.post(f"/cases/{web.case_pk}/labels", data={"chromosome": a, "label": "8", "seen": ""}, headers=h)
    assert r.status_code == 200 and r.json()["conflict"] is True  # the page saw no label: the import is newer
    assert "changed to 1 by an import" in r.json()["message"]
    a = list(web.chroms)[2]
    r = c.post(f"/cases/{web.case_pk}/labels", data={"chromosome": [a, b], "label": ["3", "8"], "seen": [
        _newest_id(web.database, a), _newest_id(web.database, b)]}, headers=h)
    assert r.status_code == 200
    rows = _labels(web.database)
    a0 = list(web.chroms)[0]
    assert [(x[0], x[1], x[2]) for x in rows] == [(a0, "8", "alice"), (a, "3", "alice"), (b, "8", "alice")]
    with web.database.session() as s:
        assert s.query(db.Case.review_state).scalar() == "in_review"
    out = CliRunner().invoke(cli_app, ["history", CASE_ID, "--db", str(web.path)])
    assert out.exit_code == 0, out.output
    assert "2 -> 3  [reviewed by alice]" in out.output and "1 -> 8  [reviewed by alice]" in out.output


def test_concurrent_edit_keeps_both_rows_and_tells_the_second(web: SimpleNamespace, client: Any) -> None:
    alice, bob = client("alice"), client("bob")
    chrom = next(iter(web.chroms))
    page_a, page_b = alice.get(f"/cells/{web.cells[0]}").text, bob.get(f"/cells/{web.cells[0]}").text
    seen = re.search(rf'data-id="{chrom}" data-label="[^"]*" data-seen="([^"]*)"', page_a)
    assert seen is not None
    assert re.search(rf'data-id="{chrom}" data-label="[^"]*" data-seen="{seen.group(1)}"', page_b)
    r1 = alice.post(f"/cases/{web.case_pk}/labels", data={"chromosome": chrom, "label": "7", "seen": seen.group(1)},
                    headers={**JSON, "X-CSRF-Token": alice.csrf})
    assert r1.status_code == 200 and r1.json()["conflict"] is False
    r2 = bob.post(f"/cases/{web.case_pk}/labels", data={"chromosome": chrom, "label": "9", "seen": seen.group(1)},
                  headers={**JSON, "X-CSRF-Token": bob.csrf})
    assert r2.status_code == 200 and r2.json()["conflict"] is True
    assert "changed to 7 by alice after you opened this page" in r2.json()["message"]
    rows = [x for x in _labels(web.database) if x[0] == chrom]
    assert [(x[1], x[2]) for x in rows] == [("7", "alice"), ("9", "bob")]
    trail = [e for e in history(web.database, CASE_ID) if e.reviewer in ("alice", "bob")]
    assert [(e.previous, e.label, e.reviewer) for e in trail] == [("1", "7", "alice"), ("7", "9", "bob")]
    # bob's page shows the message after its reload
    assert "changed to 7 by alice" in bob.get(f"/cells/{web.cells[0]}").text


def test_sign_off_rerenders_the_pdf_and_locks_the_case(web: SimpleNamespace, client: Any) -> None:
    from pypdf import PdfReader

    c = client("alice")
    h = {**JSON, "X-CSRF-Token": c.csrf}
    chrom = next(iter(web.chroms))
    c.post(f"/cases/{web.case_pk}/labels", data={"chromosome": chrom, "label": "7"}, headers=h)
    r = c.post(f"/cases/{web.case_pk}/signoff", data={"karyotype": "46,XY", "comment": "checked twice"}, headers=h)
    assert r.status_code == 200 and r.json()["report"] is True
    with web.database.session() as s:
        case = s.query(db.Case).one()
        assert case.review_state == "signed" and case.reviewed_karyotype == "46,XY"
        pdf = Path(case.report_path)
        sign = s.query(db.SignOff).one()
        assert (sign.action, sign.user_name, sign.karyotype, sign.comment) == ("signed", "alice", "46,XY",
                                                                              "checked twice")
    text = "\n".join(p.extract_text() for p in PdfReader(pdf).pages)
    assert "Signed by" in text and "alice" in text and "checked twice" in text
    assert re.search(r"Labels changed by review: 1\b", text) and web.chroms[chrom][1] in text
    assert c.get(f"/cases/{web.case_pk}/report.pdf").content[:5] == b"%PDF-"
    r = c.post(f"/cases/{web.case_pk}/labels", data={"chromosome": chrom, "label": "8"}, headers=h)
    assert r.status_code == 409 and "signed off" in r.json()["error"]
    r = c.post(f"/cases/{web.case_pk}/reopen", data={"comment": ""}, headers=h)
    assert r.status_code == 400
    r = c.post(f"/cases/{web.case_pk}/reopen", data={"comment": "typo in karyotype"}, headers=h)
    assert r.status_code == 200
    with web.database.session() as s:
        assert [x.action for x in s.query(db.SignOff).order_by(db.SignOff.id)] == ["signed", "reopened"]
        assert s.query(db.Case.review_state).scalar() == "in_review"
    text = "\n".join(p.extract_text() for p in PdfReader(pdf).pages)
    assert "reopened" in text


def test_not_a_chromosome_leaves_the_karyogram_and_is_recorded(web: SimpleNamespace, client: Any) -> None:
    c = client("adam")
    chrom = next(iter(web.chroms))
    r = c.post(f"/chromosomes/{chrom}/not-chromosome", data={"value": "true"},
               headers={**JSON, "X-CSRF-Token": c.csrf})
    assert r.status_code == 200
    page = c.get(f"/cells/{web.chroms[chrom][0]}").text
    trash = page.split('data-slot="not-a-chromosome"')[1]
    assert f'data-id="{chrom}"' in trash
    with web.database.session() as s:
        ev = s.query(db.ReviewEvent).one()
        assert (ev.kind, ev.value, ev.user_name, ev.chromosome_id) == ("not_chromosome", "true", "adam", chrom)


def test_metaphase_with_outlines(web: SimpleNamespace, client: Any) -> None:
    cell = web.cells[0]
    img = Image.new("L", (200, 150), 230)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    with web.database.session() as s:
        s.get(db.Cell, cell).image_png = buf.getvalue()
        for chrom in s.query(db.Chromosome).filter(db.Chromosome.cell_id == cell):
            chrom.polygon = [[10, 10], [40, 10], [40, 60], [10, 60]]
            chrom.box = [10, 10, 40, 60]
    c = client("vera")
    assert 'src="/cells/' in c.get(f"/cells/{cell}").text
    r = c.get(f"/cells/{cell}/metaphase.png")
    assert r.status_code == 200
    out = Image.open(io.BytesIO(r.content)).convert("RGB")
    colours = {c for _, c in out.getcolors(maxcolors=1 << 20)}
    assert colours & {(20, 90, 220), (210, 20, 20)}  # the outlines are drawn (blue, or red: low confidence)
    assert c.get(f"/cells/{web.cells[1]}/metaphase.png").status_code == 404


def test_logs_name_no_case_id(web: SimpleNamespace, client: Any, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    c = client("alice")
    h = {**JSON, "X-CSRF-Token": c.csrf}
    chrom = next(iter(web.chroms))
    c.get("/")
    c.get(f"/cases/{web.case_pk}")
    c.post("/search", data={"q": CASE_ID, "csrf_token": c.csrf})
    c.post(f"/cases/{web.case_pk}/labels", data={"chromosome": chrom, "label": "7"}, headers=h)
    c.post(f"/cases/{web.case_pk}/signoff", data={"karyotype": "46,XY", "comment": ""}, headers=h)
    web_lines = [r.getMessage() for r in caplog.records if r.name.startswith("chromobatch.web")]
    assert any("/cases/" in line for line in web_lines)
    assert all(CASE_ID not in line for line in web_lines), web_lines


def test_users_cli(tmp_path: Path) -> None:
    runner = CliRunner()
    dbfile = str(tmp_path / "u.sqlite")
    r = runner.invoke(cli_app, ["users", "add", "carol", "--role", "reviewer", "--password-stdin", "--db", dbfile],
                      input="a long enough password\n")
    assert r.exit_code == 0, r.output
    r = runner.invoke(cli_app, ["users", "add", "carol", "--password-stdin", "--db", dbfile], input="x" * 12 + "\n")
    assert r.exit_code == 1 and "already exists" in r.output
    r = runner.invoke(cli_app, ["users", "add", "dan", "--role", "boss", "--password-stdin", "--db", dbfile],
                      input="a long enough password\n")
    assert r.exit_code == 1 and "unknown role" in r.output
    r = runner.invoke(cli_app, ["users", "add", "dan", "--password-stdin", "--db", dbfile], input="short\n")
    assert r.exit_code == 1 and "at least" in r.output
    r = runner.invoke(cli_app, ["users", "passwd", "carol", "--password-stdin", "--db", dbfile],
                      input="another long password\n")
    assert r.exit_code == 0
    r = runner.invoke(cli_app, ["users", "list", "--db", dbfile])
    assert r.exit_code == 0 and re.search(r"carol\s+reviewer\s+active", r.output)
    database = db.connect(dbfile)
    with database.session() as s:
        stored = s.query(db.User.password_hash).scalar()
    database.dispose()
    assert stored.startswith("$argon2") and "another long password" not in stored


def test_cell_view_places_chromosomes_where_the_pdf_does(web: SimpleNamespace) -> None:
    """The page's layout (paint=False, cached upright) is the PDF's layout, chromosome for chromosome."""
    from chromobatch.report.layout import layout_karyogram
    from chromobatch.report.view import load_case_view, load_cell_crops
    from chromobatch.web.pages import cached_upright, cell_page

    view = load_case_view(web.database, CASE_ID)
    for cell in view.all_cells:
        crops = load_cell_crops(web.database, cell)
        pdf = layout_karyogram(crops)
        assert layout_karyogram(crops, paint=False, turn=cached_upright).placements == pdf.placements
        page = cell_page(web.database, cell.cell_id)
        shown = {t.pk: slot.name for row in page.rows for slot in row for t in slot.thumbs}
        shown.update({t.pk: "unclassified" for t in page.loose})
        assert shown == {p.chromosome_id: p.slot for p in pdf.placements}


def test_two_reviewers_at_the_same_moment(web: SimpleNamespace, client: Any) -> None:
    """Two reviewers relabelling the same chromosome from two threads at once: every change is a row, each
    row chains onto the one before (no fork), nothing fails."""
    import threading

    chrom = next(iter(web.chroms))
    users = {name: client(name) for name in ("alice", "bob")}
    errors: list[str] = []
    barrier = threading.Barrier(2)

    def work(name: str, label: str) -> None:
        c = users[name]
        barrier.wait()
        for _ in range(8):
            r = c.post(f"/cases/{web.case_pk}/labels", data={"chromosome": chrom, "label": label, "seen": ""},
                       headers={**JSON, "X-CSRF-Token": c.csrf})
            if r.status_code != 200:
                errors.append(f"{name}: {r.status_code} {r.text}")

    threads = [threading.Thread(target=work, args=(n, lab)) for n, lab in (("alice", "7"), ("bob", "9"))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert errors == []
    with web.database.session() as s:
        rows = s.query(db.Label).filter(db.Label.chromosome_id == chrom).order_by(db.Label.id).all()
    reviewed = [r for r in rows if r.source == "reviewed"]
    assert all(r.supersedes_id == prev.id for prev, r in zip(rows, rows[1:], strict=False))  # one chain
    # a repeat of the same reviewed label is no new row; every switch between alice's and bob's is one
    assert all(a.label != b.label for a, b in zip(reviewed, reviewed[1:], strict=False))
    assert {r.reviewer for r in reviewed} <= {"alice", "bob"} and len(reviewed) >= 1
