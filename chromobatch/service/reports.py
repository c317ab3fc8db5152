"""Render a case's report after its results were committed, and record the outcome (store.reports).

Why a step of its own: see chromobatch.store.reports. Whatever the renderer or the disk does, the
committed results stand and the case stays due for a report until one is written.
"""

from __future__ import annotations

import logging
from pathlib import Path

from sqlalchemy.exc import SQLAlchemyError

from chromobatch.errors import CaseNotFound
from chromobatch.store.db import Database
from chromobatch.store.reports import record_report

log = logging.getLogger(__name__)


def render_and_record(database: Database, case_id: str, reports_dir: Path, *, claimed: bool = False) -> Path | None:
    """Render a case's report into reports_dir and record the outcome; never raises for a rendering failure.

    The results are committed before this runs: whatever the renderer or the disk does, they stand.
    """
    try:
        from chromobatch.report.render import render_case_report
    except ImportError as exc:  # pragma: no cover - reportlab is a dependency
        log.error("case %s: cannot render reports: %s", case_id, exc)
        return None
    pdf: Path | None = None
    error: str | None = None
    try:
        reports_dir.mkdir(parents=True, exist_ok=True)
        pdf = render_case_report(database, case_id, reports_dir=reports_dir).pdf
    except CaseNotFound:
        raise
    except OSError as exc:  # a full or read-only disk: transient, the report is tried again
        error = f"cannot write the report into {reports_dir}: {exc.strerror or exc}"
    except SQLAlchemyError as exc:
        error = f"cannot read the case from the database: {type(exc).__name__}: {str(exc)[:300]}"
    except Exception as exc:  # noqa: BLE001 - a renderer bug must not undo the committed results
        error = f"report rendering failed: {type(exc).__name__}: {str(exc)[:500]}"
        log.error("case %s: report rendering failed (a bug?)", case_id, exc_info=exc)
    if error is not None:
        log.error("case %s: report not rendered: %s; it will be tried again", case_id, error)
    try:
        record_report(database, case_id, path=pdf, error=error, claimed=claimed)
    except SQLAlchemyError as exc:
        log.error("case %s: could not record the report's outcome: %s (the report stays due)", case_id,
                  str(getattr(exc, "orig", None) or exc)[:300])
    return pdf
