"""One reader per input kind, behind one small interface: bytes of a file in, a greyscale image out.

Why: scan_case (chromobatch.intake.scan) walks a case folder and hands each file to the first reader that
accepts it; a new input kind (a whole metaphase image, a scanner's own format) is one more reader here,
not edits across the code base. A reader raises ImageRejected with the reason a lab can act on.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any, Protocol

import numpy as np

from chromobatch.intake.dicom import looks_dicom, read_dicom
from chromobatch.intake.imaging import IMAGE_SUFFIXES, decode_grey


@dataclass(frozen=True)
class Read:
    """What a reader got out of one file."""

    grey: np.ndarray
    #: The cell the image belongs to, and how cells sort (DICOM: series number, then UID).
    cell: str
    order: tuple[Any, ...]
    #: Case-level tags (DICOM patient and study); {} for plain images.
    tags: dict[str, Any] = field(default_factory=dict)


class Reader(Protocol):
    kind: str

    def accepts(self, raw: bytes, name: str) -> bool:
        """True when this reader is the one for the file (by content first, then by name)."""

    def read(self, raw: bytes, name: str, folder_cell: str, *, max_pixels: int) -> Read:
        """Decode the file; folder_cell is the cell its folder names. Raises ImageRejected."""


class DicomReader:
    kind = "dicom"

    def accepts(self, raw: bytes, name: str) -> bool:
        return looks_dicom(raw, name)

    def read(self, raw: bytes, name: str, folder_cell: str, *, max_pixels: int) -> Read:
        grey, tags, series, order = read_dicom(raw, max_pixels=max_pixels)
        return Read(grey, series, order, tags)


class ImageReader:
    """PNG, TIFF, BMP, JPEG (8 or 16 bit); a file without a suffix is tried as an image too."""

    kind = "image"

    def accepts(self, raw: bytes, name: str) -> bool:
        suffix = PurePosixPath(name).suffix.lower()
        return suffix in IMAGE_SUFFIXES or not suffix

    def read(self, raw: bytes, name: str, folder_cell: str, *, max_pixels: int) -> Read:
        return Read(decode_grey(raw, max_pixels=max_pixels), folder_cell, (0, folder_cell))


#: In order: the first reader that accepts a file reads it.
READERS: tuple[Reader, ...] = (DicomReader(), ImageReader())
UNSUPPORTED = "unsupported file type {suffix!r} (expected PNG, TIFF, BMP, JPEG or DICOM)"


def reader_for(raw: bytes, name: str) -> Reader | None:
    return next((r for r in READERS if r.accepts(raw, name)), None)
