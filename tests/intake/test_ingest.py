from __future__ import annotations

import csv
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from helpers import SHARED_DATA, chromosome_array, write_dicom, write_png
from PIL import Image
from typer.testing import CliRunner

from chromobatch import validate_case_id
from chromobatch.cli.main import app
from chromobatch.errors import EmptyCase, InvalidCaseId
from chromobatch.intake.imaging import decode_png
from chromobatch.intake.ingest import ingest_case
from chromobatch.intake.scan import scan_case
from chromobatch.store import db


def _counts(database: db.Database) -> dict[str, int]:
    with database.session() as s:
        return {name: s.query(model).count() for name, model in
                [("cases", db.Case), ("cells", db.Cell), ("chromosomes", db.Chromosome),
                 ("labels", db.Label), ("rejected", db.RejectedFile)]}


def test_png_case_with_cells_and_labels(sqlite_path: Path, simple_case: Path) -> None:
    database = db.connect(sqlite_path)
    result = ingest_case(database, simple_case)
    assert (result.added, result.cells, result.labels_imported, result.rejected) == (8, 2, 8, {})
    with database.session() as s:
        case = s.query(db.Case).one()
        assert case.case_id == "CASE001" and case.status == "ingested" and case.meta["polarity"] == "dark_on_light"
        assert [c.name for c in case.cells] == ["cell01", "cell02"]
        chrom = s.query(db.Chromosome).filter_by(source_file="cell01/c00.png").one()
        crop = decode_png(chrom.crop_png)
        # cropped to the chromosome (60 x 10) plus a 2 px margin, native scale kept
        assert crop.shape == (64, 14) and (chrom.height, chrom.width) == (64, 14)
        assert chrom.labels[0].label == "1" and chrom.labels[0].source == "imported"
    database.dispose()


def test_ingest_is_idempotent_by_content(sqlite_path: Path, simple_case: Path) -> None:
    database = db.connect(sqlite_path)
    ingest_case(database, simple_case)
    before = _counts(database)
    again = ingest_case(database, simple_case)
    assert (again.added, again.already_stored, again.labels_imported) == (0, 8, 0)
    assert _counts(database) == before
    # a new file in an existing cell adds exactly one chromosome
    write_png(simple_case / "cell02" / "extra.png", chromosome_array(33, 9, seed=99))
    third = ingest_case(database, simple_case)
    assert (third.added, third.already_stored) == (1, 8)
    assert _counts(database)["chromosomes"] == 9
    database.dispose()


def test_flat_case_is_one_cell(sqlite_path: Path, tmp_path: Path) -> None:
    case = tmp_path / "flat_case-1.2"
    for k in range(3):
        write_png(case / f"{k}.png", chromosome_array(20 + 10 * k, seed=k))
    database = db.connect(sqlite_path)
    result = ingest_case(database, case)
    assert (result.added, result.cells) == (3, 1)
    database.dispose()


def test_q_band_polarity_detected_and_normalised(sqlite_path: Path, tmp_path: Path) -> None:
    case = tmp_path / "QCASE"
    write_png(case / "m1" / "a.bmp", chromosome_array(40, bright_on_dark=True, canvas=120))
    write_png(case / "m1" / "b.tif", chromosome_array(30, bright_on_dark=True, canvas=90, seed=3))
    database = db.connect(sqlite_path)
    ingest_case(database, case)
    with database.session() as s:
        chroms = s.query(db.Chromosome).all()
        assert {c.polarity for c in chroms} == {"bright_on_dark"}
        for c in chroms:
            crop = decode_png(c.crop_png)
            assert crop.shape[0] in (44, 34)  # cropped out of the large black canvas
            assert np.median(crop[0]) > 200  # stored dark-on-light
    database.dispose()


def test_polarity_from_config_overrides_detection(tmp_path: Path) -> None:
    case = tmp_path / "C"
    write_png(case / "a.png", chromosome_array(40))
    scanned = scan_case(case, polarity="dark_on_light")
    assert scanned.accepted[0].polarity == "dark_on_light"


