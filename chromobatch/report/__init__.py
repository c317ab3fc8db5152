"""report: what a case looks like on paper. The case view read from the database, the karyogram layout
(reused by the web review later), the PDF and the Encapsulated PDF DICOM instance.

Modules: `view` (the case view: ChromosomeView, CellView, CaseView, RejectedView, load_case_view,
load_cell_crops, incomplete-input notes), `layout` (the karyogram image: Placement, Karyogram,
abnormal_classes, fonts, layout_karyogram), `pdf` (the story, page templates, numbered canvas, build_pdf),
`dicom` (write_encapsulated_pdf), `render` (the entry point: render_case_report, ReportResult).

May import: karyotype, ml (geometry), intake (imaging, rejected-file cells), store, and the bottom.
"""
