"""synth: synthetic G-/Q-band chromosomes, cells and case folders drawn from the GRCh38 ideogram, for the
demo, the tests and training experiments.

`ideogram` (the vendored cytoband tables), `karyotypes` (the karyotypes a cell can have), `render` (one
chromosome crop, one cell), `metaphase` (whole metaphase spreads with exact instance masks, the negatives a
metaphase reader must reject, segmentation training sets), `cases` (case folders in PNG or DICOM, of crops
or of whole metaphases; training sets) and `montage` (all 24 classes in one figure, a synthetic spread
beside a real one, for the docs).

May import: intake (imaging), ml, and the bottom.
"""