def test_dicom_case_variants(sqlite_path: Path, tmp_path: Path) -> None:
    case = tmp_path / "DCM01"
    arr = chromosome_array(40, seed=1)
    write_dicom(case / "i1.dcm", arr, series_uid="1.2.3.1", series_number=1)
    write_dicom(case / "i2.dcm", 255 - chromosome_array(30, seed=2), series_uid="1.2.3.1",
                photometric="MONOCHROME1", instance=2)
    write_dicom(case / "i3", chromosome_array(35, seed=3).astype(np.uint16) * 200, series_uid="1.2.3.2",
                series_number=2, bits=16)  # no extension: found by its preamble
    rgb = np.stack([chromosome_array(45, seed=4)] * 3, axis=-1)
    write_dicom(case / "sub" / "i4.dcm", rgb, series_uid="1.2.3.2", series_number=2, instance=2)
    (case / "labels.csv").write_text("file,label\ni1.dcm,1\ni2.dcm,X\ni3,chr5\nsub/i4.dcm,22\n")
    database = db.connect(sqlite_path)
    result = ingest_case(database, case)
    assert result.rejected == {} and result.input_format == "dicom"
    assert (result.added, result.cells, result.labels_imported) == (4, 2, 4)
    with database.session() as s:
        case_row = s.query(db.Case).one()
        assert case_row.meta["dicom"]["PatientID"] == "FAKE-0001"
        assert case_row.meta["dicom"]["AccessionNumber"] == "ACC123"
        assert [c.name for c in case_row.cells] == ["1.2.3.1", "1.2.3.2"]
        for c in s.query(db.Chromosome):
            crop = decode_png(c.crop_png)
            assert np.median(crop[0]) > 200 and crop.min() < 100  # dark chromosome on light background
        labels = {c.source_file: c.labels[0].label for c in s.query(db.Chromosome)}
        assert labels == {"i1.dcm": "1", "i2.dcm": "X", "i3": "5", "sub/i4.dcm": "22"}
    database.dispose()


def _png_with_claimed_size(path: Path, width: int, height: int) -> None:
    """A tiny PNG whose header claims a huge image: a decompression bomb for Pillow."""
    sig = b"\x89PNG\r\n\x1a\n"
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    chunk = lambda t, d: struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d))  # noqa: E731
    path.write_bytes(sig + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 100)) + chunk(b"IEND", b""))


def _compressed_dicom(path: Path) -> None:
    import pydicom
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.encaps import encapsulate
    from pydicom.uid import JPEGLSLossless, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = JPEGLSLossless
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.PatientID = "FAKE-0001"
    ds.SeriesInstanceUID = "9.9"
    ds.Rows, ds.Columns, ds.SamplesPerPixel = 20, 20, 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = encapsulate([b"\xff\xd8\xff\xf7" + b"\0" * 60])
    ds["PixelData"].VR = "OB"
    pydicom.dcmwrite(path, ds, enforce_file_format=True)


