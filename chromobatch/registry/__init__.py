"""registry: model versions. Register a model, choose the one a command uses (register), nightly
retraining (retrain), promotion, rollback and the model list (promote), and the training lock (lock).

May import: ml, training, karyotype, intake, store, and the bottom.
"""
