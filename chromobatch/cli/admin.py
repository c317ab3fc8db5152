"""`chromobatch config show`, `db upgrade|current` and `synth`: settings, the schema, synthetic cases.

chromobatch.cli registers the top-level commands (and the groups) on the app, in `chromobatch --help` order.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from chromobatch.cli.main import DbOpt, friendly, settings

config_app = typer.Typer(help="Show the effective settings.", no_args_is_help=True)
db_app = typer.Typer(help="Database schema management.", no_args_is_help=True)


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
    metaphase: Annotated[bool, typer.Option("--metaphase", help="One whole metaphase image per cell instead of "
                                            "chromosome crops (truth.json holds each cell's count and classes).")]
    = False,
    metaphase_layout: Annotated[str, typer.Option(help="With --metaphase: flat (CASE/cellNN.png) or folder "
                                                  "(CASE/cellNN/metaphase.png).")] = "flat",
    negatives: Annotated[str, typer.Option(help="With --metaphase: also one image of each of these kinds per "
                                           "case, which must be rejected (comma-separated: blank, nucleus, "
                                           "karyogram).")] = "",
    metaphase_image: Annotated[str, typer.Option(help="With --metaphase: png, png16, tif, tif16 or jpg.")]
    = "png",
) -> None:
    """Write synthetic cases drawn from the GRCh38 ideogram, each with truth.json (and labels.csv for crops)."""
    from chromobatch.synth.cases import generate_cases

    paths = generate_cases(out, cases=cases, cells=cells, fmt=fmt, abnormal_rate=abnormal_rate, seed=seed,
                           style=style, metaphase=metaphase_layout if metaphase else None,
                           negatives=[n.strip() for n in negatives.split(",") if n.strip()],
                           metaphase_image=metaphase_image)
    for path in paths:
        truth = json.loads((path / "truth.json").read_text())
        counts = f"  counts {','.join(str(c['count']) for c in truth['cells'])}" if metaphase else ""
        typer.echo(f"  {path.name}  {truth['karyotype']}{counts}")
    kind = f"whole metaphases, {metaphase_layout}" if metaphase else fmt
    typer.echo(f"wrote {len(paths)} synthetic {style}-band cases ({kind}, {cells} cells each) to {out}")

