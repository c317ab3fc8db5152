"""Deployment files: the systemd units pass `systemd-analyze verify`, `docker compose config` accepts the
compose file, and the Dockerfiles say what docs/deploy.md promises. Tools that are missing skip with a reason."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
from helpers import REPO

DEPLOY = REPO / "deploy"
UNITS = ["chromobatch-watch.service", "chromobatch-train.service", "chromobatch-train.timer", "chromobatch-web.service"]


def _unit(name: str) -> dict[str, list[str]]:
    """key -> values of a unit file (sections flattened; enough for these checks)."""
    out: dict[str, list[str]] = {}
    for line in (DEPLOY / "systemd" / name).read_text().splitlines():
        if "=" in line and not line.lstrip().startswith(("#", ";", "[")):
            key, value = line.split("=", 1)
            out.setdefault(key.strip(), []).append(value.strip())
    return out


def test_units_say_what_the_docs_promise() -> None:
    watch = _unit("chromobatch-watch.service")
    assert watch["Restart"] == ["on-failure"] and watch["User"] == ["chromobatch"]
    assert watch["EnvironmentFile"] == ["/etc/chromobatch/env"]
    assert watch["ExecStart"][0].startswith("/usr/local/bin/chromobatch watch ")
    train = _unit("chromobatch-train.service")
    assert train["ExecStart"][0].startswith("/usr/local/bin/chromobatch train --db ")
    assert train["IOSchedulingClass"] == ["idle"] and train["Nice"] == ["19"] and train["CPUQuota"]
    assert train["SuccessExitStatus"] == ["75"]  # retrain.LOCKED_EXIT_CODE: another run holds the lock
    timer = _unit("chromobatch-train.timer")
    assert timer["Persistent"] == ["true"] and timer["OnCalendar"]
    web = _unit("chromobatch-web.service")  # the review workstation: loopback only, behind the TLS proxy
    assert web["ExecStart"][0].startswith("/usr/local/bin/chromobatch serve --host 127.0.0.1 ")
    assert "--secure-cookies" in web["ExecStart"][0] and web["EnvironmentFile"] == ["/etc/chromobatch/env"]
    from chromobatch.errors import LOCKED_EXIT_CODE

    assert LOCKED_EXIT_CODE == 75


def test_systemd_analyze_verify(tmp_path: Path) -> None:
    """verify checks every directive and that ExecStart is executable: the units are copied with the
    /usr/local/bin/chromobatch path pointed at a stub in tmp_path (nothing is installed system-wide)."""
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.skip("systemd-analyze not installed (apt-get install -y systemd)")
    stub = tmp_path / "bin" / "chromobatch"
    stub.parent.mkdir()
    stub.write_text("#!/bin/sh\nexit 0\n")
    stub.chmod(0o755)
    for name in UNITS:
        text = (DEPLOY / "systemd" / name).read_text().replace("/usr/local/bin/chromobatch", str(stub))
        (tmp_path / name).write_text(text)
    proc = subprocess.run([tool, "verify", "--man=no", *[str(tmp_path / n) for n in UNITS]],
                          capture_output=True, text=True, timeout=60)
    output = (proc.stdout + proc.stderr).strip()
    if proc.returncode != 0 and "System has not been booted with systemd" in output:
        pytest.skip(f"systemd-analyze cannot run here: {output[:200]}")
    # verify reports bad values only as warnings, so any output at all is a failure
    assert proc.returncode == 0 and output == "", output


def _compose_command() -> list[str] | None:
    docker = shutil.which("docker")
    if docker is not None:
        probe = subprocess.run([docker, "compose", "version"], capture_output=True, text=True, timeout=30)
        if probe.returncode == 0:
            return [docker, "compose"]
    legacy = shutil.which("docker-compose")
    return [legacy] if legacy is not None else None


def test_docker_compose_config_accepts_the_file() -> None:
    cmd = _compose_command()
    if cmd is None:
        pytest.skip("neither the `docker compose` plugin nor docker-compose is installed "
                    "(apt-get install -y docker-compose)")
    env = {k: v for k, v in os.environ.items() if k not in ("POSTGRES_PASSWORD", "CHROMOBATCH_DATA")}
    proc = subprocess.run([*cmd, "-f", str(DEPLOY / "compose.yaml"), "config"], capture_output=True, text=True,
                          timeout=60, env=env, cwd=DEPLOY)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    config = proc.stdout
    for service in ("db:", "migrate:", "watcher-1:", "watcher-2:", "trainer:"):
        assert f"  {service}" in config
    assert "postgresql+psycopg://" in config and "service_completed_successfully" in config
    assert config.count("- watch") == 2 and "- upgrade" in config


@pytest.mark.parametrize("name", ["Dockerfile", "Dockerfile.cuda"])
def test_dockerfiles(name: str) -> None:
    text = (DEPLOY / name).read_text()
    assert text.startswith("#") and "FROM python:3.11-slim" in text
    assert 'pip install -e ".[postgres]"' in text and "USER chromobatch" in text
    assert (DEPLOY / f"{name}.dockerignore").is_file()
    if name == "Dockerfile":
        assert "download.pytorch.org/whl/cpu" in text
