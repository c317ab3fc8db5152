"""The `chromobatch` command line: each command parses its arguments and calls the library.

Any ChromobatchError becomes one red line on stderr, a hint, and exit code 1.
"""

from __future__ import annotations

import functools
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

from chromobatch import __version__
from chromobatch.config import Settings, load_settings
from chromobatch.errors import ChromobatchError

app = typer.Typer(help="Batch chromosome classification and karyogram reports for cytogenetics labs.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
config_app = typer.Typer(help="Show the effective settings.", no_args_is_help=True)
db_app = typer.Typer(help="Database schema management.", no_args_is_help=True)
app.add_typer(config_app, name="config")
app.add_typer(db_app, name="db")

_state: dict[str, Any] = {"config": None}
F = TypeVar("F", bound=Callable[..., Any])

DbOpt = Annotated[str | None, typer.Option("--db", help="SQLite path or database URL (postgresql+psycopg://...).")]


def friendly(func: F) -> F:
    """Turn library errors into one red line plus a hint, exit code 1."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except ChromobatchError as exc:
            typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
            if exc.hint:
                typer.echo(f"hint: {exc.hint}", err=True)
            raise typer.Exit(1) from None

    return wrapper  # type: ignore[return-value]


def settings(**overrides: Any) -> Settings:
    cfg = load_settings(overrides, config_file=_state["config"])
    _apply_file_mode(cfg)
    return cfg


def _apply_file_mode(cfg: Settings) -> None:
    """file_mode -> the process umask, so that every file this command (and SQLite, and its children)
    creates gets that mode; empty leaves the umask the command was started with (systemd: UMask=)."""
    if cfg.file_mode:
        from chromobatch.files import umask_for_mode

        os.umask(umask_for_mode(int(cfg.file_mode, 8)))


def setup_logging(level: str) -> None:
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
    if logging.getLogger().level > logging.DEBUG:
        logging.getLogger("alembic").setLevel(logging.WARNING)  # migrations are routine, not news


def _version(value: bool) -> None:
    if value:
        typer.echo(f"chromobatch {__version__}")
        raise typer.Exit()


@app.callback()
def main_callback(
    config: Annotated[Path | None, typer.Option("--config", help="Settings file (default ./chromobatch.toml).")]
    = None,
    log_level: Annotated[str | None, typer.Option("--log-level", help="DEBUG, INFO, WARNING, ERROR.")] = None,
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True)] = False,
) -> None:
    _state["config"] = config
    try:
        cfg: Settings | None = load_settings(config_file=config)
    except ChromobatchError:
        cfg = None  # the command reports it, if it reads the settings
    setup_logging(log_level or (cfg.log_level if cfg is not None else "INFO"))
    if cfg is not None:
        _apply_file_mode(cfg)  # before any command creates a file, also those that never call settings()


# --------------------------------------------------------------------------------------------------
# config, db


@config_app.command("show")
@friendly
def config_show(
    db: DbOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Print the effective settings (defaults < chromobatch.toml < CHROMOBATCH_* < flags)."""
    values = settings(db=db).as_dict()
    if as_json:
        typer.echo(json.dumps(values, indent=2))
        return
    width = max(len(k) for k in values)
    for key, value in values.items():
        typer.echo(f"{key:<{width}}  {value}")


@db_app.command("upgrade")
@friendly
def db_upgrade(db: DbOpt = None, revision: str = "head") -> None:
    """Migrate the database schema (SQLite files are also migrated automatically on first use)."""
    from chromobatch.store.db import resolve_url, upgrade

    url = resolve_url(settings(db=db).db)
    upgrade(url, revision)
    typer.echo(f"database at revision {revision}")


@db_app.command("current")
@friendly
def db_current(db: DbOpt = None) -> None:
    """Print the schema revision of the database."""
    from chromobatch.store.db import current_revision as rev
    from chromobatch.store.db import make_engine, resolve_url

    engine = make_engine(resolve_url(settings(db=db).db))
    try:
        typer.echo(rev(engine) or "empty")
    finally:
        engine.dispose()


# --------------------------------------------------------------------------------------------------
# ingest


@app.command()
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
    database = connect(cfg.db)
    try:
        result = ingest_case(database, case_dir, polarity=cfg.polarity, max_pixels=cfg.max_image_pixels)
    finally:
        database.dispose()
    typer.echo(f"case {result.case_id}: {result.added} chromosomes added, {result.already_stored} already "
               f"stored, {result.cells} cells, {result.labels_imported} labels imported, "
               f"{len(result.rejected)} files rejected")
    for file, reason in sorted(result.rejected.items()):
        typer.secho(f"  rejected {file}: {reason}", fg=typer.colors.YELLOW)
    for problem in result.label_problems:
        typer.secho(f"  {problem}", fg=typer.colors.YELLOW)


# --- commands added by area modules below (keep each command thin) ---


# review loop, training from the database, model registry (chromobatch/review.py, chromobatch/retrain.py)

models_app = typer.Typer(help="The model registry: candidates, the active model, promotion and rollback.",
                         no_args_is_help=True)
app.add_typer(models_app, name="models")

ReviewerOpt = Annotated[str | None, typer.Option("--reviewer", envvar="CHROMOBATCH_REVIEWER",
                                                 help="Who reviews (kept in the audit trail).")]


def _print_history(database: Any, case_id: str) -> None:
    from chromobatch.review.labels import history

    entries = history(database, case_id)
    if not entries:
        typer.echo(f"case {case_id}: no labels yet")
    for e in entries:
        at = e.at.strftime("%Y-%m-%d %H:%M:%S") if e.at else "-"
        change = f"{e.previous} -> {e.label}" if e.previous is not None else f"{e.label}"
        who = f" by {e.reviewer}" if e.reviewer else ""
        typer.echo(f"{at}  cell {e.cell_number} ({e.cell}) #{e.number} {e.source_file}: {change}  "
                   f"[{e.source}{who}]")


def _print_changes(changes: list[Any], what: str) -> None:
    for c in changes:
        if c.changed:
            typer.echo(f"  cell {c.cell_number} #{c.number} {c.source_file}: {c.previous or '-'} -> {c.label}")
    typer.echo(f"{what}: {sum(c.changed for c in changes)} label(s) recorded, "
               f"{sum(not c.changed for c in changes)} already so")


@app.command()
@friendly
def label(
    case_id: Annotated[str, typer.Argument(help="Case ID.")],
    cell: Annotated[str | None, typer.Option(help="Cell name or 1-based cell number (report order).")] = None,
    chromosome: Annotated[str | None, typer.Option(help="1-based number within the cell (source-file order) "
                                                        "or the source file name.")] = None,
    as_label: Annotated[str | None, typer.Option("--as", help="The correct class: 1-22, X or Y.")] = None,
    import_csv: Annotated[Path | None, typer.Option("--import", help="Corrections CSV: file,label or "
                                                                     "cell,chromosome,label.")] = None,
    reviewer: ReviewerOpt = None,
    show_history: Annotated[bool, typer.Option("--history", help="Print the case's label audit trail.")] = False,
    db: DbOpt = None,
) -> None:
    """Correct chromosome labels (kept as reviewed labels with who, when and the previous value)."""
    from chromobatch.review.labels import import_corrections, set_label
    from chromobatch.store.db import connect

    if not show_history and import_csv is None and (chromosome is None or as_label is None):
        raise ChromobatchError("give --chromosome N --as LABEL (with --cell), --import FILE, or --history")
    database = connect(settings(db=db).db)
    try:
        if show_history:
            _print_history(database, case_id)
        elif import_csv is not None:
            _print_changes(import_corrections(database, case_id, import_csv, reviewer=reviewer or ""),
                           f"case {case_id}")
        else:
            assert chromosome is not None and as_label is not None
            _print_changes([set_label(database, case_id, cell=cell, chromosome=chromosome, label=as_label,
                                      reviewer=reviewer or "")], f"case {case_id}")
    finally:
        database.dispose()


@app.command()
@friendly
def review(
    case_id: Annotated[str, typer.Argument(help="Case ID.")],
    accept: Annotated[bool, typer.Option("--accept", help="Accept the current predictions as reviewed labels "
                                                          "for every chromosome not reviewed yet.")] = False,
    reviewer: ReviewerOpt = None,
    db: DbOpt = None,
) -> None:
    """List a case's chromosomes with their numbers and labels, or accept its predictions (--accept)."""
    from chromobatch.review.labels import accept_predictions, chromosome_overview, files_not_used
    from chromobatch.store.db import connect

    database = connect(settings(db=db).db)
    try:
        if accept:
            _print_changes(accept_predictions(database, case_id, reviewer=reviewer or ""), f"case {case_id}")
            return
        for ref, current, source in chromosome_overview(database, case_id):
            typer.echo(f"cell {ref.cell_number} ({ref.cell}) #{ref.number:<3} {ref.source_file:<32} "
                       f"{current or '-':>2}  {source or 'unlabelled'}")
        not_used = files_not_used(database, case_id)
        if not_used:
            typer.secho(f"files not used ({len(not_used)}): a chromosome missing from a cell may be one of them",
                        fg=typer.colors.YELLOW)
            for file, reason in not_used:
                typer.secho(f"  {file}: {reason}", fg=typer.colors.YELLOW)
    finally:
        database.dispose()


@app.command()
@friendly
def history(case_id: Annotated[str, typer.Argument(help="Case ID.")], db: DbOpt = None) -> None:
    """Print a case's label audit trail: every label, who set it, when, and the value it replaced."""
    from chromobatch.store.db import connect

    database = connect(settings(db=db).db)
    try:
        _print_history(database, case_id)
    finally:
        database.dispose()


def _train_from_db(cfg: Any, db: str, *, models_dir: Path, margin: float, val_fraction: float,
                   lock: Path | None, promote: bool, progress: bool, warm_start: bool) -> None:
    """`train --db`: retrain.retrain, with its own exit code when another run holds the lock."""
    from chromobatch.registry.retrain import RetrainOptions, TrainingLocked, retrain
    from chromobatch.store.db import connect

    database = connect(settings(db=db).db)
    try:
        result = retrain(database, cfg, RetrainOptions(models_dir=models_dir, margin=margin,
                                                       val_fraction=val_fraction, lock_path=lock, promote=promote,
                                                       warm_start=warm_start),
                         progress=progress)
    except TrainingLocked as exc:
        typer.echo(f"skipped: {exc}", err=True)
        raise typer.Exit(exc.exit_code) from None
    finally:
        database.dispose()
    if result is None:  # a torchrun rank other than 0
        return
    d = result.data
    typer.echo(f"trained on {d['n_train']} chromosomes ({d['patients'] - d['val_patients']} patients), validated "
               f"on {d['n_val']} ({d['val_patients']} patients) in {result.seconds:.0f}s")
    typer.echo(f"model {result.name} {result.version} (id {result.version_id}) at {result.model_dir}: "
               f"{result.status} - {result.reason}")


@models_app.command("list")
@friendly
def models_list(db: DbOpt = None,
                as_json: Annotated[bool, typer.Option("--json", help="Print JSON (with the history).")] = False
                ) -> None:
    """Every registered model version with its status, validation accuracy and reason."""
    from chromobatch.registry.retrain import format_models, list_models
    from chromobatch.store.db import connect

    database = connect(settings(db=db).db)
    try:
        rows = list_models(database)
    finally:
        database.dispose()
    typer.echo(json.dumps(rows, indent=2, default=str) if as_json else "\n".join(format_models(rows)))


@models_app.command("promote")
@friendly
def models_promote(
    version: Annotated[str, typer.Argument(help="Model id, version, name-version or sha256 prefix.")],
    reason: Annotated[str | None, typer.Option(help="Why (kept in the registry).")] = None,
    db: DbOpt = None,
) -> None:
    """Make a model version the active one (watchers switch before their next case)."""
    from chromobatch.registry.retrain import promote
    from chromobatch.store.db import connect

    database = connect(settings(db=db).db)
    try:
        row = promote(database, version, reason=reason)
    finally:
        database.dispose()
    typer.echo(f"model {row.name} {row.version} (id {row.id}) is now active")


@models_app.command("rollback")
@friendly
def models_rollback(
    reason: Annotated[str | None, typer.Option(help="Why (kept in the registry).")] = None,
    db: DbOpt = None,
) -> None:
    """Re-activate the model that was active before the current one; the current one is retired."""
    from chromobatch.registry.retrain import rollback
    from chromobatch.store.db import connect

    database = connect(settings(db=db).db)
    try:
        old, new = rollback(database, reason=reason)
    finally:
        database.dispose()
    typer.echo(f"retired {old.name} {old.version} (id {old.id}); {new.name} {new.version} (id {new.id}) is "
               "active again")


@app.command()
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


@app.command()
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


@app.command()
@friendly
def status(
    db: DbOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    recent: Annotated[int, typer.Option(help="How many recent cases to list.")] = 10,
) -> None:
    """Queue depth, running and failed jobs, recent cases and the active model."""
    from chromobatch.store.db import connect
    from chromobatch.store.jobs import format_status, queue_status

    database = connect(settings(db=db).db)
    try:
        info = queue_status(database, recent=recent)
    finally:
        database.dispose()
    typer.echo(json.dumps(info, indent=2) if as_json else "\n".join(format_status(info)))


@app.command()
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
    database = connect(cfg.db)
    try:
        result = render_case_report(database, case_id, out, cells=cells, reports_dir=reports_dir,
                                    png_dir=((out.parent if out else reports_dir) if png else None))
        if out is None and cells is None:  # the case's whole report at its usual place: no longer missing
            from chromobatch.store.reports import record_report

            record_report(database, case_id, path=result.pdf)
    finally:
        database.dispose()
    typer.echo(f"{result.pdf} ({result.pages} pages)")
    for path in [*result.pngs, *([result.dicom] if result.dicom else [])]:
        typer.echo(str(path))


@app.command()
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
    from chromobatch.service.pipeline import process_case
    from chromobatch.store.db import connect

    cfg = settings(db=db, model=model, device=device, batch_size=batch_size,
                   reports_dir=str(reports) if reports else None)
    database = connect(cfg.db)
    try:
        predictor = load_predictor(database, cfg)
        result = process_case(database, case_dir, predictor=predictor, settings=cfg, force=force,
                              reports_dir=Path(cfg.reports_dir))
    finally:
        database.dispose()
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


@app.command()
@friendly
def synth(
    out: Annotated[Path, typer.Argument(help="Folder to write the case folders SYN0001... into.")],
    cases: Annotated[int, typer.Option(help="Number of cases.")] = 10,
    cells: Annotated[int, typer.Option(help="Cells (metaphases) per case.")] = 3,
    fmt: Annotated[str, typer.Option("--format", help="png (cell sub-folders) or dicom (flat .dcm files).")]
    = "png",
    abnormal_rate: Annotated[float, typer.Option(help="Fraction of abnormal cases (trisomies, X/Y, mosaics).")]
    = 0.3,
    seed: Annotated[int, typer.Option(help="Random seed: the same seed writes the same bytes.")] = 0,
    style: Annotated[str, typer.Option(help="G (dark bands on light) or Q (bright bands on dark).")] = "G",
) -> None:
    """Write synthetic cases drawn from the GRCh38 ideogram, each with labels.csv and truth.json."""
    from chromobatch.synth.generate import generate_cases

    paths = generate_cases(out, cases=cases, cells=cells, fmt=fmt, abnormal_rate=abnormal_rate, seed=seed,
                           style=style)
    for path in paths:
        typer.echo(f"  {path.name}  {json.loads((path / 'truth.json').read_text())['karyotype']}")
    typer.echo(f"wrote {len(paths)} synthetic {style}-band cases ({fmt}, {cells} cells each) to {out}")


@app.command()
@friendly
def train(
    data: Annotated[Path | None, typer.Option("--data", help="Manifest CSV path,label[,patient,cell,split] or "
                                                             "DIR/<label>/")] = None,
    out: Annotated[Path | None, typer.Option("--out", help="Model folder to write (model.safetensors + "
                                                           "model.json).")] = None,
    backbone: Annotated[str, typer.Option(help="Any timm model name (random init, never downloaded).")] = "resnet18",
    input_size: Annotated[int, typer.Option("--input-size", help="Square input side in pixels.")] = 96,
    embed_dim: Annotated[int, typer.Option("--embed-dim", help="Embedding size D.")] = 1024,
    steps: Annotated[int, typer.Option(help="Training steps (each: B1 + B2, 24 images each).")] = 2000,
    no_scl: Annotated[bool, typer.Option("--no-scl", help="Baseline: lambda_con = 0, same sampler and steps.")]
    = False,
    lambda_con: Annotated[float | None, typer.Option("--lambda-con", help="Weight of L_con (default 1).")] = None,
    lambda_cls: Annotated[float | None, typer.Option("--lambda-cls", help="Weight of L_cls (default 1; code: 2).")]
    = None,
    lr: Annotated[float, typer.Option(help="Adam learning rate (warm-up, then cosine).")] = 1e-3,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from OUT/checkpoint.")] = False,
    init_from: Annotated[Path | None, typer.Option("--init-from", help="Warm start: begin from this model "
                         "folder's weights and preprocessing (fresh optimiser and schedule).")] = None,
    checkpoint_every: Annotated[int, typer.Option("--checkpoint-every", help="Steps between checkpoints.")] = 500,
    val_every: Annotated[int, typer.Option("--val-every", help="Steps between validations.")] = 200,
    patience: Annotated[int, typer.Option(help="Validations without improvement before stopping (0: never).")]
    = 5,
    preprocess: Annotated[str, typer.Option("--preprocess", help="fixed, cell or fit (see docs/results.md).")]
    = "fixed",
    size_power: Annotated[float, typer.Option("--size-power", help="fixed/cell: < 1 compresses the size range "
                          "(small chromosomes get more pixels, order kept); 1 = none.")] = 1.0,
    orient: Annotated[str, typer.Option("--orient", help="none, or upright: turn each crop's long axis vertical "
                                                          "before the model (crops cut at any angle).")] = "none",
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    time_budget: Annotated[float | None, typer.Option("--time-budget", help="Minutes the training loop may run in all "
                           "(--resume counts the time already spent); the schedule anneals over whichever runs out "
                           "first, --steps or time.")] = None,
    variant: Annotated[str, typer.Option(help="paper (the text) or code (the authors' public code).")] = "paper",
    rotate: Annotated[float, typer.Option(help="Random rotation augmentation in degrees (+-); 180 for crops in "
                                               "metaphase orientation.")] = 15.0,
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
    size_prior: Annotated[bool, typer.Option(help="After training, fit the size prior (relative DNA content per "
                          "class) on the training cells; kept only if it helps on the validation cells.")] = True,
    db: Annotated[str | None, typer.Option("--db", help="Train from this database's reviewed/imported labels "
                                                        "instead of --data; registers (and may promote) the model.")]
    = None,
    models_dir: Annotated[Path, typer.Option("--models-dir", envvar="CHROMOBATCH_MODELS_DIR",
                                             help="--db: registry folder for <name>-<timestamp>/.")]
    = Path("models/registry"),
    margin: Annotated[float, typer.Option(help="--db: promote when the candidate's validation accuracy is at most "
                                               "this many percentage points below the active model's.")] = 0.0,
    val_fraction: Annotated[float, typer.Option("--val-fraction", help="--db: share of patients that validate.")]
    = 0.2,
    lock: Annotated[Path | None, typer.Option("--lock", envvar="CHROMOBATCH_TRAIN_LOCK",
                                              help="--db: lock file (default <sqlite>.train.lock or "
                                                   "<models-dir>/.train.lock).")] = None,
    promote: Annotated[bool, typer.Option(help="--db: promote a good enough candidate (else register only).")]
    = True,
    warm_start: Annotated[bool, typer.Option("--warm-start", help="--db: fine-tune the active model (its "
                          "architecture and preprocessing) instead of training from random weights.")] = False,
) -> None:
    """Train a classifier with supervised contrastive learning (torchrun-aware: same command, DDP).

    With --db: train on the lab's labelled cases, register a candidate, promote it if it is not worse than the
    active model (exit code 75 when another training run holds the lock)."""
    from chromobatch.training.loop import TrainConfig
    from chromobatch.training.loop import train as run_training
    from chromobatch.training.records import AugmentConfig

    if (data is None) == (db is None):
        raise ChromobatchError("give either --data (a manifest or class folders) or --db (train from the "
                               "database's labelled cases)", hint="See `chromobatch train --help`.")
    if db is not None and (out is not None or resume):
        raise ChromobatchError("--out and --resume are for --data; with --db the model goes to "
                               "--models-dir/<name>-<timestamp>")
    if data is not None and out is None:
        raise ChromobatchError("--data needs --out (the model folder to write)")
    if warm_start and db is None:
        raise ChromobatchError("--warm-start is for --db; with --data use --init-from MODEL_DIR")
    if warm_start and init_from is not None:
        raise ChromobatchError("give --warm-start (the active model) or --init-from, not both")
    cfg = TrainConfig(orient=orient, size_power=size_power, backbone=backbone, input_size=input_size,
                      embed_dim=embed_dim, steps=steps,
                      no_scl=no_scl,
                      lambda_con=lambda_con, lambda_cls=lambda_cls, lr=lr, seed=seed, preprocess=preprocess,
                      checkpoint_every=checkpoint_every, val_every=val_every, patience=patience, device=device,
                      variant=variant, augment=AugmentConfig(rotate_deg=rotate),
                      init_from=str(init_from) if init_from is not None else None, size_prior=size_prior,
                      time_budget_s=None if time_budget is None else time_budget * 60)
    if db is not None:
        _train_from_db(cfg, db, models_dir=models_dir, margin=margin, val_fraction=val_fraction, lock=lock,
                       promote=promote, progress=progress, warm_start=warm_start)
        return
    assert data is not None and out is not None
    result = run_training(cfg, data, out, resume=resume, progress=progress)
    best = "-" if result.best_val_accuracy is None else f"{result.best_val_accuracy:.4f} (step {result.best_step})"
    typer.echo(f"trained {backbone}: {result.steps_done} steps in {result.seconds:.0f}s "
               f"({result.images_per_second:.0f} images/s), best val accuracy {best}, t={result.final_temperature:.2f}"
               f"{', stopped early' if result.stopped_early else ''}"
               f"{', stopped at the time budget' if result.out_of_time else ''}")
    if result.size_prior is not None:
        typer.echo(_prior_line(result.size_prior))
    typer.echo(f"model written to {result.model_dir}")


def _prior_line(info: dict[str, Any]) -> str:
    if not info.get("weight"):
        return f"size prior: not used ({info.get('reason') or 'no gain on the validation cells'})"
    return (f"size prior: weight {info['weight']:g}, validation accuracy {info['val_accuracy_without']:.4f} -> "
            f"{info['val_accuracy_with']:.4f} ({info['val_n']} crops)")


@app.command()
@friendly
def calibrate(
    model: Annotated[Path, typer.Option("--model", help="Model folder to add the size prior to (model.json is "
                                                        "rewritten; the weights stay).")],
    data: Annotated[Path, typer.Option("--data", help="Manifest CSV with patient/cell columns: train rows fit "
                                                      "the prior, val rows tune its weight.")],
    device: Annotated[str, typer.Option(help="cpu or cuda.")] = "cpu",
) -> None:
    """Fit a model's size prior on labelled cells (what `train` does at its end), e.g. for a model trained
    elsewhere. Without a split column, 10% of the cells tune the weight."""
    from chromobatch.ml.folders import read_meta
    from chromobatch.training.calibrate import calibrate as run_calibration
    from chromobatch.training.records import load_records, split_records

    read_meta(model)  # a wrong --model fails before the data is decoded
    train_recs, val_recs = split_records(load_records(data, splits=("train", "val")))
    typer.echo(_prior_line(run_calibration(model, train_recs, val_recs, device=device)))


@app.command()
@friendly
def evaluate(
    model: Annotated[Path, typer.Option("--model", help="Model folder (model.safetensors + model.json).")],
    data: Annotated[Path, typer.Option("--data", help="Manifest CSV or DIR/<label>/*.png.")],
    split: Annotated[str, typer.Option(help="Split to evaluate when the data has a split column ('all': every row).")]
    = "test",
    json_out: Annotated[Path | None, typer.Option("--json", help="Write the metrics JSON here.")] = None,
    out: Annotated[Path | None, typer.Option("--out", help="Folder for the HTML report and figures.")] = None,
    device: Annotated[str, typer.Option(help="cpu or cuda.")] = "cpu",
    size_prior: Annotated[bool, typer.Option(help="Use the model's size prior, if it has one (--no-size-prior: "
                                                  "the image model alone).")] = True,
) -> None:
    """Accuracy, macro recall, macro AUC and a per-class table (plus report figures with --out)."""
    from chromobatch.training.evaluate import evaluate as run_evaluation

    metrics = run_evaluation(model, data, out, split=split, device=device, size_prior=size_prior)
    auc = "-" if metrics["auc_macro"] is None else f"{metrics['auc_macro']:.4f}"
    typer.echo(f"{metrics['n']} images: accuracy {metrics['accuracy']:.4f}, "
               f"macro recall {metrics['recall_macro']:.4f}, macro AUC {auc}")
    for row in metrics["per_class"]:
        if row["n"]:
            typer.echo(f"  {row['class']:>2}  n={row['n']:<5} recall {row['recall']:.3f}")
    if json_out is not None:
        json_out.write_text(json.dumps(metrics, indent=2))
        typer.echo(f"metrics written to {json_out}")
    if out is not None:
        typer.echo(f"report written to {metrics['report']}")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
