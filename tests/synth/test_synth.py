"""Synthetic karyotypes: ideogram fidelity, counts per karyotype, determinism, file formats, CLI."""

from __future__ import annotations

import csv
import json
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pydicom
import pytest
from scipy.stats import spearmanr

from chromobatch import CLASSES
from chromobatch.errors import ConfigError, InputError, InvalidCaseId
from chromobatch.intake.imaging import decode_png, detect_polarity, normalise
from chromobatch.synth.cases import FORMATS, SECONDARY_CAPTURE, generate_case, generate_cases, generate_dataset
from chromobatch.synth.ideogram import DATA_DIR, RESOLUTIONS, iscn_length, load_ideogram
from chromobatch.synth.karyotypes import KARYOTYPES, NORMAL_KARYOTYPES, case_karyotype, karyotype_labels
from chromobatch.synth.render import STYLES, render_chromosome


def read_labels(case: Path) -> list[tuple[str, str]]:
    with (case / "labels.csv").open(newline="") as fh:
        reader = csv.reader(fh)
        assert next(reader) == ["file", "label"]
        return [(row[0], row[1]) for row in reader]


def all_bytes(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------------------------------------- ideogram
@pytest.mark.parametrize("resolution", RESOLUTIONS)
def test_ideogram_tables_are_vendored_and_complete(resolution: int) -> None:
    assert (DATA_DIR / "eweitz_ideogram_LICENSE_CC0.txt").is_file()
    ideo = load_ideogram(resolution)
    assert sorted(ideo) == sorted(CLASSES)
    for label, bands in ideo.items():
        assert bands[0].start == 0
        assert sum(b.stain == "acen" for b in bands) >= 2, label
        assert all(b.stop > b.start for b in bands)
    assert iscn_length("1", resolution) == 15100
    assert any(b.stain == "stalk" for b in ideo["21"]) and not any(b.stain == "stalk" for b in ideo["1"])
    ideo["1"].clear()  # callers get copies; the cache is untouched
    assert load_ideogram(resolution)["1"]


def test_bad_resolution() -> None:
    with pytest.raises(ConfigError):
        load_ideogram(300)


# ---------------------------------------------------------------------------------------------- rendering
@pytest.mark.parametrize("style", STYLES)
def test_render_polarity_and_scale(style: str) -> None:
    rng = np.random.default_rng(5)
    for label, lo, hi in (("1", 60, 115), ("21", 15, 32)):
        for _ in range(3):
            img = render_chromosome(label, rng, style=style, upright=True)
            assert img.dtype == np.uint8 and img.ndim == 2
            assert detect_polarity(img) == ("dark_on_light" if style == "G" else "bright_on_dark")
            crop, _ = normalise(img)  # what ingest does
            assert lo <= crop.shape[0] <= hi, (label, crop.shape)
            assert 8 <= crop.shape[1] <= 40, (label, crop.shape)


def test_render_deterministic_by_seed() -> None:
    a = render_chromosome("7", np.random.default_rng(42), style="Q")
    b = render_chromosome("7", np.random.default_rng(42), style="Q")
    c = render_chromosome("7", np.random.default_rng(43), style="Q")
    assert np.array_equal(a, b)
    assert a.shape != c.shape or not np.array_equal(a, c)


def test_length_ranking_follows_ideogram() -> None:
    """Measured per-class size (upright height; area at any angle) ranks like the ISCN lengths."""
    rng = np.random.default_rng(2024)
    iscn = np.array([iscn_length(c) for c in CLASSES])
    height, area = [], []
    for label in CLASSES:
        hs, ars = [], []
        for k in range(6):
            img = render_chromosome(label, rng, upright=k % 2 == 0)
            crop, _ = normalise(img)
            if k % 2 == 0:
                hs.append(crop.shape[0])
            ars.append(int((img < np.median(img[0]) - 12).sum()))
        height.append(np.mean(hs))
        area.append(np.mean(ars))
    assert spearmanr(iscn, height)[0] > 0.97
    assert spearmanr(iscn, area)[0] > 0.97
    for i in range(len(CLASSES)):  # clearly different ideogram lengths are never swapped on average
        for j in range(len(CLASSES)):
            if iscn[i] > 1.2 * iscn[j]:
                assert height[i] > height[j], (CLASSES[i], CLASSES[j])


def test_render_rejects_bad_arguments() -> None:
    rng = np.random.default_rng(0)
    with pytest.raises(ConfigError):
        render_chromosome("23b", rng)
    with pytest.raises(ConfigError):
        render_chromosome("1", rng, style="C")
    with pytest.raises(ConfigError):
        render_chromosome("1", rng, condensation=0)


# ---------------------------------------------------------------------------------------------- karyotypes
EXPECTED = {  # karyotype -> (count, X, Y, the trisomic autosome or None)
    "46,XX": (46, 2, 0, None), "46,XY": (46, 1, 1, None), "45,X": (45, 1, 0, None),
    "47,XXX": (47, 3, 0, None), "47,XXY": (47, 2, 1, None), "47,XYY": (47, 1, 2, None),
    "47,XX,+13": (47, 2, 0, "13"), "47,XY,+13": (47, 1, 1, "13"), "47,XX,+18": (47, 2, 0, "18"),
    "47,XY,+18": (47, 1, 1, "18"), "47,XX,+21": (47, 2, 0, "21"), "47,XY,+21": (47, 1, 1, "21"),
}


def check_counts(labels: list[str], karyotype: str) -> None:
    count, n_x, n_y, trisomy = EXPECTED[karyotype]
    c = Counter(labels)
    assert len(labels) == count
    assert (c["X"], c["Y"]) == (n_x, n_y)
    for a in map(str, range(1, 23)):
        assert c[a] == (3 if a == trisomy else 2), (karyotype, a)


@pytest.mark.parametrize("karyotype", list(EXPECTED))
def test_karyotype_labels(karyotype: str) -> None:
    check_counts(karyotype_labels(karyotype), karyotype)


def test_known_karyotypes_are_tested() -> None:
    assert set(KARYOTYPES) == set(EXPECTED)
    with pytest.raises(ConfigError):
        karyotype_labels("46,XZ")


def test_every_karyotype_writes_the_right_counts(tmp_path: Path) -> None:
    for i, kt in enumerate(EXPECTED):
        case = generate_case(tmp_path, f"K{i:02d}", cells=1, fmt="png", karyotype=kt, seed=i)
        rows = read_labels(case)
        check_counts([lab for _, lab in rows], kt)
        truth = json.loads((case / "truth.json").read_text())
        assert truth["karyotype"] == kt
        assert truth["cells"] == [dict(truth["cells"][0], cell="cell01", karyotype=kt, count=EXPECTED[kt][0])]
        files = sorted(p.relative_to(case).as_posix() for p in case.rglob("*.png"))
        assert files == sorted(f for f, _ in rows)


def test_png_case_layout_hides_labels(tmp_path: Path) -> None:
    case = generate_case(tmp_path, "SYN-A.1", cells=2, fmt="png", karyotype="46,XY", seed=3)
    rows = read_labels(case)
    assert all(f.startswith(("cell01/c", "cell02/c")) and f.endswith(".png") for f, _ in rows)
    in_file_order = [lab for _, lab in rows if lab]
    assert in_file_order[:46] != karyotype_labels("46,XY")  # shuffled, not in class order
    crop = decode_png((case / rows[0][0]).read_bytes())
    assert crop.dtype == np.uint8 and crop.ndim == 2
    assert not list(tmp_path.glob(".*"))  # no temporary folder left behind


def test_mosaic_case(tmp_path: Path) -> None:
    kts = ["47,XXY", "46,XY", "47,XXY"]
    case = generate_case(tmp_path, "MOS1", cells=3, fmt="png", karyotype=kts, seed=9)
    truth = json.loads((case / "truth.json").read_text())
    assert truth["karyotype"] == "mos 47,XXY[2]/46,XY[1]"
    assert [c["karyotype"] for c in truth["cells"]] == kts
    rows = read_labels(case)
    for ci, kt in enumerate(kts, start=1):
        check_counts([lab for f, lab in rows if f.startswith(f"cell{ci:02d}/")], kt)
    with pytest.raises(ConfigError):
        generate_case(tmp_path, "MOS2", cells=2, fmt="png", karyotype=kts, seed=9)


def test_case_plan_abnormal_rate(tmp_path: Path) -> None:
    paths = generate_cases(tmp_path, cases=6, cells=2, abnormal_rate=0.5, seed=11)
    assert [p.name for p in paths] == [f"SYN{i:04d}" for i in range(1, 7)]
    truths = [json.loads((p / "truth.json").read_text()) for p in paths]
    abnormal = [t for t in truths if any(c["karyotype"] not in NORMAL_KARYOTYPES for c in t["cells"])]
    assert len(abnormal) == 3
    for t, p in zip(truths, paths, strict=True):
        assert t["case_id"] == p.name and t["format"] == "png" and t["style"] == "G" and t["seed"] == 11
        assert t["karyotype"] == case_karyotype([c["karyotype"] for c in t["cells"]])
        rows = read_labels(p)
        assert len(rows) == sum(c["count"] for c in t["cells"])


def test_bad_case_arguments(tmp_path: Path) -> None:
    with pytest.raises(InvalidCaseId):
        generate_case(tmp_path, "bad id", cells=1, fmt="png", karyotype="46,XX", seed=0)
    with pytest.raises(ConfigError):
        generate_case(tmp_path, "A", cells=1, fmt="jpeg", karyotype="46,XX", seed=0)
    with pytest.raises(ConfigError):
        generate_cases(tmp_path, cases=1, cells=0)
    with pytest.raises(ConfigError):
        generate_cases(tmp_path, cases=1, cells=1, abnormal_rate=1.5)
    with pytest.raises(ConfigError):
        generate_cases(tmp_path, cases=1, cells=1, style="R")
    generate_case(tmp_path, "A", cells=1, fmt="png", karyotype="45,X", seed=0)
    with pytest.raises(InputError):  # never overwrites a case
        generate_case(tmp_path, "A", cells=1, fmt="png", karyotype="45,X", seed=0)


# ---------------------------------------------------------------------------------------------- determinism
@pytest.mark.parametrize("fmt", FORMATS)
def test_same_seed_same_bytes(tmp_path: Path, fmt: str) -> None:
    generate_cases(tmp_path / "a", cases=2, cells=2, fmt=fmt, seed=7, abnormal_rate=0.5)
    generate_cases(tmp_path / "b", cases=2, cells=2, fmt=fmt, seed=7, abnormal_rate=0.5)
    generate_cases(tmp_path / "c", cases=2, cells=2, fmt=fmt, seed=8, abnormal_rate=0.5)
    a, b, c = (all_bytes(tmp_path / d) for d in "abc")
    assert a == b
    assert len(a) > 2 * 2 * 45
    shared = set(a) & set(c)
    assert sum(a[k] != c[k] for k in shared) > len(shared) // 2


# ---------------------------------------------------------------------------------------------- DICOM
def test_dicom_round_trip(tmp_path: Path) -> None:
    case = generate_case(tmp_path, "DCM0001", cells=2, fmt="dicom", karyotype=["47,XY,+21", "46,XY"],
                               seed=5, monochrome1=0.5)
    truth = json.loads((case / "truth.json").read_text())
    assert truth["karyotype"] == "mos 47,XY,+21[1]/46,XY[1]"
    rows = dict(read_labels(case))
    files = sorted(case.glob("*.dcm"))
    assert sorted(p.name for p in files) == sorted(rows) and len(files) == 93
    series: dict[str, list[int]] = {}
    photometric = Counter()
    for path in files:
        ds = pydicom.dcmread(path)
        assert ds.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
        assert ds.SOPClassUID == SECONDARY_CAPTURE == ds.file_meta.MediaStorageSOPClassUID
        assert ds.SOPInstanceUID == ds.file_meta.MediaStorageSOPInstanceUID
        assert ds.Modality == "OT"
        assert str(ds.PatientName) == "SYNTH^DCM0001" and ds.PatientID and ds.PatientSex == "M"
        assert ds.AccessionNumber and len(ds.StudyDate) == 8 and ds.StudyInstanceUID
        assert (ds.BitsAllocated, ds.BitsStored, ds.SamplesPerPixel, ds.PixelRepresentation) == (8, 8, 1, 0)
        for uid in (ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID):
            assert pydicom.uid.UID(uid).is_valid
        series.setdefault(ds.SeriesInstanceUID, []).append(int(ds.InstanceNumber))
        pixels = ds.pixel_array
        assert pixels.shape == (ds.Rows, ds.Columns) and pixels.dtype == np.uint8
        photometric[ds.PhotometricInterpretation] += 1
        shown = 255 - pixels if ds.PhotometricInterpretation == "MONOCHROME1" else pixels
        assert detect_polarity(shown) == "dark_on_light"  # G style once displayed correctly
        cell = [c for c in truth["cells"] if c["cell"] == ds.SeriesInstanceUID]
        assert len(cell) == 1 and ds.SeriesNumber == truth["cells"].index(cell[0]) + 1
    assert set(photometric) == {"MONOCHROME1", "MONOCHROME2"}
    assert [sorted(v) for v in series.values()] == [list(range(1, 48)), list(range(1, 47))]
    assert len({pydicom.dcmread(p).SOPInstanceUID for p in files}) == len(files)


# ---------------------------------------------------------------------------------------------- dataset
def test_generate_dataset(tmp_path: Path) -> None:
    manifest = generate_dataset(tmp_path / "ds", cells=6, seed=1, style="Q", val_fraction=0.2,
                                      test_fraction=0.2)
    with manifest.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == ["path", "label", "patient", "cell", "split"]
    assert len(rows) == 6 * 46
    splits = {}
    for r in rows:
        assert (manifest.parent / r["path"]).is_file()
        assert r["label"] in CLASSES
        assert splits.setdefault(r["patient"], r["split"]) == r["split"]  # split by patient
    assert Counter(splits.values()) == {"train": 4, "val": 1, "test": 1}
    with pytest.raises(InputError):
        generate_dataset(tmp_path / "ds", cells=6)
    with pytest.raises(ConfigError):
        generate_dataset(tmp_path / "ds2", cells=2, val_fraction=0.5, test_fraction=0.5)


# ---------------------------------------------------------------------------------------------- CLI
def test_cli_synth_10x3_under_30s(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from chromobatch.cli.main import app

    start = time.perf_counter()
    result = CliRunner().invoke(app, ["synth", str(tmp_path / "out"), "--cases", "10", "--cells", "3"])
    elapsed = time.perf_counter() - start
    assert result.exit_code == 0, result.output
    assert elapsed < 30, elapsed
    cases = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert cases == [f"SYN{i:04d}" for i in range(1, 11)]
    assert "wrote 10 synthetic G-band cases" in result.output
    bad = CliRunner().invoke(app, ["synth", str(tmp_path / "x"), "--format", "tiff"])
    assert bad.exit_code == 1 and "error:" in bad.output


def test_same_bytes_across_processes(tmp_path: Path) -> None:
    """No hidden state (hash seeds, uuid4, clocks): a fresh interpreter writes the same bytes."""
    import os
    import subprocess
    import sys

    code = ("import sys; from pathlib import Path; from chromobatch.synth.cases import generate_case; "
            "generate_case(Path(sys.argv[1]), 'P1', cells=1, fmt='png', karyotype='45,X', seed=4); "
            "generate_case(Path(sys.argv[1]), 'D1', cells=1, fmt='dicom', karyotype='45,X', seed=4)")
    for sub, hash_seed in (("a", "1"), ("b", "2")):
        env = dict(os.environ, PYTHONHASHSEED=hash_seed)
        subprocess.run([sys.executable, "-c", code, str(tmp_path / sub)], check=True, env=env)
    assert all_bytes(tmp_path / "a") == all_bytes(tmp_path / "b")
    assert len(all_bytes(tmp_path / "a")) == 2 * (45 + 2)
