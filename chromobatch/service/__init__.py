"""service: what runs cases. The case pipeline (predict outside the write transaction, one commit per
case), the watcher (readiness, scanner, workers, supervisor), rendering the report as its own step, the
demo.

May import: registry, report, review, ml, training, karyotype, intake, synth, store, and the bottom.
"""
