"""The web review on PostgreSQL: the migration, a relabel with a concurrent edit, sign-off and reopening."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from conftest import PASSWORD, csrf_of, make_case

from chromobatch.config import load_settings
from chromobatch.registry.register import load_predictor
from chromobatch.review.labels import history
from chromobatch.service.pipeline import process_case
from chromobatch.store import db
from chromobatch.web.users import add_user

pytestmark = pytest.mark.postgres


def test_review_on_postgresql(pg_url: str, tmp_path: Path, tiny_model_dir: Path) -> None:
    from fastapi.testclient import TestClient

    from chromobatch.web.app import WebOptions, create_app

    database = db.connect(pg_url, migrate=True)
    try:
        settings = load_settings({"model": str(tiny_model_dir), "device": "cpu"})
        case_dir = make_case(tmp_path)
        process_case(database, case_dir, predictor=load_predictor(database, settings), settings=settings)
        for name in ("alice", "bob"):
            add_user(database, name, "reviewer", PASSWORD)
        with database.session() as s:
            case_pk = s.query(db.Case.id).scalar()
            cell_pk = s.query(db.Cell.id).order_by(db.Cell.index).first()[0]
        app = create_app(database, WebOptions(reports_dir=tmp_path / "reports", secret="pg"))
        clients: dict[str, Any] = {}
        for name in ("alice", "bob"):
            c = TestClient(app, follow_redirects=False)
            token = csrf_of(c.get("/login").text)
            assert c.post("/login", data={"username": name, "password": PASSWORD, "csrf_token": token}
                          ).status_code == 303
            clients[name] = (c, csrf_of(c.get(f"/cells/{cell_pk}").text))
        page = clients["alice"][0].get(f"/cells/{cell_pk}").text
        chrom, seen = re.search(r'data-id="(\d+)" data-label="[^"]*" data-seen="(\d*)"', page).groups()  # type: ignore
        for name, label in (("alice", "7"), ("bob", "9")):
            c, token = clients[name]
            r = c.post(f"/cases/{case_pk}/labels", data={"chromosome": chrom, "label": label, "seen": seen},
                       headers={"Accept": "application/json", "X-CSRF-Token": token})
            assert r.status_code == 200
            assert r.json()["conflict"] is (name == "bob")
        trail = [(e.label, e.reviewer) for e in history(database, case_dir.name) if e.source == "reviewed"]
        assert trail == [("7", "alice"), ("9", "bob")]
        c, token = clients["bob"]
        h = {"Accept": "application/json", "X-CSRF-Token": token}
        assert c.post(f"/cases/{case_pk}/signoff", data={"karyotype": "46,XY", "comment": "pg"}, headers=h
                      ).json()["report"] is True
        assert c.post(f"/cases/{case_pk}/labels", data={"chromosome": chrom, "label": "3"}, headers=h
                      ).status_code == 409
        assert c.post(f"/cases/{case_pk}/reopen", data={"comment": "again"}, headers=h).status_code == 200
        with database.session() as s:
            assert [x.action for x in s.query(db.SignOff).order_by(db.SignOff.id)] == ["signed", "reopened"]
    finally:
        database.dispose()
