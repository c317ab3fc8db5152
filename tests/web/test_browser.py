"""The web review in a real browser: Debian's Chromium driven by Playwright's Python API against a real
`chromobatch serve` subprocess. Signs in, opens a processed case, drags a chromosome to another class, moves
one by keyboard, signs the case off, then checks the Label rows, the audit trail (`chromobatch history`) and
the re-rendered PDF.

Skips with a reason when Chromium or Playwright is missing (`.ci/run` installs Chromium best-effort). Never
runs `playwright install` (that downloads a browser). CHROMOBATCH_SCREENSHOTS=DIR keeps the screenshots of
the case list, the cell view and the sign-off there (docs/img is made this way).
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
from browser import drag
from conftest import CASE_ID, PASSWORD, copy_sqlite
from typer.testing import CliRunner

from chromobatch.cli.main import app as cli_app
from chromobatch.store import db

CHROMIUM = next((p for p in (os.environ.get("CHROMIUM"), shutil.which("chromium"), shutil.which("chromium-browser"))
                 if p), None)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def server(template_db: Path, tmp_path: Path) -> Iterator[SimpleNamespace]:
    """`chromobatch serve` in a subprocess over a copy of the template database."""
    path = tmp_path / "cases.sqlite"
    copy_sqlite(template_db, path)
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHROMOBATCH_")}
    env.update(CHROMOBATCH_WEB_SECRET="browser-test-secret", OMP_NUM_THREADS="1")
    log = (tmp_path / "serve.log").open("wb")
    proc = subprocess.Popen([sys.executable, "-m", "chromobatch.cli", "serve", "--port", str(port), "--db", str(path),
                             "--reports", str(tmp_path / "reports")], env=env, cwd=tmp_path, stdout=log,
                            stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            break
        except OSError:
            if proc.poll() is not None:
                break
            time.sleep(0.2)
    else:
        proc.kill()
    if proc.poll() is not None:
        pytest.fail("chromobatch serve did not start:\n" + (tmp_path / "serve.log").read_text())
    try:
        yield SimpleNamespace(url=f"http://127.0.0.1:{port}", path=path, log=tmp_path / "serve.log", proc=proc)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def _slot_of(page: object, chrom_id: str) -> str:
    return page.eval_on_selector(f'img.chrom[data-id="{chrom_id}"]',  # type: ignore[attr-defined]
                                 "el => el.closest('.slot').dataset.slot")


@pytest.mark.skipif(CHROMIUM is None, reason="Chromium not installed (Debian: apt-get install chromium)")
def test_sign_in_drag_keyboard_sign_off(server: SimpleNamespace, tmp_path: Path) -> None:
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright (Python) not installed")
    shots = Path(os.environ.get("CHROMOBATCH_SCREENSHOTS") or tmp_path / "shots")
    shots.mkdir(parents=True, exist_ok=True)
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            page.goto(server.url + "/")
            assert page.url.endswith("/login")
            page.fill('input[name="username"]', "alice")
            page.fill('input[name="password"]', PASSWORD)
            page.click('button[type="submit"]')
            page.wait_for_selector("table.cases")
            assert CASE_ID in page.inner_text("table.cases")
            page.screenshot(path=str(shots / "web-case-list.png"), full_page=True)

            page.click(f"text={CASE_ID}")
            page.wait_for_selector("#cells")
            assert "unreviewed" in page.inner_text("h1")
            page.click("#cells a >> nth=0")
            page.wait_for_selector("#karyogram")
            assert CASE_ID not in page.url

            # drag the first chromosome of the karyogram to class 7
            first = page.locator("#karyogram img.chrom").first
            chrom = first.get_attribute("data-id")
            assert chrom is not None
            before = _slot_of(page, chrom)
            target = "7" if before != "7" else "8"
            with page.expect_navigation():
                drag(page, first, page.locator(f'.slot[data-slot="{target}"] .num'))
            page.wait_for_selector("#karyogram")
            assert _slot_of(page, chrom) == target
            assert "changed_by_review" in (page.get_attribute(f'img.chrom[data-id="{chrom}"]', "class") or "") or \
                before == target

            # another by keyboard: select one, ArrowRight to the next, type its class, Enter
            order = page.eval_on_selector_all("#karyogram img.chrom", "els => els.map(e => e.dataset.id)")
            start = next(k for k, i in enumerate(order[:-1]) if i != chrom and order[k + 1] != chrom)
            other_id = order[start + 1]
            key_target = "X" if _slot_of(page, other_id) != "X" else "9"
            page.locator(f'img.chrom[data-id="{order[start]}"]').click()
            page.keyboard.press("ArrowRight")
            assert "selected" in (page.get_attribute(f'img.chrom[data-id="{other_id}"]', "class") or "")
            with page.expect_navigation():
                page.keyboard.type(key_target.lower())
                page.keyboard.press("Enter")
            page.wait_for_selector("#karyogram")
            assert _slot_of(page, other_id) == key_target
            page.screenshot(path=str(shots / "web-cell-view.png"), full_page=True)

            # sign off from the case page
            page.click("text=case " + CASE_ID)
            page.wait_for_selector("#signoff-form")
            page.fill("#signoff-karyotype", "46,XY")
            page.fill("#signoff-comment", "checked in the browser test")
            page.click("#signoff-button")
            page.wait_for_selector(".signoff")
            assert "signed" in page.inner_text("h1")
            assert "signed by alice" in page.inner_text(".signoff")
            page.screenshot(path=str(shots / "web-sign-off.png"), full_page=True)
        finally:
            browser.close()

    database = db.connect(server.path)
    try:
        with database.session() as s:
            rows = {r.chromosome_id: (r.label, r.reviewer) for r in
                    s.query(db.Label).filter(db.Label.source == "reviewed").order_by(db.Label.id)}
            case = s.query(db.Case).one()
            assert case.review_state == "signed"
            pdf = Path(case.report_path or "")
            predicted = {pr.chromosome_id: pr.assigned_label or pr.label for pr in s.query(db.Prediction)}
            files = {c.id: c.source_file for c in s.query(db.Chromosome)}
            sign = s.query(db.SignOff).one()
            assert (sign.user_name, sign.karyotype, sign.comment) == ("alice", "46,XY", "checked in the browser test")
    finally:
        database.dispose()
    assert rows == {int(chrom): (target, "alice"), int(other_id): (key_target, "alice")}
    out = CliRunner().invoke(cli_app, ["history", CASE_ID, "--db", str(server.path)])
    assert out.exit_code == 0
    assert len(re.findall(r"\[reviewed by alice\]", out.output)) == 2
    from pypdf import PdfReader

    text = "\n".join(pg.extract_text() for pg in PdfReader(pdf).pages)
    assert "Signed by" in text and "alice" in text and "checked in the browser test" in text
    changed = [cid for cid, (label, _) in rows.items() if predicted[cid] != label]
    assert re.search(rf"Labels changed by review: {len(changed)}\b", text)
    assert all(files[cid] in text for cid in changed)
    lines = server.log.read_text().splitlines()
    assert any("POST /cases/" in line for line in lines if "chromobatch.web" in line)
    assert any("chromobatch.report.render" in line for line in lines)  # the sign-off's re-render logged too
    # no line of the serve process names the case ID (the web's and the report code's alike: keys only)
    assert [line for line in lines if CASE_ID in line] == []


@pytest.mark.skipif(CHROMIUM is None, reason="Chromium not installed (Debian: apt-get install chromium)")
def test_swap_and_not_a_chromosome_by_drag(server: SimpleNamespace) -> None:
    """Drop one chromosome onto another of a different class: the two swap; drop one on "not a chromosome":
    it leaves the karyogram, recorded as a review event."""
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright (Python) not installed")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            page.goto(server.url + "/login")
            page.fill('input[name="username"]', "bob")
            page.fill('input[name="password"]', PASSWORD)
            page.click('button[type="submit"]')
            page.wait_for_selector("table.cases")
            page.click(f"text={CASE_ID}")
            page.click("#cells a >> nth=1")
            page.wait_for_selector("#karyogram")
            thumbs = page.locator("#karyogram img.chrom")
            ids = [thumbs.nth(k).get_attribute("data-id") for k in range(thumbs.count())]
            labels = {i: page.get_attribute(f'img.chrom[data-id="{i}"]', "data-label") for i in ids}
            a = ids[0]
            b = next(i for i in ids if labels[i] and labels[i] != labels[a])
            with page.expect_navigation():
                drag(page, page.locator(f'img.chrom[data-id="{a}"]'), page.locator(f'img.chrom[data-id="{b}"]'))
            page.wait_for_selector("#karyogram")
            assert (_slot_of(page, a), _slot_of(page, b)) == (labels[b], labels[a])
            gone = next(i for i in ids if i not in (a, b))
            with page.expect_navigation():
                drag(page, page.locator(f'img.chrom[data-id="{gone}"]'),
                     page.locator('.slot[data-slot="not-a-chromosome"] .num'))
            page.wait_for_selector("#karyogram")
            assert _slot_of(page, gone) == "not-a-chromosome"
        finally:
            browser.close()
    database = db.connect(server.path)
    try:
        with database.session() as s:
            rows = [(r.chromosome_id, r.label, r.reviewer) for r in
                    s.query(db.Label).filter(db.Label.source == "reviewed").order_by(db.Label.id)]
            event = s.query(db.ReviewEvent).one()
            assert s.get(db.Chromosome, int(gone)).not_chromosome is True
    finally:
        database.dispose()
    assert sorted(rows) == sorted([(int(a), labels[b], "bob"), (int(b), labels[a], "bob")])
    assert (event.kind, event.chromosome_id, event.user_name) == ("not_chromosome", int(gone), "bob")
