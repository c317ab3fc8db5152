"""Screenshots of the web review for docs/img: the case list, cell views, a signed-off case.

    .venv/bin/python benchmarks/web_screenshots.py [--out docs/img]

Three synthetic cases (chromobatch.synth: 47,XY,+21, 46,XX and a 46,XY/47,XY,+18 mosaic, two cells of crops
each) processed with the shipped model (models/default) into a fresh SQLite file, a reviewer account, then
a real `chromobatch serve` and Debian's Chromium driven by Playwright (as tests/web/test_browser.py does):
sign in, the case list, a cell view after dragging a chromosome to another class, the case after sign-off,
and the cell view of a fourth case delivered as one whole metaphase image (46,XX, segmented by the default
segmenter), with the outlined metaphase beside the karyogram.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests" / "web"))

from browser import drag, wait_for_images  # noqa: E402

from chromobatch.config import load_settings  # noqa: E402
from chromobatch.registry.register import load_predictor  # noqa: E402
from chromobatch.service.pipeline import process_case  # noqa: E402
from chromobatch.store import db  # noqa: E402
from chromobatch.synth.cases import generate_case  # noqa: E402
from chromobatch.web.users import add_user  # noqa: E402

PASSWORD = "screenshot password"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "img")
    args = parser.parse_args()
    chromium = shutil.which("chromium")
    if chromium is None:
        sys.exit("chromium not found (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        path = root / "cases.sqlite"
        database = db.connect(path)
        settings = load_settings({"model": str(REPO / "models" / "default"), "device": "cpu"})
        predictor = load_predictor(database, settings)
        for case_id, kt, seed in (("LAB-2026-0412", "47,XY,+21", 3), ("LAB-2026-0413", "46,XX", 4),
                                  ("LAB-2026-0414", ["46,XY", "47,XY,+18"], 5)):
            folder = generate_case(root / "in", case_id, cells=2, fmt="png", karyotype=kt, seed=seed)
            process_case(database, folder, predictor=predictor, settings=settings, reports_dir=root / "reports")
        folder = generate_case(root / "in", "LAB-2026-0415", cells=1, fmt="png", karyotype="46,XX", seed=2,
                               metaphase="folder")  # a whole metaphase: the cell view shows it outlined
        process_case(database, folder, predictor=predictor, settings=settings, reports_dir=root / "reports")
        add_user(database, "dr.meyer", "reviewer", PASSWORD)
        database.dispose()
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        env = {k: v for k, v in os.environ.items() if not k.startswith("CHROMOBATCH_")}
        env["CHROMOBATCH_WEB_SECRET"] = "screenshots"
        proc = subprocess.Popen([sys.executable, "-m", "chromobatch.cli", "serve", "--port", str(port), "--db",
                                 str(path), "--reports", str(root / "reports")], env=env, cwd=root)
        try:
            for _ in range(200):
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                    break
                except OSError:
                    time.sleep(0.2)
            url = f"http://127.0.0.1:{port}"
            with sync_playwright() as p:
                browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox", "--disable-gpu"])
                page = browser.new_page(viewport={"width": 1500, "height": 950})
                page.goto(url + "/login")
                page.fill('input[name="username"]', "dr.meyer")
                page.fill('input[name="password"]', PASSWORD)
                page.click('button[type="submit"]')
                page.wait_for_selector("table.cases")
                page.screenshot(path=str(args.out / "web-case-list.png"))
                page.click("text=LAB-2026-0412")
                page.click("#cells a >> nth=0")
                page.wait_for_selector("#karyogram")
                src = page.locator('.slot[data-slot="21"] img.chrom').first
                with page.expect_navigation():
                    drag(page, src, page.locator('.slot[data-slot="22"] .num'))
                page.wait_for_selector("#karyogram")
                page.locator('.slot[data-slot="22"] img.chrom').first.click()
                page.screenshot(path=str(args.out / "web-cell-view.png"), full_page=True)
                page.click("text=case LAB-2026-0412")
                page.fill("#signoff-comment", "Trisomy 21 confirmed in both cells.")
                page.fill("#signoff-karyotype", "47,XY,+21")
                page.click("#signoff-button")
                page.wait_for_selector(".signoff")
                page.screenshot(path=str(args.out / "web-sign-off.png"), full_page=True)
                page.goto(url + "/")
                page.click("text=LAB-2026-0415")
                page.click("#cells a >> nth=0")
                page.wait_for_selector(".metaphase img")
                wait_for_images(page)
                page.screenshot(path=str(args.out / "web-cell-metaphase.png"), full_page=True)
                browser.close()
        finally:
            proc.terminate()
            proc.wait(timeout=10)
    print(f"screenshots in {args.out}")


if __name__ == "__main__":
    main()
