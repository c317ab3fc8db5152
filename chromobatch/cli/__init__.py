"""cli: the `chromobatch` command. Each command parses its arguments, calls one or two library functions
and prints; a ChromobatchError becomes one red line, a hint and exit code 1.

`main` holds the app, its global options, `settings()` and `friendly`; the commands live in the module of
their group: `cases` (ingest, process, report, status, watch, demo), `review` (label, review, history),
`models` (models list|promote|rollback, train, calibrate, evaluate) and `admin` (config show, db, synth).
They are registered on the app here, in the order `chromobatch --help` lists them.

May import: anything (it is the top). `python -m chromobatch.cli` runs it too (the watcher's workers).
"""

from chromobatch.cli import admin, cases, models, review, segment, web
from chromobatch.cli.main import app, main

for _command in (cases.ingest, review.label, review.review, review.history, cases.demo, cases.watch, cases.status,
                 cases.report, cases.process, admin.synth, models.train, models.calibrate, models.evaluate):
    app.command()(_command)
app.add_typer(admin.config_app, name="config")
app.add_typer(admin.db_app, name="db")
app.add_typer(models.models_app, name="models")
app.add_typer(segment.segment_app, name="segment")
app.command()(web.serve)
app.add_typer(web.users_app, name="users")

__all__ = ["app", "main"]
