"""Shared fixtures: real SQLite files, a throw-away PostgreSQL database, generated chromosome files."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
from helpers import (
    PG_ADMIN_URL,
    PG_HOST,
    PG_PORT,
    Watcher,
    pg_reachable,
    write_labelled_case,
)


@pytest.fixture
def sqlite_path(tmp_path: Path) -> Path:
    return tmp_path / "cases.sqlite"


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A fresh PostgreSQL database for one test, dropped afterwards."""
    if not pg_reachable():
        pytest.skip(f"PostgreSQL not reachable at {PG_HOST}:{PG_PORT} (or psycopg missing)")
    import sqlalchemy as sa

    name = f"chromobatch_test_{uuid.uuid4().hex[:12]}"
    admin = sa.create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
    try:
        yield f"postgresql+psycopg://postgres@{PG_HOST}:{PG_PORT}/{name}"
    finally:
        with admin.connect() as conn:
            conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.dispose()


@pytest.fixture
def simple_case(tmp_path: Path) -> Path:
    """A two-cell PNG case with labels.csv."""
    return write_labelled_case(tmp_path / "CASE001", 2, [(60, "1"), (58, "1"), (25, "21"), (24, "Y")])


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A randomly initialised tiny model folder: enough to run the pipeline end to end, not to classify."""
    import torch

    from chromobatch.ml.factory import create_model
    from chromobatch.ml.folders import save_model
    from chromobatch.ml.preprocess import PreprocessSpec

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("models") / "tiny"
    net = create_model("test_resnet", embed_dim=32, input_size=32)
    spec = PreprocessSpec(mode="fixed", input_size=32, scale=0.4)
    save_model(net, {"backbone": "test_resnet", "embed_dim": 32, "preprocess": spec.to_dict(), "name": "tiny",
                     "version": "t1"}, folder)
    return folder


@pytest.fixture
def watcher_env(tiny_model_dir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHROMOBATCH_")}
    env.update(CHROMOBATCH_MODEL=str(tiny_model_dir), CHROMOBATCH_DEVICE="cpu", CHROMOBATCH_QUIET_SECONDS="1.2",
               CHROMOBATCH_HEARTBEAT_SECONDS="0.2", CHROMOBATCH_STALE_AFTER_SECONDS="2",
               OMP_NUM_THREADS="1")
    return env


@pytest.fixture
def watchers() -> Iterator[list[Watcher]]:
    started: list[Watcher] = []
    yield started
    for w in started:
        w.kill_all()


@pytest.fixture
def layout(tmp_path: Path) -> SimpleNamespace:
    """A watched folder and the folders beside it, as `chromobatch watch` resolves them."""
    incoming = tmp_path / "incoming"
    incoming.mkdir()
    return SimpleNamespace(root=tmp_path, incoming=incoming, processed=tmp_path / "processed",
                           failed=tmp_path / "failed", reports=tmp_path / "reports")
