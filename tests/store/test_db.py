from __future__ import annotations

import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from alembic import command
from sqlalchemy import text
from sqlalchemy.exc import IntegrityError

from chromobatch.errors import DatabaseError
from chromobatch.store import db

TABLES = ["alembic_version", "cases", "cells", "chromosomes", "jobs", "labels", "model_versions",
          "predictions", "rejected_files", "review_events", "signoffs", "users"]
REPO = Path(__file__).resolve().parents[2]


def test_new_sqlite_file_is_migrated_on_first_use(sqlite_path: Path) -> None:
    assert not sqlite_path.exists()
    database = db.connect(sqlite_path)
    assert db.table_names(database) == TABLES
    assert db.current_revision(database.engine) == db.head_revision()
    database.dispose()


def test_sqlite_pragmas(sqlite_path: Path) -> None:
    database = db.connect(sqlite_path)
    with database.engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
        assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == 30000
    database.dispose()


def test_foreign_keys_enforced(sqlite_path: Path) -> None:
    database = db.connect(sqlite_path)
    with pytest.raises(IntegrityError):
        with database.session() as s:
            s.add(db.Cell(case_pk=12345, name="x", index=0))
    database.dispose()


def test_alembic_check_sqlite(sqlite_path: Path) -> None:
    db.connect(sqlite_path).dispose()
    command.check(db.alembic_config(db.resolve_url(sqlite_path)))  # raises when models and migrations differ


def test_alembic_command_line_check(sqlite_path: Path) -> None:
    db.connect(sqlite_path).dispose()
    env = {"CHROMOBATCH_DB": str(sqlite_path), "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-m", "alembic", "check"], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "No new upgrade operations detected" in out.stdout + out.stderr


def test_bad_url_and_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(DatabaseError, match="does not exist"):
        db.connect(tmp_path / "nope" / "cases.sqlite")
    with pytest.raises(DatabaseError):
        db.connect("postgresql+psycopg://postgres@127.0.0.1:1/none")


def test_old_schema_is_refused_without_upgrade(sqlite_path: Path) -> None:
    con = sqlite3.connect(sqlite_path)
    con.execute("CREATE TABLE alembic_version (version_num VARCHAR(32) NOT NULL)")
    con.execute("INSERT INTO alembic_version VALUES ('0000')")
    con.commit()
    con.close()
    with pytest.raises(DatabaseError):
        db.connect(sqlite_path, migrate=False)


@pytest.mark.postgres
def test_postgres_migrates_from_empty_and_matches_models(pg_url: str) -> None:
    with pytest.raises(DatabaseError, match="revision empty") as err:
        db.connect(pg_url)  # PostgreSQL is shared: its schema changes only on request
    assert "chromobatch db upgrade" in err.value.hint
    db.upgrade(pg_url)
    database = db.connect(pg_url)
    assert db.table_names(database) == TABLES
    with database.engine.connect() as conn:
        assert conn.execute(text("select count(*) from cases")).scalar() == 0
    command.check(db.alembic_config(pg_url))
    database.dispose()


@pytest.mark.postgres
def test_postgres_unique_case_id(pg_url: str) -> None:
    database = db.connect(pg_url, migrate=True)
    with database.session() as s:
        s.add(db.Case(case_id="A1", source_path="/x", meta={}))
    with pytest.raises(IntegrityError):
        with database.session() as s:
            s.add(db.Case(case_id="A1", source_path="/y", meta={}))
    database.dispose()


def test_wheel_ships_the_migrations(tmp_path: Path) -> None:
    """A plain (non-editable) install must be able to run `chromobatch db upgrade`."""
    import zipfile

    out = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                          "-w", str(tmp_path), str(REPO)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    wheel = next(tmp_path.glob("chromobatch-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {"chromobatch/migrations/env.py", "chromobatch/migrations/script.py.mako",
            "chromobatch/migrations/versions/0001_initial_schema.py"} <= names
    extracted = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(extracted)
    code = ("import chromobatch.store.db as d, sys; x = d.connect(sys.argv[1]); "
            "assert d.MIGRATIONS_DIR.parent.parent.name == 'site'; print(len(d.table_names(x)))")
    run = subprocess.run([sys.executable, "-c", code, str(tmp_path / "w.sqlite")], cwd=tmp_path,
                         env={"PYTHONPATH": str(extracted), "PATH": "/usr/bin:/bin"},
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and run.stdout.strip() == str(len(TABLES)), run.stderr
