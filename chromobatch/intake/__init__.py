"""intake: case folders in, validated chromosome records out. `scan` walks a case folder and hands each file
to the first reader that accepts it (`readers`: images, DICOM via `dicom`; a new input kind is one more
reader), `imaging` decodes and normalises pixels, `sidecars` knows labels.csv and the files that are not
chromosomes, `ingest` stores a scanned case in one transaction.

May import: store and the bottom (root names, errors, config, files, csvio, faults).
"""
