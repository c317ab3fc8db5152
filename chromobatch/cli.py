"""The `chromobatch` command line: each command parses its arguments and calls the library.

Any ChromobatchError becomes one red line on stderr, a hint, and exit code 1.
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

from . import __version__
from .config import Settings, load_settings
from .errors import ChromobatchError

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
    return load_settings(overrides, config_file=_state["config"])


def setup_logging(level: str) -> None:
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)


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
        level = log_level or load_settings(config_file=config).log_level
    except ChromobatchError:
        level = log_level or "INFO"
    setup_logging(level)


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
    from .db import resolve_url, upgrade

    url = resolve_url(settings(db=db).db)
    upgrade(url, revision)
    typer.echo(f"database at revision {revision}")


@db_app.command("current")
@friendly
def db_current(db: DbOpt = None) -> None:
    """Print the schema revision of the database."""
    from .db import current_revision as rev
    from .db import make_engine, resolve_url

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
    from .db import connect
    from .ingest import ingest_case

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
    from .db import connect
    from .pipeline import load_predictor, process_case

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
    from .synth import generate_cases

    paths = generate_cases(out, cases=cases, cells=cells, fmt=fmt, abnormal_rate=abnormal_rate, seed=seed,
                           style=style)
    for path in paths:
        typer.echo(f"  {path.name}  {json.loads((path / 'truth.json').read_text())['karyotype']}")
    typer.echo(f"wrote {len(paths)} synthetic {style}-band cases ({fmt}, {cells} cells each) to {out}")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
