"""Files follow the umask (and the file_mode setting): reports carry patient names, IDs and birth dates.

The CLI runs as a real subprocess with the umask a systemd unit's UMask=0027 would give it.
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import chromosome_array, write_dicom, write_png

from chromobatch.config import load_settings
from chromobatch.errors import ConfigError
from chromobatch.files import atomic_write


def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def png_case(root: Path, name: str) -> Path:
    case = root / name
    for k in range(3):
        write_png(case / "cell1" / f"k{k}.png", chromosome_array(20 + 6 * k, 8, seed=k))
    return case


def dicom_case(root: Path, name: str) -> Path:
    case = root / name
    for k in range(3):
        write_dicom(case / f"i{k}.dcm", chromosome_array(24 + 5 * k, 9, seed=10 + k).astype(np.uint8),
                    series_uid="1.2.826.0.1.3680043.8.498.7", instance=k + 1)
    return case


def cli(args: list[str], *, tmp: Path, model: Path, umask: int, **env_extra: str) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHROMOBATCH_")}
    env.update(CHROMOBATCH_MODEL=str(model), CHROMOBATCH_DEVICE="cpu", OMP_NUM_THREADS="1", **env_extra)
    done = subprocess.run([sys.executable, "-m", "chromobatch.cli", *args], env=env, cwd=tmp,
                          preexec_fn=lambda: os.umask(umask), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def db_files(db: Path) -> list[Path]:
    found = sorted(db.parent.glob(db.name + "*"))  # cases.sqlite, -wal, -shm while they exist
    assert db in found
    return found


@pytest.mark.slow
def test_umask_0027_gives_0640_reports_pngs_dicom_and_database(tmp_path: Path, tiny_model_dir: Path) -> None:
    db, reports = tmp_path / "cases.sqlite", tmp_path / "reports"
    common = ["--db", str(db), "--reports", str(reports)]
    cli(["process", str(png_case(tmp_path, "UMASK01")), *common], tmp=tmp_path, model=tiny_model_dir,
        umask=0o027)
    cli(["process", str(dicom_case(tmp_path, "UMASK02")), *common], tmp=tmp_path, model=tiny_model_dir,
        umask=0o027)
    out = cli(["report", "UMASK01", "--db", str(db), "--out", str(tmp_path / "again" / "UMASK01.pdf"), "--png"],
              tmp=tmp_path, model=tiny_model_dir, umask=0o027)
    files = [reports / "UMASK01.pdf", reports / "UMASK02.pdf", reports / "UMASK02.dcm",
             *sorted((tmp_path / "again").iterdir()), *db_files(db)]
    assert any(p.suffix == ".png" for p in files), out
    assert {p.name: oct(mode_of(p)) for p in files} == {p.name: oct(0o640) for p in files}
    assert mode_of(reports) == mode_of(tmp_path / "again") == 0o750
    assert not list(reports.glob(".*"))  # no temporary files left behind


@pytest.mark.slow
def test_file_mode_setting_narrows_the_umask(tmp_path: Path, tiny_model_dir: Path) -> None:
    db, reports = tmp_path / "cases.sqlite", tmp_path / "reports"
    cli(["process", str(dicom_case(tmp_path, "MODE01")), "--db", str(db), "--reports", str(reports)], tmp=tmp_path,
        model=tiny_model_dir, umask=0o022, CHROMOBATCH_FILE_MODE="0600")
    files = [reports / "MODE01.pdf", reports / "MODE01.dcm", *db_files(db)]
    assert {p.name: oct(mode_of(p)) for p in files} == {p.name: oct(0o600) for p in files}
    assert mode_of(reports) == 0o700


def test_atomic_write_follows_the_umask_and_never_widens(tmp_path: Path) -> None:
    old = os.umask(0o027)
    try:
        assert mode_of(atomic_write(tmp_path / "a.txt", "x")) == 0o640
        assert mode_of(atomic_write(tmp_path / "b.bin", lambda p: p.write_bytes(b"y"))) == 0o640
        assert mode_of(atomic_write(tmp_path / "c.txt", "z", mode=0o600)) == 0o600
        assert mode_of(atomic_write(tmp_path / "d.txt", "w", mode=0o666)) == 0o640  # the umask still applies
        os.umask(0o077)
        assert mode_of(atomic_write(tmp_path / "a.txt", "again")) == 0o600

        from chromobatch.files import current_umask

        assert current_umask() == 0o077 and current_umask() == 0o077  # reading it does not change it
    finally:
        os.umask(old)


@pytest.mark.parametrize("value,match", [
    ("rw-r-----", "octal mode"),
    ("0648", "octal mode"),
    ("1640", "octal mode"),
    ("0666", "everybody write"),
    ("0642", "everybody write"),
    ("0440", "owner read and write"),
])
def test_bad_file_mode_is_refused(value: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        load_settings({"file_mode": value})


def test_file_mode_is_normalised() -> None:
    assert load_settings({"file_mode": "640"}).file_mode == "0640"
    assert load_settings({"file_mode": "0o600"}).file_mode == "0600"
    assert load_settings().file_mode == ""
