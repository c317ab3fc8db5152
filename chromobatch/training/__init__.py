"""training: teaching the classifier. Records and the paired sampler, augmentation (records), the SCL and
focal losses (losses, pure tensor code), what a run is told and reports (config), the training loop (loop:
setup, step, validate, checkpoint), checkpoints and warm starts (checkpoint), torchrun's process group
(distributed), evaluation (evaluate), fitting the size prior (calibrate).

May import: ml, intake, store, and the bottom.
"""