def seed_bad_files(case: Path, outside: Path) -> dict[str, str]:
    """Every kind of bad input the lab may drop; returns file -> expected words of the reason."""
    cell = case / "cell01"
    cell.mkdir(parents=True, exist_ok=True)
    (cell / "zero.png").write_bytes(b"")
    good = chromosome_array(40, seed=7)
    buf = cell / "tmp.png"
    Image.fromarray(good).save(buf)
    (cell / "truncated.png").write_bytes(buf.read_bytes()[:80])
    buf.unlink()
    (cell / "notimage.png").write_text("this is a text file, not an image")
    _png_with_claimed_size(cell / "bomb.png", 60000, 60000)
    _png_with_claimed_size(cell / "huge.png", 5000, 5000)
    write_png(cell / "absurd.png", np.full((3, 900), 30, dtype=np.uint8))
    (cell / "broken.dcm").write_bytes(b"\0" * 128 + b"DICM" + b"\x02\x00\x10\x00garbage" * 3)
    _compressed_dicom(cell / "compressed.dcm")
    write_png(outside / "elsewhere.png", chromosome_array(30, seed=8))
    os.symlink(outside / "elsewhere.png", cell / "link.png")
    write_png(cell / "back\\slash.png", chromosome_array(30, seed=9))
    write_png(cell / "dots..png", chromosome_array(31, seed=10))
    write_png(cell / "blank.png", np.full((40, 40), 240, dtype=np.uint8))
    write_png(cell / "copy.png", good)
    write_png(cell / "good.png", good)
    (cell / "anim.gif").write_bytes(b"GIF89a")
    return {
        "cell01/zero.png": "empty file",
        "cell01/truncated.png": "truncated",
        "cell01/notimage.png": "not an image",
        "cell01/bomb.png": "decompression bomb",
        "cell01/huge.png": "too large",
        "cell01/absurd.png": "absurd dimensions",
        "cell01/broken.dcm": "DICOM",
        "cell01/compressed.dcm": "no decoder installed",
        "cell01/link.png": "symlink points outside",
        "cell01/back\\slash.png": "path separator",
        "cell01/dots..png": "'..'",
        "cell01/blank.png": "no chromosome",
        "cell01/good.png": "duplicate of cell01/copy.png",
        "cell01/anim.gif": "unsupported file type",
    }


def test_bad_files_are_named_and_the_rest_goes_on(sqlite_path: Path, tmp_path: Path) -> None:
    case = tmp_path / "BAD1"
    outside = tmp_path / "outside"
    expected = seed_bad_files(case, outside)
    for k in range(3):
        write_png(case / "cell02" / f"ok{k}.png", chromosome_array(30 + k * 5, seed=20 + k))
    database = db.connect(sqlite_path)
    result = ingest_case(database, case)
    assert set(result.rejected) == set(expected)
    for file, words in expected.items():
        assert words in result.rejected[file], (file, result.rejected[file])
    assert result.added == 4  # copy.png + 3 good files in cell02
    with database.session() as s:
        stored = {r.source_file: r.reason for r in s.query(db.RejectedFile)}
        assert stored == result.rejected
    # ingesting again changes nothing and duplicates nothing
    before = _counts(database)
    ingest_case(database, case)
    assert _counts(database) == before
    database.dispose()


def test_case_with_nothing_usable_fails_clearly(sqlite_path: Path, tmp_path: Path) -> None:
    case = tmp_path / "EMPTY1"
    (case / "c").mkdir(parents=True)
    (case / "c" / "x.png").write_bytes(b"")
    database = db.connect(sqlite_path)
    with pytest.raises(EmptyCase, match="c/x.png: empty file"):
        ingest_case(database, case)
    with database.session() as s:
        case_row = s.query(db.Case).one()
        assert case_row.status == "failed" and "no valid chromosome" in case_row.error
    database.dispose()


@pytest.mark.parametrize("name", ["ok", "A-1_b.2", "x" * 128])
def test_valid_case_ids(name: str) -> None:
    assert validate_case_id(name) == name


@pytest.mark.parametrize("name", ["", "a b", "../x", "a..b", ".hidden", "x" * 129, "ü", "a/b", "c;rm"])
def test_invalid_case_ids(name: str) -> None:
    with pytest.raises(InvalidCaseId):
        validate_case_id(name)


def test_bad_labels_csv_rows_are_reported(tmp_path: Path) -> None:
    case = tmp_path / "L1"
    write_png(case / "a.png", chromosome_array(40))
    (case / "labels.csv").write_text("file,label\na.png,Z\n../etc/passwd,1\n")
    scanned = scan_case(case)
    assert len(scanned.label_problems) == 2 and scanned.labels == {}


