"""store: the database. ORM models and the engine (db), the job queue (jobs), each case's report state
(reports).

May import: chromobatch (root names), errors, config, files, csvio, faults. Nothing above it: every other
room reads and writes the database through here, never the other way round.
"""
