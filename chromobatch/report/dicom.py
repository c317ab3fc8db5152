"""The Encapsulated PDF: for DICOM cases the PDF is wrapped as an instance of the patient's study (a new
series) so it can be sent to the PACS.

Patient identifiers appear in the report and the DICOM file only, never in log messages.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from pathlib import Path

from chromobatch import __version__
from chromobatch.files import atomic_write
from chromobatch.report.view import CaseView

log = logging.getLogger(__name__)

ENCAPSULATED_PDF_STORAGE = "1.2.840.10008.5.1.4.1.1.104.1"


def write_encapsulated_pdf(pdf: bytes, view: CaseView, path: Path, *, title: str = "Karyogram report") -> Path:
    """Wrap the PDF as an Encapsulated PDF instance in the case's study (new series), ready for a PACS."""
    import pydicom
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import UID, ExplicitVRLittleEndian, generate_uid

    tags = view.dicom
    now = datetime.now(UTC)
    sop_uid = generate_uid()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(ENCAPSULATED_PDF_STORAGE)
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.SOPClassUID = ENCAPSULATED_PDF_STORAGE
    ds.SOPInstanceUID = sop_uid
    # Patient and study: copied from the case (type 2 attributes are present even when empty).
    for key in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyInstanceUID", "StudyDate",
                "StudyTime", "AccessionNumber", "ReferringPhysicianName", "StudyID"):
        setattr(ds, key, str(tags.get(key, "")))
    if not ds.StudyInstanceUID:
        log.warning("case has no StudyInstanceUID; the Encapsulated PDF starts a new study")
        ds.StudyInstanceUID = generate_uid()
    if tags.get("StudyDescription"):
        ds.StudyDescription = str(tags["StudyDescription"])
    if tags.get("InstitutionName"):
        ds.InstitutionName = str(tags["InstitutionName"])
    # Encapsulated Document Series + equipment.
    ds.Modality = "DOC"
    ds.SeriesInstanceUID = generate_uid()
    ds.SeriesNumber = 9901
    ds.SeriesDescription = title
    ds.Manufacturer = "chromobatch"
    ds.SoftwareVersions = __version__
    ds.ConversionType = "SD"
    # Encapsulated Document module.
    ds.InstanceNumber = 1
    ds.ContentDate = now.strftime("%Y%m%d")
    ds.ContentTime = now.strftime("%H%M%S")
    ds.AcquisitionDateTime = now.strftime("%Y%m%d%H%M%S")
    ds.BurnedInAnnotation = "YES"
    ds.DocumentTitle = title
    ds.ConceptNameCodeSequence = []
    ds.MIMETypeOfEncapsulatedDocument = "application/pdf"
    ds.EncapsulatedDocumentLength = len(pdf)
    ds.EncapsulatedDocument = pdf + (b"\0" if len(pdf) % 2 else b"")
    # Straight to the temporary file: no second in-memory copy of the whole instance.
    atomic_write(path, lambda tmp: pydicom.dcmwrite(tmp, ds, enforce_file_format=True))
    return path
