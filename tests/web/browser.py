"""Browser helpers shared by the real-browser tests (tests/web/test_browser.py) and the screenshot script
(benchmarks/web_screenshots.py): waiting for thumbnails and an HTML5 drag that starts on a busy machine."""

from __future__ import annotations

import time
from typing import Any


def wait_for_images(page: Any, timeout: float = 30.0) -> None:
    """Until every image of the page has loaded (polled from here: the page's CSP forbids the string
    evaluation wait_for_function polls with)."""
    deadline = time.monotonic() + timeout
    while not page.evaluate("() => Array.from(document.images).every(i => i.complete)"):
        assert time.monotonic() < deadline, "images did not load"
        time.sleep(0.1)


def drag(page: Any, source: Any, target: Any) -> None:
    """HTML5 drag and drop with the mouse, in small steps, once every thumbnail has loaded (Playwright's
    drag_to sometimes starts no drag on a small image still loading on a busy machine)."""
    wait_for_images(page)
    a, b = source.bounding_box(), target.bounding_box()
    assert a is not None and b is not None
    page.mouse.move(a["x"] + a["width"] / 2, a["y"] + a["height"] / 2)
    page.mouse.down()
    page.mouse.move(a["x"] + a["width"] / 2 + 4, a["y"] + a["height"] / 2 + 4, steps=4)
    page.mouse.move(b["x"] + b["width"] / 2, b["y"] + b["height"] / 2, steps=12)
    page.mouse.up()
