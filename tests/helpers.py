"""Helpers shared by tests: generated chromosome files (PNG, DICOM) and where the real data lives."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
PG_HOST, PG_PORT = "127.0.0.1", 5432
PG_ADMIN_URL = f"postgresql+psycopg://postgres@{PG_HOST}:{PG_PORT}/test"


def pg_reachable() -> bool:
    try:
        with socket.create_connection((PG_HOST, PG_PORT), timeout=1):
            pass
    except OSError:
        return False
    try:
        import psycopg  # noqa: F401
    except ImportError:
        return False
    return True


def chromosome_array(length: int = 40, width: int = 10, *, canvas: int | None = None, bands: int = 5,
                     bright_on_dark: bool = False, seed: int = 0) -> np.ndarray:
    """A banded dark rod on a light background: enough of a chromosome for ingest and tiny models."""
    rng = np.random.default_rng(seed)
    h = canvas or length + 12
    w = canvas or width + 12
    img = np.full((h, w), 245, dtype=np.uint8)
    top, left = (h - length) // 2, (w - width) // 2
    body = np.full((length, width), 150, dtype=np.float64)
    edges = np.linspace(0, length, bands + 1).astype(int)
    for i in range(0, bands, 2):
        body[edges[i]:edges[i + 1]] = 60
    body += rng.normal(0, 3, body.shape)
    img[top:top + length, left:left + width] = np.clip(body, 0, 255).astype(np.uint8)
    return (255 - img) if bright_on_dark else img


def write_png(path: Path, arr: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)
    return path


def write_labelled_case(case: Path, cells: int, chromosomes: list[tuple[int, str]]) -> Path:
    """CASE/cellNN/cKK.png for each (length, label) in every cell, and the labels.csv naming them."""
    rows = ["file,label"]
    for c in range(cells):
        for k, (length, label) in enumerate(chromosomes):
            rel = f"cell{c + 1:02d}/c{k:02d}.png"
            write_png(case / rel, chromosome_array(length, 10, seed=c * 10 + k))
            rows.append(f"{rel},{label}")
    (case / "labels.csv").write_text("\n".join(rows) + "\n")
    return case


def write_dicom(path: Path, arr: np.ndarray, *, series_uid: str, series_number: int = 1,
                patient_id: str = "FAKE-0001", photometric: str = "MONOCHROME2", bits: int = 8,
                instance: int = 1, study_uid: str = "1.2.826.0.1.3680043.8.498.1") -> Path:
    """A Secondary Capture instance with one chromosome crop (uncompressed)."""
    import pydicom
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.PatientID = patient_id
    ds.PatientName = "TEST^PATIENT"
    ds.AccessionNumber = "ACC123"
    ds.StudyDate = "20261126"
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.SeriesNumber = series_number
    ds.InstanceNumber = instance
    ds.Modality = "OT"
    if arr.ndim == 3:
        ds.SamplesPerPixel = 3
        ds.PhotometricInterpretation = "RGB"
        ds.PlanarConfiguration = 0
    else:
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = photometric
    ds.Rows, ds.Columns = arr.shape[:2]
    ds.BitsAllocated = bits
    ds.BitsStored = bits
    ds.HighBit = bits - 1
    ds.PixelRepresentation = 0
    data = arr.astype(np.uint16 if bits == 16 else np.uint8)
    ds.PixelData = data.tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    pydicom.dcmwrite(path, ds, enforce_file_format=True)
    return path


class Watcher:
    """One `chromobatch watch` subprocess, its log in a file (ROOT/NAME.log).

    safe_path runs it with -P, so that the watcher itself does not import from `cwd` (what its workers do
    is what tests/test_workers.py checks).
    """

    def __init__(self, root: Path, name: str, args: list[str], env: dict[str, str], *, cwd: Path | None = None,
                 safe_path: bool = False) -> None:
        self.log = root / f"{name}.log"
        self._fh = self.log.open("wb")
        flags = ["-P"] if safe_path else []
        self.proc = subprocess.Popen([sys.executable, *flags, "-m", "chromobatch.cli", "watch", *args], env=env,
                                     cwd=cwd or root, stdout=self._fh, stderr=subprocess.STDOUT)

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        self.proc.send_signal(sig)
        rc = self.proc.wait(timeout=timeout)
        self._fh.close()
        return rc

    def kill_all(self) -> None:
        """Kill the watcher and its worker processes (they would notice their parent is gone, but not at once)."""
        if self.proc.poll() is not None:
            return
        orphans = child_pids(self.proc.pid)
        self.proc.kill()
        self.proc.wait()
        for pid in orphans:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def child_pids(pid: int) -> set[int]:
    """The direct children of a process, from /proc (Linux >= 3.5 with CONFIG_PROC_CHILDREN)."""
    out: set[int] = set()
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            out |= {int(x) for x in (task / "children").read_text().split()}
        except (OSError, ValueError):
            continue
    return out
