"""intake: case folders in, validated chromosome records out. Scanning a case folder, reading each file
(images, DICOM), decoding and normalising pixels (imaging), sidecars (labels.csv), storing a scanned case.

May import: store and the bottom (root names, errors, config, files, csvio, faults).
"""