def test_ingest_cli(sqlite_path: Path, simple_case: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    result = runner.invoke(app, ["ingest", str(simple_case), "--db", str(sqlite_path)])
    assert result.exit_code == 0, result.output
    assert "8 chromosomes added" in result.output and "8 labels imported" in result.output
    bad = tmp_path / "bad name"
    bad.mkdir()
    result = runner.invoke(app, ["ingest", str(bad), "--db", str(sqlite_path)])
    assert result.exit_code == 1 and "invalid case ID" in result.output and "hint:" in result.output


@pytest.mark.postgres
def test_ingest_into_postgres(pg_url: str, simple_case: Path) -> None:
    database = db.connect(pg_url, migrate=True)
    result = ingest_case(database, simple_case)
    assert result.added == 8
    assert ingest_case(database, simple_case).added == 0
    assert _counts(database)["chromosomes"] == 8
    database.dispose()


# --------------------------------------------------------------------------------------------------
# Real data (skipped on a fresh machine without ../shared/data)


def _extract(name: str, dest: Path, members: list[str]) -> None:
    import tarfile

    with tarfile.open(SHARED_DATA / f"{name}.tar.gz") as tar:
        wanted = set(members)
        tar.extractall(dest, members=[m for m in tar.getmembers() if m.name in wanted], filter="data")


@pytest.mark.realdata
@pytest.mark.skipif(not (SHARED_DATA / "g612.tar.gz").exists(), reason="../shared/data/g612.tar.gz absent")
def test_real_g612_and_bioimlab_cells(sqlite_path: Path, tmp_path: Path) -> None:
    """20 real G-band cells and 5 Q-band metaphases: every image stored with its label."""
    import tarfile

    database = db.connect(sqlite_path)
    total = 0
    for name, ncells in [("g612", 20), ("bioimlab", 5)]:
        with tarfile.open(SHARED_DATA / f"{name}.tar.gz") as tar:
            manifest_member = tar.extractfile(f"{name}/manifest.csv")
            assert manifest_member is not None
            rows = list(csv.DictReader(manifest_member.read().decode().splitlines()))
        cells = sorted({r["cell"] for r in rows if r["split"] == "test"})[:ncells]
        chosen = [r for r in rows if r["cell"] in cells and r["split"] == "test"]
        _extract(name, tmp_path / "raw", [f"{name}/{r['path']}" for r in chosen])
        case = tmp_path / f"REAL_{name}"
        label_rows = ["file,label"]
        for r in chosen:
            src = tmp_path / "raw" / name / r["path"]
            dst = case / f"cell_{r['cell']}" / src.name
            dst.parent.mkdir(parents=True, exist_ok=True)
            dst.write_bytes(src.read_bytes())
            label_rows.append(f"{dst.relative_to(case).as_posix()},{r['label']}")
        (case / "labels.csv").write_text("\n".join(label_rows) + "\n")
        result = ingest_case(database, case)
        assert result.rejected == {}, result.rejected
        assert result.added == len(chosen) and result.labels_imported == len(chosen)
        assert result.cells == ncells
        total += len(chosen)
    with database.session() as s:
        assert s.query(db.Chromosome).count() == total
        assert s.query(db.Label).count() == total
        polarities = {c.case_pk: c.polarity for c in s.query(db.Chromosome)}
        assert set(polarities.values()) == {"dark_on_light", "bright_on_dark"}
    database.dispose()


def test_nasty_files_are_rejected_not_fatal(sqlite_path: Path, tmp_path: Path) -> None:
    case = tmp_path / "NASTY"
    write_png(case / "c1" / "ok.png", chromosome_array(40))
    os.mkfifo(case / "c1" / "pipe.png")  # reading it would block forever
    write_png(case / "c1" / "s.png", chromosome_array(30, seed=2))
    os.rename(case / "c1" / "s.png", os.fsencode(case / "c1") + b"/bad\xffname.png")
    write_dicom(case / "c1" / "hdr.dcm", chromosome_array(33, seed=3), series_uid="1.2")
    import pydicom
    from pydicom.dataelem import RawDataElement
    from pydicom.tag import Tag

    ds = pydicom.dcmread(case / "c1" / "hdr.dcm")
    ds[0x00200011] = RawDataElement(Tag(0x00200011), "IS", 4, b"abc ", 0, False, True)  # SeriesNumber
    ds.save_as(case / "c1" / "hdr.dcm")
    write_dicom(case / "c1" / "norows.dcm", chromosome_array(34, seed=4), series_uid="1.2")
    ds = pydicom.dcmread(case / "c1" / "norows.dcm")
    del ds.Rows
    ds.save_as(case / "c1" / "norows.dcm")
    (case / "labels.csv").write_text("file,label\nc1/ok.png,1,extra\n" + "c1/x.png," + "9" * 200_000 + "\n")
    scanned = scan_case(case)
    rejected = {k.encode("utf-8", "surrogateescape").decode("utf-8", "replace"): v
                for k, v in scanned.rejected.items()}
    assert "not a regular file" in rejected["c1/pipe.png"]
    assert any("not valid UTF-8" in v for v in rejected.values())
    assert "unreadable DICOM header" in scanned.rejected["c1/hdr.dcm"]
    assert "unreadable DICOM" in scanned.rejected["c1/norows.dcm"]
    assert [a.file for a in scanned.accepted] == ["c1/ok.png"]
    assert any("3 fields" in p for p in scanned.label_problems) and scanned.labels == {}
    database = db.connect(sqlite_path)
    from chromobatch.intake.ingest import store_scanned

    assert store_scanned(database, scanned).added == 1  # the rest of the case is stored
    database.dispose()


def test_patient_identifiers_stay_out_of_logs(tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                              capfd: pytest.CaptureFixture[str]) -> None:
    import pydicom

    case = tmp_path / "PHI"
    path = write_dicom(case / "a.dcm", chromosome_array(33), series_uid="1.2", patient_id="PID-SECRET-42")
    ds = pydicom.dcmread(path)
    ds.PatientBirthDate = "1980-01-01"
    ds.PatientName = "DOE^JANE"
    ds.save_as(path)
    caplog.set_level("DEBUG")
    scanned = scan_case(case)
    assert scanned.meta["dicom"]["PatientID"] == "PID-SECRET-42"
    out, err = capfd.readouterr()
    text = caplog.text + out + err
    assert "1980-01-01" not in text and "DOE" not in text and "PID-SECRET-42" not in text


def test_reingest_never_overrides_a_reviewed_label(sqlite_path: Path, simple_case: Path) -> None:
    database = db.connect(sqlite_path)
    ingest_case(database, simple_case)
    with database.session() as s:
        chrom = s.query(db.Chromosome).filter_by(source_file="cell01/c00.png").one()
        s.add(db.Label(chromosome_id=chrom.id, label="2", source="reviewed", reviewer="dr.k",
                       supersedes_id=chrom.labels[-1].id))
    ingest_case(database, simple_case)
    with database.session() as s:
        chrom = s.query(db.Chromosome).filter_by(source_file="cell01/c00.png").one()
        assert [(lab.label, lab.source) for lab in chrom.labels] == [("1", "imported"), ("2", "reviewed")]
    database.dispose()


def test_not_a_database_is_a_clear_error(tmp_path: Path) -> None:
    bogus = tmp_path / "notes.sqlite"
    bogus.write_text("this is not SQLite")
    result = CliRunner().invoke(app, ["ingest", str(tmp_path), "--db", str(bogus)])
    assert result.exit_code == 1 and "cannot open database" in result.output and "Traceback" not in result.output
    result = CliRunner().invoke(app, ["db", "upgrade", "--db", "nosuch://x"])
    assert result.exit_code == 1 and "not a valid database URL" in result.output
