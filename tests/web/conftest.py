"""Fixtures of the web review tests: a processed case in a real SQLite file, four users, signed-in clients."""

from __future__ import annotations

import re
import sqlite3
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
from helpers import write_labelled_case

from chromobatch.config import load_settings
from chromobatch.registry.register import load_predictor
from chromobatch.service.pipeline import process_case
from chromobatch.store import db
from chromobatch.web.users import add_user

PASSWORD = "correct horse battery"
USERS = {"vera": "viewer", "alice": "reviewer", "bob": "reviewer", "adam": "admin"}
CASE_ID = "PATIENT-7731"  # looks like an identifier on purpose: it must never reach a URL or a log line


def make_case(root: Path, case_id: str = CASE_ID, cells: int = 2) -> Path:
    return write_labelled_case(root / case_id, cells, [(60, "1"), (58, "1"), (50, "2"), (25, "21"), (24, "Y")])


@pytest.fixture(scope="session")
def template_db(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Path:
    """A SQLite file with one processed two-cell case and the four users, built once and copied per test."""
    root = tmp_path_factory.mktemp("webdb")
    path = root / "template.sqlite"
    database = db.connect(path)
    settings = load_settings({"model": str(tiny_model_dir), "device": "cpu"})
    process_case(database, make_case(root), predictor=load_predictor(database, settings), settings=settings)
    for name, role in USERS.items():
        add_user(database, name, role, PASSWORD)
    database.dispose()
    return path


@pytest.fixture
def web(template_db: Path, tmp_path: Path) -> Iterator[SimpleNamespace]:
    """A copy of the template database, the app over it, and its keys (case, cells, chromosomes)."""
    from chromobatch.web.app import WebOptions, create_app

    path = tmp_path / "cases.sqlite"
    copy_sqlite(template_db, path)
    database = db.connect(path)
    with database.session() as s:
        case = s.query(db.Case).one()
        cells = [c.id for c in s.query(db.Cell).order_by(db.Cell.index, db.Cell.id)]
        chroms = {c.id: (c.cell_id, c.source_file) for c in s.query(db.Chromosome).order_by(db.Chromosome.id)}
        case_pk = case.id
    reports = tmp_path / "reports"
    app = create_app(database, WebOptions(reports_dir=reports, secret="test-secret"))
    yield SimpleNamespace(app=app, database=database, path=path, case_pk=case_pk, cells=cells, chroms=chroms,
                          reports=reports)
    database.dispose()


def copy_sqlite(src: Path, dst: Path) -> None:
    """SQLite's backup API: a consistent copy whatever is still in the write-ahead log."""
    with sqlite3.connect(src) as a, sqlite3.connect(dst) as b:
        a.backup(b)
    a.close()
    b.close()


CSRF_META = re.compile(r'<meta name="csrf-token" content="([^"]+)">')


def csrf_of(html: str) -> str:
    m = CSRF_META.search(html)
    assert m, "page has no CSRF token"
    return m.group(1)


@pytest.fixture
def client(web: SimpleNamespace) -> Iterator[Callable[[str | None], object]]:
    """client(name) -> a TestClient signed in as that user (None: not signed in), with .csrf set."""
    from fastapi.testclient import TestClient

    made: list[TestClient] = []

    def make(name: str | None) -> TestClient:
        c = TestClient(web.app, follow_redirects=False)
        made.append(c)
        page = c.get("/login")
        c.csrf = csrf_of(page.text)  # type: ignore[attr-defined]
        if name is not None:
            r = c.post("/login", data={"username": name, "password": PASSWORD, "csrf_token": c.csrf})
            assert r.status_code == 303, r.text
            c.csrf = csrf_of(c.get("/").text)  # type: ignore[attr-defined]
        return c

    yield make
    for c in made:
        c.close()
