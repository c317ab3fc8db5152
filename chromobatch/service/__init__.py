"""service: what runs cases. The case pipeline (predict outside the write transaction, one commit per
case), rendering the report as its own step, the demo, and the watcher: `watch` (the `chromobatch watch`
entry point and its overview), `casefolders` (paths, folder moves), `readiness`, `stopping` (signals),
`scanner`, `worker` and `supervisor` (worker processes), `batching` (several waiting cases in one forward
pass).

May import: registry, report, review, ml, training, karyotype, intake, synth, store, and the bottom.
"""
