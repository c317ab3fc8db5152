"""Start-up order: `chromobatch process` checks its input before it loads (or converts) a model."""

from __future__ import annotations

from pathlib import Path

from typer.testing import CliRunner

from chromobatch.cli.main import app


def test_process_checks_its_input_before_loading_a_model(tmp_path: Path) -> None:
    broken = tmp_path / "broken-model"
    broken.mkdir()  # no model.json: loading it would fail with a model error
    result = CliRunner().invoke(app, ["process", str(tmp_path / "NO_SUCH_CASE"), "--db", str(tmp_path / "c.sqlite"),
                                      "--model", str(broken)])
    assert result.exit_code == 1
    assert "NO_SUCH_CASE: not a folder" in result.output
    assert "model" not in result.output.lower(), "the model must not have been loaded first"
