"""synth: synthetic G-/Q-band chromosomes, cells and case folders drawn from the GRCh38 ideogram, for the
demo, the tests and training experiments.

May import: intake (imaging), ml, and the bottom.
"""
