"""registry: model versions. Register a model, choose the one a command uses (register), nightly
retraining with promotion and rollback and the training lock (retrain).

May import: ml, training, karyotype, intake, store, and the bottom.
"""
