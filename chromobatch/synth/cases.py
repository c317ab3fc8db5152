"""Synthetic case folders and training sets, in the formats ingest reads.

A case is PNG cell folders or flat DICOM (Secondary Capture, one series per cell) with ``labels.csv`` and
``truth.json``, or (``metaphase``) one whole metaphase image per cell (chromobatch.synth.metaphase) with
``truth.json`` only: the count and classes of each cell; a training set is PNG crops of normal cells with a
``manifest.csv``. Folders appear whole (written under a hidden name, then renamed). All randomness comes from
one integer seed: the same seed (and case id) gives the same bytes.
"""

from __future__ import annotations

import csv
import datetime as _dt
import hashlib
import io
import json
import logging
import re
import shutil
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from chromobatch import CLASSES
from chromobatch.errors import ConfigError, InputError, InvalidCaseId
from chromobatch.intake.imaging import encode_png
from chromobatch.synth.karyotypes import (
    ABNORMAL_KARYOTYPES,
    NORMAL_KARYOTYPES,
    case_karyotype,
    karyotype_labels,
    normal_partner,
    patient_sex,
)
from chromobatch.synth.render import check_style, render_cell, seeded_rng

log = logging.getLogger(__name__)

FORMATS: tuple[str, ...] = ("png", "dicom")
#: Whole-metaphase layouts: ``flat`` = CASE/cellNN.png (DICOM: one instance per cell), ``folder`` =
#: CASE/cellNN/metaphase.png.
METAPHASE_LAYOUTS: tuple[str, ...] = ("flat", "folder")
#: File kinds a whole metaphase may be written as (PNG format): 8-bit PNG, 16-bit PNG, 8- or 16-bit TIFF, JPEG.
METAPHASE_IMAGES: tuple[str, ...] = ("png", "png16", "tif", "tif16", "jpg")


def metaphase_bytes(image: np.ndarray, kind: str) -> tuple[bytes, str]:
    """A uint8 metaphase encoded as a scanner might deliver it: (bytes, file suffix). 16-bit kinds spread the
    8-bit range over 16 bits (x 257), as a camera's 16-bit export of the same frame would."""
    from PIL import Image

    if kind not in METAPHASE_IMAGES:
        raise ConfigError(f"metaphase image kind must be one of {', '.join(METAPHASE_IMAGES)}, got {kind!r}")
    if kind == "png":
        return encode_png(image), ".png"
    pixels = image.astype(np.uint16) * 257 if kind.endswith("16") else image
    buf = io.BytesIO()
    if kind == "jpg":
        Image.fromarray(pixels).save(buf, format="JPEG", quality=92)
        return buf.getvalue(), ".jpg"
    Image.fromarray(pixels).save(buf, format="PNG" if kind.startswith("png") else "TIFF")
    return buf.getvalue(), ".png" if kind.startswith("png") else ".tif"
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
_CASE_ID = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]*")


def _case_key(case_id: str) -> int:
    return zlib.crc32(case_id.encode())


def _check_common(cells: int, seed: int, style: str) -> None:
    check_style(style)
    if not isinstance(cells, int) or cells < 1:
        raise ConfigError(f"cells must be a positive integer, got {cells!r}")
    if not isinstance(seed, int) or seed < 0:
        raise ConfigError(f"seed must be a non-negative integer, got {seed!r}")


def _new_folder(final: Path) -> Path:
    """A hidden temporary sibling, renamed to ``final`` when complete (watchers never see half a case)."""
    if final.exists() and (not final.is_dir() or any(final.iterdir())):
        raise InputError(f"{final} already exists and is not empty; synthetic cases are never overwritten",
                         hint="Write to an empty output folder or remove the old case first.")
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.partial"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    return tmp


def _finish_folder(tmp: Path, final: Path) -> None:
    if final.exists():
        final.rmdir()  # empty, checked in _new_folder
    tmp.rename(final)


