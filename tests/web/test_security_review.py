"""Defects found by the independent review of the web review (issue 16), each shown by a test that failed
before its fix."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from conftest import PASSWORD


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
