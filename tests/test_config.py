from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from chromobatch.cli.main import app
from chromobatch.config import load_settings
from chromobatch.errors import ConfigError


def test_layers_file_env_flags(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = tmp_path / "chromobatch.toml"
    cfg.write_text('db = "from-file.sqlite"\nbatch_size = 8\nquiet_seconds = 2.5\npolarity = "bright_on_dark"\n')
    monkeypatch.setenv("CHROMOBATCH_BATCH_SIZE", "16")
    s = load_settings({"polarity": None}, config_file=cfg)
    assert (s.db, s.batch_size, s.quiet_seconds, s.polarity) == ("from-file.sqlite", 16, 2.5, "bright_on_dark")
    s = load_settings({"batch_size": 32, "db": "flag.sqlite"}, config_file=cfg)
    assert (s.db, s.batch_size) == ("flag.sqlite", 32)


def test_table_form_and_env_config_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = tmp_path / "other.toml"
    cfg.write_text('[chromobatch]\nworkers = 3\n')
    monkeypatch.setenv("CHROMOBATCH_CONFIG", str(cfg))
    assert load_settings().workers == 3


@pytest.mark.parametrize("content,match", [
    ("nonsense = 1\n", "unknown setting"),
    ("batch_size = 'many'\n", "batch_size must be int"),
    ("polarity = 'sideways'\n", "polarity"),
    ("batch_size = 0\n", ">= 1"),
    ("db = [\n", "not valid TOML"),
    ("heartbeat_seconds = 60\nstale_after_seconds = 30\n", "below stale_after_seconds"),
    ("quiet_seconds = -1\n", "quiet_seconds must be >= 0"),
])
def test_bad_config_is_a_clear_error(tmp_path: Path, content: str, match: str) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text(content)
    with pytest.raises(ConfigError, match=match):
        load_settings(config_file=cfg)


def test_config_show_cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "chromobatch.toml").write_text("workers = 4\n")
    monkeypatch.setenv("CHROMOBATCH_DB", "env.sqlite")
    runner = CliRunner()
    result = runner.invoke(app, ["config", "show", "--json"])
    assert result.exit_code == 0, result.output
    values = json.loads(result.output)
    assert values["workers"] == 4 and values["db"] == "env.sqlite"
    result = runner.invoke(app, ["config", "show", "--db", "flag.sqlite"])
    assert "flag.sqlite" in result.output


def test_config_error_is_one_red_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("CHROMOBATCH_WORKERS", "lots")
    result = CliRunner().invoke(app, ["config", "show"])
    assert result.exit_code == 1
    assert "error: CHROMOBATCH_WORKERS: workers must be int" in result.output
    assert "Traceback" not in result.output


def test_config_show_lists_the_settings_of_flags_with_env_vars(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                                               ) -> None:
    """--reviewer, --models-dir and --lock are settings: config show lists them, CHROMOBATCH_* and the file set them."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "chromobatch.toml").write_text('models_dir = "/srv/registry"\n')
    monkeypatch.setenv("CHROMOBATCH_REVIEWER", "dr.k")
    runner = CliRunner()
    values = json.loads(runner.invoke(app, ["config", "show", "--json"]).output)
    assert (values["reviewer"], values["models_dir"], values["train_lock"]) == ("dr.k", "/srv/registry", "")
    lines = runner.invoke(app, ["config", "show"]).output.splitlines()
    assert {line.split()[0] for line in lines} >= {"reviewer", "models_dir", "train_lock"}
    assert "reviewer             dr.k" in lines
    monkeypatch.setenv("CHROMOBATCH_MODELS_DIR", " ")
    result = runner.invoke(app, ["config", "show"])
    assert result.exit_code == 1 and "models_dir must not be empty" in result.output


def test_reviewer_from_env_is_recorded_and_the_flag_wins(sqlite_path: Path, simple_case: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(simple_case.parent)
    runner = CliRunner()
    dbarg = ["--db", str(sqlite_path)]
    assert runner.invoke(app, ["ingest", str(simple_case), *dbarg]).exit_code == 0
    monkeypatch.setenv("CHROMOBATCH_REVIEWER", "dr.env")
    r = runner.invoke(app, ["label", "CASE001", "--cell", "1", "--chromosome", "1", "--as", "2", *dbarg])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["label", "CASE001", "--cell", "1", "--chromosome", "2", "--as", "3", "--reviewer",
                            "dr.flag", *dbarg])
    assert r.exit_code == 0, r.output
    trail = runner.invoke(app, ["history", "CASE001", *dbarg]).output
    assert "1 -> 2  [reviewed by dr.env]" in trail and "1 -> 3  [reviewed by dr.flag]" in trail, trail
