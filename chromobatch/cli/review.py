"""The review commands: `label`, `review` and `history` (reviewed labels and their audit trail).

chromobatch.cli registers the top-level commands (and the groups) on the app, in `chromobatch --help` order.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from chromobatch.cli.main import DbOpt, friendly, setting_help, settings
from chromobatch.errors import ChromobatchError

ReviewerOpt = Annotated[str | None, typer.Option("--reviewer", help=setting_help("Who reviews (kept in the audit "
                                                                                 "trail).", "reviewer"))]


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
    cfg = settings(db=db, reviewer=reviewer)
    with connect(cfg.db) as database:
        if show_history:
            _print_history(database, case_id)
        elif import_csv is not None:
            _print_changes(import_corrections(database, case_id, import_csv, reviewer=cfg.reviewer),
                           f"case {case_id}")
        else:
            assert chromosome is not None and as_label is not None
            _print_changes([set_label(database, case_id, cell=cell, chromosome=chromosome, label=as_label,
                                      reviewer=cfg.reviewer)], f"case {case_id}")


@friendly
def review(
    case_id: Annotated[str, typer.Argument(help="Case ID.")],
    accept: Annotated[bool, typer.Option("--accept", help="Accept the current predictions as reviewed labels "
                                                          "for every chromosome not reviewed yet.")] = False,
    reviewer: ReviewerOpt = None,
    db: DbOpt = None,
) -> None:
    """List a case's chromosomes with their numbers and labels, or accept its predictions (--accept)."""
    from chromobatch.review.labels import accept_predictions, chromosome_overview, files_not_used, metaphase_counts
    from chromobatch.store.db import connect

    cfg = settings(db=db, reviewer=reviewer)
    with connect(cfg.db) as database:
        if accept:
            _print_changes(accept_predictions(database, case_id, reviewer=cfg.reviewer), f"case {case_id}")
            return
        for ref, current, source in chromosome_overview(database, case_id):
            typer.echo(f"cell {ref.cell_number} ({ref.cell}) #{ref.number:<3} {ref.source_file:<32} "
                       f"{current or '-':>2}  {source or 'unlabelled'}")
        for number, cell, file, count, clusters in metaphase_counts(database, case_id):
            typer.echo(f"cell {number} ({cell}): {count} chromosomes counted in {file}"
                       + (f", {clusters} cluster(s) kept whole for review" if clusters else ""))
        not_used = files_not_used(database, case_id)
        if not_used:
            typer.secho(f"files not used ({len(not_used)}): a chromosome missing from a cell may be one of them",
                        fg=typer.colors.YELLOW)
            for file, reason in not_used:
                typer.secho(f"  {file}: {reason}", fg=typer.colors.YELLOW)


@friendly
def history(case_id: Annotated[str, typer.Argument(help="Case ID.")], db: DbOpt = None) -> None:
    """Print a case's label audit trail: every label, who set it, when, and the value it replaced."""
    from chromobatch.store.db import connect

    with connect(settings(db=db).db) as database:
        _print_history(database, case_id)

