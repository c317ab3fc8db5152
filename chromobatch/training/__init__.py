"""training: teaching the classifier. Records and the paired sampler, augmentation, the SCL and focal
losses (pure tensor code), the training loop, evaluation.

May import: ml, intake, store, and the bottom.
"""
