"""Reading one DICOM instance that holds one chromosome crop (the cell is its SeriesInstanceUID).

Why so careful: pydicom's warnings and log lines quote tag values, which are patient data; a malformed
header is that file's problem (a rejection with its reason), never the case's.
"""

from __future__ import annotations

import io
import logging
import warnings
from typing import Any

import numpy as np

from chromobatch.intake.imaging import MAX_PIXELS, ImageRejected, rescale_to_uint8

log = logging.getLogger(__name__)

#: DICOM tags kept as case metadata (what a report and a PACS need; nothing else is stored).
DICOM_CASE_TAGS = ("PatientID", "PatientName", "PatientBirthDate", "PatientSex", "AccessionNumber",
                   "StudyDate", "StudyTime", "StudyID", "StudyInstanceUID", "StudyDescription",
                   "InstitutionName", "ReferringPhysicianName")


def looks_dicom(raw: bytes, name: str) -> bool:
    return raw[128:132] == b"DICM" or name.lower().endswith(".dcm")


def read_dicom(raw: bytes, *, max_pixels: int = MAX_PIXELS) -> tuple[np.ndarray, dict[str, Any], str, tuple]:
    """One DICOM instance -> (greyscale uint8 array, case tags, cell UID, cell sort key)."""
    quiet_pydicom()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pydicom's value warnings quote tag values (patient data)
            return _read_dicom(raw, max_pixels)
    except ImageRejected:
        raise
    except Exception as exc:  # noqa: BLE001 - any malformed header is this file's problem, not the case's
        raise ImageRejected(f"unreadable DICOM header: {type(exc).__name__}") from exc

def quiet_pydicom() -> None:
    """pydicom logs and warns with the offending tag values (patient names, dates): keep them out of logs."""
    import pydicom

    pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE
    pydicom.config.settings.writing_validation_mode = pydicom.config.IGNORE
    logging.getLogger("pydicom").setLevel(logging.CRITICAL)

def _read_dicom(raw: bytes, max_pixels: int) -> tuple[np.ndarray, dict[str, Any], str, tuple]:
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        ds = pydicom.dcmread(io.BytesIO(raw), force=raw[128:132] != b"DICM")
    except (InvalidDicomError, EOFError, OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ImageRejected(f"unreadable DICOM: {type(exc).__name__}: {str(exc)[:120]}") from exc
    if "PixelData" not in ds:
        raise ImageRejected("DICOM instance has no pixel data")
    try:
        rows, cols = int(ds.Rows), int(ds.Columns)
        frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
    except (AttributeError, TypeError, ValueError) as exc:
        raise ImageRejected(f"unreadable DICOM image header: {exc}") from exc
    if rows * cols > max_pixels:
        raise ImageRejected(f"image too large ({cols}x{rows} pixels; limit {max_pixels} pixels)")
    if frames != 1:
        raise ImageRejected(f"multi-frame DICOM ({frames} frames); expected one chromosome crop per instance")
    ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    try:
        arr = ds.pixel_array
    except Exception as exc:  # pydicom raises RuntimeError/NotImplementedError/ValueError by handler
        if ts is not None and ts.is_compressed and not _decoder_available(ts):
            raise ImageRejected(
                f"compressed transfer syntax {ts.name} ({ts}) cannot be decoded: no decoder installed "
                "(install pylibjpeg with pylibjpeg-libjpeg/-openjpeg, or python-gdcm)") from exc
        raise ImageRejected(f"DICOM pixel data cannot be decoded (corrupt?): {exc}") from exc
    photometric = str(getattr(ds, "PhotometricInterpretation", "MONOCHROME2")).upper()
    arr = np.asarray(arr)
    if arr.ndim == 3 and arr.shape[-1] in (3, 4):
        rgb = arr[..., :3].astype(np.float64)
        arr = rgb @ np.array([0.299, 0.587, 0.114])
    elif arr.ndim != 2:
        raise ImageRejected(f"unexpected DICOM pixel array shape {arr.shape}")
    bits = int(getattr(ds, "BitsStored", 8) or 8)
    if arr.dtype == np.uint8 and photometric != "MONOCHROME1":
        grey = arr
    elif bits <= 8 and arr.min() >= 0 and arr.max() <= 255:
        grey = arr.astype(np.uint8)
    else:
        grey = rescale_to_uint8(arr)
    if photometric == "MONOCHROME1":
        grey = (255 - grey).astype(np.uint8)
    tags = {}
    for tag in DICOM_CASE_TAGS:
        value = getattr(ds, tag, None)
        if value not in (None, ""):
            tags[tag] = str(value)
    series = str(getattr(ds, "SeriesInstanceUID", "") or "") or "series-unknown"
    order = (int(getattr(ds, "SeriesNumber", 0) or 0), series)
    return grey, tags, series, order

def _decoder_available(ts: Any) -> bool:
    try:
        from pydicom.pixels import get_decoder

        return bool(get_decoder(ts).is_available)
    except (ImportError, NotImplementedError, ValueError):
        return False


def merge_case_tags(meta: dict[str, Any], tags: dict[str, Any]) -> str | None:
    """All instances of a case must belong to one patient; a mismatch is a rejection, not a merge."""
    dicom = meta.setdefault("dicom", {})
    for key in ("PatientID", "StudyInstanceUID"):
        if key in tags and key in dicom and tags[key] != dicom[key]:
            return f"{key} differs from the rest of the case"
    for key, value in tags.items():
        dicom.setdefault(key, value)
    return None
