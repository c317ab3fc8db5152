"""report: what a case looks like on paper. The case view read from the database, the karyogram layout
(reused by the web review later), the PDF and the Encapsulated PDF DICOM instance.

May import: karyotype, ml (geometry), intake (imaging, rejected-file cells), store, and the bottom.
"""
