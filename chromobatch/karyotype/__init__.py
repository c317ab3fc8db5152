"""karyotype: from classes to a karyotype. Per-cell assignment to karyotype slots (assign) and ISCN
karyotypes with the clonality rule (iscn). Pure functions over labels and probabilities.

May import: the bottom only (root names, errors).
"""
