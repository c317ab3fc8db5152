"""The case commands: `ingest`, `process`, `report`, `status`, `watch` and `demo`.

chromobatch.cli registers the top-level commands (and the groups) on the app, in `chromobatch --help` order.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from chromobatch.cli.main import DbOpt, friendly, settings


@friendly
def ingest(
    case_dir: Annotated[Path, typer.Argument(help="Case folder (its name is the case ID).")],
    db: DbOpt = None,
    polarity: Annotated[str | None, typer.Option(help="auto, dark_on_light (G-band) or bright_on_dark (Q-band).")]
    = None,
) -> None:
    """Store a case folder's chromosomes (idempotent: stored content is skipped)."""
    from chromobatch.intake.ingest import ingest_case
    from chromobatch.store.db import connect

    cfg = settings(db=db, polarity=polarity)
    with connect(cfg.db) as database:
        result = ingest_case(database, case_dir, polarity=cfg.polarity, max_pixels=cfg.max_image_pixels)
    typer.echo(f"case {result.case_id}: {result.added} chromosomes added, {result.already_stored} already "
               f"stored, {result.cells} cells, {result.labels_imported} labels imported, "
               f"{len(result.rejected)} files rejected")
    for file, reason in sorted(result.rejected.items()):
        typer.secho(f"  rejected {file}: {reason}", fg=typer.colors.YELLOW)
    for problem in result.label_problems:
        typer.secho(f"  {problem}", fg=typer.colors.YELLOW)