def _dicom_bytes(pixels: np.ndarray, tags: dict[str, object], monochrome1: bool) -> bytes:
    import pydicom
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import UID, ExplicitVRLittleEndian

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(SECONDARY_CAPTURE)
    meta.MediaStorageSOPInstanceUID = UID(str(tags["SOPInstanceUID"]))
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset("synthetic.dcm", {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = SECONDARY_CAPTURE
    for key, value in tags.items():
        setattr(ds, key, value)
    ds.Modality = "OT"
    ds.ConversionType = "SYN"
    ds.Manufacturer = "chromobatch synth"
    ds.ImageComments = "Synthetic image of a fictitious patient (chromobatch.synth)"
    ds.PatientBirthDate = ""
    ds.ReferringPhysicianName = ""
    ds.PatientOrientation = ""
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME1" if monochrome1 else "MONOCHROME2"
    ds.Rows, ds.Columns = int(pixels.shape[0]), int(pixels.shape[1])
    ds.BitsAllocated = 8
    ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    stored = (255 - pixels) if monochrome1 else pixels
    data = np.ascontiguousarray(stored, dtype=np.uint8).tobytes()
    ds.add_new(0x7FE00010, "OB", data + (b"\0" if len(data) % 2 else b""))  # PixelData
    buf = io.BytesIO()
    if int(pydicom.__version__.split(".")[0]) >= 3:
        ds.save_as(buf, enforce_file_format=True)
    else:  # pragma: no cover - pydicom 2.x
        ds.is_little_endian, ds.is_implicit_VR = True, False
        ds.save_as(buf, write_like_original=False)
    return buf.getvalue()


def _uid(*parts: object) -> str:
    """A UUID-derived UID (2.25.<128-bit int>, ISO/IEC 9834-8) hashed from the parts: same seed, same UID.

    (pydicom's generate_uid ignores entropy_srcs when prefix is None, so it cannot be used for this.)
    """
    digest = hashlib.sha256("/".join(["chromobatch.synth", *map(str, parts)]).encode()).digest()
    return f"2.25.{int.from_bytes(digest[:16], 'big')}"


def generate_case(
    out_dir: Path,
    case_id: str,
    *,
    cells: int,
    fmt: str,
    karyotype: str | list[str],
    seed: int,
    style: str = "G",
    monochrome1: float | None = None,
    metaphase: str | None = None,
    metaphase_options: dict[str, Any] | None = None,
    negatives: Sequence[str] = (),
    metaphase_image: str = "png",
) -> Path:
    """Write one synthetic case folder ``out_dir/case_id`` and return it.

    ``karyotype`` is one name for all cells, or a list with one name per cell (a mosaic). PNG: ``cellNN/cNN.png``
    in shuffled order; DICOM: flat ``iNNNN.dcm``, one series per cell. ``monochrome1`` is the fraction of
    DICOM instances stored inverted (MONOCHROME1); None draws it per case (mostly 0, sometimes all or half).
    ``metaphase`` (flat or folder, see METAPHASE_LAYOUTS) writes one whole metaphase per cell instead of
    crops, and no labels.csv: truth.json (a sidecar the scanner ignores) holds each cell's file, count and
    classes. ``metaphase_options`` go to synth.metaphase.render_metaphase (overlap_rate, touch_rate,
    crowding, scale, nuclei, debris). ``negatives`` (with ``metaphase``; blank, nucleus, karyogram: see
    synth.metaphase.NEGATIVES) adds one image of each kind after the cells, laid out like them, for rejection
    tests; truth.json lists them under "negatives" (not cells). ``metaphase_image`` (PNG format only): png,
    png16, tif, tif16 or jpg (see METAPHASE_IMAGES). Same seed and case id -> same bytes.
    """
    _check_common(cells, seed, style)
    if fmt not in FORMATS:
        raise ConfigError(f"format must be png or dicom, got {fmt!r}")
    if metaphase is not None and metaphase not in METAPHASE_LAYOUTS:
        raise ConfigError(f"metaphase layout must be flat or folder, got {metaphase!r}")
    negatives = list(negatives)
    if negatives:
        from chromobatch.synth.metaphase import NEGATIVES

        if metaphase is None:
            raise ConfigError("negative images go with whole-metaphase cases (metaphase=flat|folder)")
        unknown = sorted(set(negatives) - set(NEGATIVES))
        if unknown:
            raise ConfigError(f"unknown negative image kind(s) {unknown}; known: {', '.join(NEGATIVES)}")
    if metaphase_image not in METAPHASE_IMAGES:
        raise ConfigError(f"metaphase image kind must be one of {', '.join(METAPHASE_IMAGES)}, "
                          f"got {metaphase_image!r}")
    if metaphase == "folder" and fmt == "dicom":
        raise ConfigError("DICOM metaphases are written flat (one instance per cell); use --metaphase-layout flat")
    if not _CASE_ID.fullmatch(case_id):
        raise InvalidCaseId(f"invalid case id {case_id!r}: letters, digits, '-', '_' and '.' only")
    kts = [karyotype] * cells if isinstance(karyotype, str) else list(karyotype)
    if len(kts) != cells:
        raise ConfigError(f"a mosaic needs one karyotype per cell: got {len(kts)} for {cells} cells")
    for k in kts:
        karyotype_labels(k)
    if monochrome1 is not None and not 0.0 <= monochrome1 <= 1.0:
        raise ConfigError(f"monochrome1 must be a fraction 0..1, got {monochrome1!r}")

    key = _case_key(case_id)
    case_rng = seeded_rng(seed, key, 0)
    if monochrome1 is None:
        monochrome1 = float(case_rng.choice([0.0, 1.0, 0.5], p=[0.7, 0.2, 0.1]))
    final = Path(out_dir) / case_id
    tmp = _new_folder(final)
    try:
        if metaphase is None:
            rows, cell_truth = _write_cells(tmp, case_id, kts, fmt, seed, key, style, monochrome1, case_rng)
            with (tmp / "labels.csv").open("w", newline="") as fh:
                writer = csv.writer(fh, lineterminator="\n")
                writer.writerow(["file", "label"])
                writer.writerows(sorted(rows))
        else:
            cell_truth, negative_truth = _write_metaphases(tmp, case_id, kts, fmt, seed, key, style, monochrome1,
                                                           case_rng, metaphase, dict(metaphase_options or {}),
                                                           negatives, metaphase_image)
        truth = {"case_id": case_id, "format": fmt, "style": style, "seed": seed,
                 "karyotype": case_karyotype(kts), "sex": patient_sex(kts), "cells": cell_truth}
        if metaphase is not None:
            truth["input"] = f"metaphase ({metaphase})"
            if negatives:
                truth["negatives"] = negative_truth
        (tmp / "truth.json").write_text(json.dumps(truth, indent=2) + "\n")
        _finish_folder(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.debug("synthetic case %s: %s, %d cells, %s", case_id, truth["karyotype"], cells, fmt)
    return final


def _study_tags(case_id: str, kts: list[str], seed: int, case_rng: np.random.Generator) -> dict[str, object]:
    date = _dt.date(2021, 1, 1) + _dt.timedelta(days=int(case_rng.integers(0, 1500)))
    return {
        "PatientID": f"SYNTH-{case_id}"[:64],
        "PatientName": f"SYNTH^{case_id}"[:64],
        "PatientSex": patient_sex(kts),
        "AccessionNumber": f"SYN{zlib.crc32(f'{seed}/{case_id}'.encode()) % 10**9:09d}",
        "StudyDate": date.strftime("%Y%m%d"),
        "StudyTime": f"{int(case_rng.integers(8, 18)):02d}{int(case_rng.integers(0, 60)):02d}00",
        "StudyID": f"{int(case_rng.integers(1, 10**6))}",
        "StudyInstanceUID": _uid(seed, case_id, "study"),
        "StudyDescription": "Synthetic karyotype",
    }


def _write_metaphases(tmp: Path, case_id: str, kts: list[str], fmt: str, seed: int, key: int, style: str,
                      monochrome1: float, case_rng: np.random.Generator, layout: str,
                      options: dict[str, Any], negatives: list[str], image_kind: str
                      ) -> tuple[list[dict], list[dict]]:
    """One whole metaphase per cell, then the negatives; returns each cell's truth (file, count, classes,
    contacts) and each negative's (file, kind)."""
    from chromobatch.synth.metaphase import NEGATIVES, render_metaphase

    study = _study_tags(case_id, kts, seed, case_rng) if fmt == "dicom" else {}

    def write(ci: int, image: np.ndarray, what: str) -> tuple[str, str]:
        cell = f"cell{ci:02d}"
        if fmt == "png":
            data, suffix = metaphase_bytes(image, image_kind)
            name = f"{cell}{suffix}" if layout == "flat" else f"{cell}/metaphase{suffix}"
            if layout == "folder":
                (tmp / cell).mkdir()
            (tmp / name).write_bytes(data)
            return cell, name
        cell = _uid(seed, case_id, "series", ci)
        name = f"i{ci:04d}.dcm"
        tags = dict(study, SeriesInstanceUID=cell, SeriesNumber=ci, InstanceNumber=1,
                    SeriesDescription=f"Synthetic {what} {ci}", SOPInstanceUID=_uid(seed, case_id, "sop", ci, 1),
                    ContentDate=study["StudyDate"], SeriesDate=study["StudyDate"])
        (tmp / name).write_bytes(_dicom_bytes(image, tags, bool(case_rng.random() < monochrome1)))
        return cell, name

    cell_truth: list[dict] = []
    for ci, kt in enumerate(kts, start=1):
        spread = render_metaphase(seeded_rng(seed, key, ci), karyotype=kt, stain=style, **options)
        cell, name = write(ci, spread.image, "metaphase")
        cell_truth.append({
            "cell": cell, "file": name, "karyotype": kt, "count": spread.count,
            "classes": sorted(spread.classes, key=CLASSES.index),
            "overlapping": int(sum(spread.overlapping)), "touching": int(sum(spread.touching)),
            "nuclei": int(spread.info["nuclei"]), "resolution": int(spread.info["resolution"]),
            "condensation": float(spread.info["condensation"]), "scale": float(spread.info["scale"])})
    negative_truth: list[dict] = []
    for j, kind in enumerate(negatives, start=len(kts) + 1):
        image = NEGATIVES[kind](seeded_rng(seed, key, j), stain=style)
        cell, name = write(j, image, kind.replace("_", " "))
        negative_truth.append({"cell": cell, "file": name, "kind": kind, "expect": "rejected"})
    return cell_truth, negative_truth


def _write_cells(tmp: Path, case_id: str, kts: list[str], fmt: str, seed: int, key: int, style: str,
                 monochrome1: float, case_rng: np.random.Generator) -> tuple[list[list[str]], list[dict]]:
    rows: list[list[str]] = []
    cell_truth: list[dict] = []
    study = _study_tags(case_id, kts, seed, case_rng) if fmt == "dicom" else {}
    instance = 0
    for ci, kt in enumerate(kts, start=1):
        labels, crops, cond = render_cell(kt, seeded_rng(seed, key, ci), style=style)
        if fmt == "png":
            cell = f"cell{ci:02d}"
            (tmp / cell).mkdir()
            for j, (lab, crop) in enumerate(zip(labels, crops, strict=True), start=1):
                name = f"{cell}/c{j:02d}.png"
                (tmp / name).write_bytes(encode_png(crop))
                rows.append([name, lab])
        else:
            cell = _uid(seed, case_id, "series", ci)
            inverted = case_rng.random(len(crops)) < monochrome1
            for j, (lab, crop) in enumerate(zip(labels, crops, strict=True), start=1):
                instance += 1
                name = f"i{instance:04d}.dcm"
                tags = dict(study, SeriesInstanceUID=cell, SeriesNumber=ci, InstanceNumber=j,
                            SeriesDescription=f"Synthetic metaphase {ci}",
                            SOPInstanceUID=_uid(seed, case_id, "sop", ci, j),
                            ContentDate=study["StudyDate"], SeriesDate=study["StudyDate"])
                (tmp / name).write_bytes(_dicom_bytes(crop, tags, bool(inverted[j - 1])))
                rows.append([name, lab])
        cell_truth.append({"cell": cell, "karyotype": kt, "count": len(labels), **cond})
    return rows, cell_truth


def _case_plan(rng: np.random.Generator, cases: int, cells: int, abnormal_rate: float) -> list[list[str]]:
    n_abnormal = int(round(abnormal_rate * cases))
    abnormal = set(rng.permutation(cases)[:n_abnormal].tolist())
    plan = []
    for i in range(cases):
        if i not in abnormal:
            plan.append([str(rng.choice(NORMAL_KARYOTYPES))] * cells)
            continue
        kt = str(rng.choice(ABNORMAL_KARYOTYPES))
        if cells >= 2 and rng.random() < 0.25:  # mosaic: abnormal line plus its normal partner
            n_abn = int(rng.integers(1, cells))
            kts = [kt] * n_abn + [normal_partner(kt)] * (cells - n_abn)
            plan.append([kts[j] for j in rng.permutation(cells)])
        else:
            plan.append([kt] * cells)
    return plan


def generate_cases(
    out_dir: Path,
    *,
    cases: int,
    cells: int,
    fmt: str = "png",
    abnormal_rate: float = 0.3,
    seed: int = 0,
    style: str = "G",
    metaphase: str | None = None,
    negatives: Sequence[str] = (),
    metaphase_image: str = "png",
) -> list[Path]:
    """Write ``cases`` case folders SYN0001... of ``cells`` cells; round(abnormal_rate*cases) are abnormal
    (trisomies, sex-chromosome aneuploidies, a quarter of them mosaics). ``metaphase`` (flat or folder):
    one whole metaphase image per cell instead of crops, plus ``negatives``, as ``metaphase_image`` files (see
    generate_case). Returns the case folders."""
    _check_common(cells, seed, style)
    if not isinstance(cases, int) or cases < 1:
        raise ConfigError(f"cases must be a positive integer, got {cases!r}")
    if not 0.0 <= abnormal_rate <= 1.0:
        raise ConfigError(f"abnormal rate must be within 0..1, got {abnormal_rate!r}")
    if fmt not in FORMATS:
        raise ConfigError(f"format must be png or dicom, got {fmt!r}")
    plan = _case_plan(seeded_rng(seed, 0xCA5E5), cases, cells, abnormal_rate)
    paths = []
    for i, kts in enumerate(plan, start=1):
        paths.append(generate_case(Path(out_dir), f"SYN{i:04d}", cells=cells, fmt=fmt, karyotype=kts,
                                   seed=seed, style=style, metaphase=metaphase, negatives=negatives,
                                   metaphase_image=metaphase_image))
    log.info("wrote %d synthetic %s-band cases (%s) to %s", cases, style,
             f"whole metaphases, {metaphase}" if metaphase else fmt, out_dir)
    return paths


def generate_dataset(
    out_dir: Path,
    *,
    cells: int,
    seed: int = 0,
    style: str = "G",
    val_fraction: float = 0.15,
    test_fraction: float = 0.15,
    upright: bool = False,
) -> Path:
    """Write a training set of normal cells (46,XX / 46,XY) as PNG crops and return its ``manifest.csv``.

    Columns path,label,patient,cell,split like the real data's manifest; one synthetic patient per cell,
    split by patient. ``upright`` draws chromosomes near vertical, pter up, as in crops cut from a karyogram.
    """
    _check_common(cells, seed, style)
    for name, frac in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not 0.0 <= frac < 1.0:
            raise ConfigError(f"{name} must be within 0..1, got {frac!r}")
    n_test = int(round(test_fraction * cells))
    n_val = int(round(val_fraction * cells))
    if cells - n_test - n_val < 1:
        raise ConfigError(f"{cells} cells leave nothing to train on with these val/test fractions")
    out_dir = Path(out_dir)
    manifest = out_dir / "manifest.csv"
    if manifest.exists() or (out_dir / "images").exists():
        raise InputError(f"{out_dir} already holds a dataset; synthetic data is never overwritten",
                         hint="Write to an empty output folder.")
    rng = seeded_rng(seed, 0xDA7A)
    order = rng.permutation(cells)
    split = ["train"] * cells
    for rank, idx in enumerate(order):
        if rank < n_test:
            split[idx] = "test"
        elif rank < n_test + n_val:
            split[idx] = "val"
    rows = []
    for ci in range(cells):
        patient = f"SYNP{ci + 1:05d}"
        cell = f"{patient}.1"
        kt = str(rng.choice(NORMAL_KARYOTYPES))
        labels, crops, _ = render_cell(kt, seeded_rng(seed, 0xDA7A, ci + 1), style=style, upright=upright)
        folder = out_dir / "images" / patient / cell
        folder.mkdir(parents=True)
        for j, (lab, crop) in enumerate(zip(labels, crops, strict=True), start=1):
            rel = f"images/{patient}/{cell}/c{j:02d}.png"
            (out_dir / rel).write_bytes(encode_png(crop))
            rows.append([rel, lab, patient, cell, split[ci]])
    with manifest.open("w", newline="") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(["path", "label", "patient", "cell", "split"])
        writer.writerows(rows)
    log.info("wrote synthetic %s-band dataset: %d cells, %d crops -> %s", style, cells, len(rows), manifest)
    return manifest