@friendly
def process(
    case_dir: Annotated[Path, typer.Argument(help="Case folder (its name is the case ID).")],
    db: DbOpt = None,
    model: Annotated[str | None, typer.Option(help="Model folder (default: the database's active model).")] = None,
    reports: Annotated[Path | None, typer.Option(help="Folder for the PDF report.")] = None,
    force: Annotated[bool, typer.Option(help="Process again even if this content was processed by this model.")]
    = False,
    device: Annotated[str | None, typer.Option(help="auto, cpu or cuda.")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Chromosomes per forward pass.")] = None,
) -> None:
    """Ingest, classify and summarise one case (and render its report)."""
    from chromobatch.registry.register import load_predictor
    from chromobatch.service.pipeline import process_case, scan_input
    from chromobatch.store.db import connect

    cfg = settings(db=db, model=model, device=device, batch_size=batch_size,
                   reports_dir=str(reports) if reports else None)
    with connect(cfg.db) as database:
        scanned = scan_input(database, case_dir, cfg)  # a bad folder fails before a model is loaded
        predictor = load_predictor(database, cfg)
        result = process_case(database, case_dir, predictor=predictor, settings=cfg, force=force, scanned=scanned,
                              reports_dir=Path(cfg.reports_dir))
    if result.status == "skipped":
        typer.echo(f"case {result.case_id}: skipped (already processed with this model; --force to redo), "
                   f"karyotype {result.karyotype}")
        return
    typer.echo(f"case {result.case_id}: done, {result.n_chromosomes} chromosomes in {result.n_cells} cells, "
               f"suggested karyotype {result.karyotype} ({result.timings['total']:.1f}s)")
    for file, reason in sorted(result.rejected.items()):
        typer.secho(f"  rejected {file}: {reason}", fg=typer.colors.YELLOW)
    if result.report_path:
        typer.echo(f"  report: {result.report_path}")



@friendly
def report(
    case_id: Annotated[str, typer.Argument(help="Case ID (as shown by `chromobatch status`).")],
    db: DbOpt = None,
    out: Annotated[Path | None, typer.Option("--out", help="PDF path (default <reports_dir>/<case>.pdf).")] = None,
    cells: Annotated[int | None, typer.Option("--cells", min=1, help="Karyogram pages for the first N cells only.")]
    = None,
    png: Annotated[bool, typer.Option("--png", help="Also write each cell's karyogram as PNG.")] = False,
) -> None:
    """Render a case's karyogram PDF report (and an Encapsulated PDF .dcm for DICOM cases)."""
    from chromobatch.report.render import render_case_report
    from chromobatch.store.db import connect

    cfg = settings(db=db)
    reports_dir = Path(cfg.reports_dir)
    with connect(cfg.db) as database:
        result = render_case_report(database, case_id, out, cells=cells, reports_dir=reports_dir,
                                    png_dir=((out.parent if out else reports_dir) if png else None))
        if out is None and cells is None:  # the case's whole report at its usual place: no longer missing
            from chromobatch.store.reports import record_report

            record_report(database, case_id, path=result.pdf)
    typer.echo(f"{result.pdf} ({result.pages} pages)")
    for path in [*result.pngs, *([result.dicom] if result.dicom else [])]:
        typer.echo(str(path))



@friendly
def status(
    db: DbOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    recent: Annotated[int, typer.Option(help="How many recent cases to list.")] = 10,
) -> None:
    """Queue depth, running and failed jobs, recent cases and the active model."""
    from chromobatch.store.db import connect
    from chromobatch.store.jobs import format_status, queue_status

    with connect(settings(db=db).db) as database:
        info = queue_status(database, recent=recent)
    typer.echo(json.dumps(info, indent=2) if as_json else "\n".join(format_status(info)))



@friendly
def watch(
    incoming: Annotated[Path, typer.Argument(help="Folder the lab drops case folders into.")],
    db: DbOpt = None,
    reports: Annotated[Path | None, typer.Option(help="Folder for PDF reports (default: reports_dir setting, "
                                                      "relative to the incoming folder's parent).")] = None,
    poll: Annotated[float | None, typer.Option(help="Scan every SECONDS instead of inotify (network shares).")]
    = None,
    workers: Annotated[int | None, typer.Option(help="Worker processes sharing the database queue.")] = None,
    once: Annotated[bool, typer.Option(help="Process what is waiting, then exit (tests, cron).")] = False,
    readiness: Annotated[str | None, typer.Option(help="When a case folder is complete: either (READY marker or "
                                                       "quiet period), quiet, or ready (marker only).")] = None,
    worker_only: Annotated[bool, typer.Option(hidden=True, help="Internal: a worker process of a watcher.")]
    = False,
) -> None:
    """Process every case folder dropped into INCOMING; done -> processed/, failed -> failed/."""
    from chromobatch.service.watch import watch as run_watch

    cfg = settings(db=db, poll_seconds=poll, workers=workers, readiness=readiness)
    code = run_watch(incoming, cfg, once=once, reports_dir=reports.resolve() if reports else None,
                     worker_only=worker_only)
    raise typer.Exit(code)



@friendly
def demo(
    out: Annotated[Path, typer.Option(help="Folder for the demo's cases, database and reports.")] = Path("demo"),
    cells: Annotated[int, typer.Option(help="Cells per case.")] = 3,
    fmt: Annotated[str, typer.Option("--format", help="png, dicom or mixed.")] = "mixed",
    seed: Annotated[int, typer.Option(help="Seed of the synthetic cases.")] = 0,
    model: Annotated[str | None, typer.Option(help="Model folder (default: the shipped models/default).")] = None,
) -> None:
    """Generate synthetic cases, process them with the watcher and the shipped model, print the table."""
    from chromobatch.service.demo import run_demo

    rows = run_demo(out, settings(model=model), cells=cells, seed=seed, fmt=fmt)
    typer.echo("")
    typer.echo(f"{'case':<9} {'status':<7} {'cells':>5} {'chrom':>5}  {'synthetic truth':<24} "
               f"{'suggested karyotype':<24} report")
    for r in rows:
        mark = "" if r.suggested == r.truth else "  (differs)"
        typer.echo(f"{r.case_id:<9} {r.status:<7} {r.cells:>5} {r.chromosomes:>5}  {r.truth:<24} "
                   f"{(r.suggested or '-'):<24} {r.report or '-'}{mark}")
    agree = sum(r.suggested == r.truth for r in rows)
    typer.echo(f"\n{agree}/{len(rows)} suggested karyotypes match the synthetic truth. Database: "
               f"{(out / 'demo.sqlite')}. Results require review by a qualified cytogeneticist.")

