"""The report's state on each case: due, claimed for a try, rendered, or failed with its error.

(Rendering itself is chromobatch.service.reports.render_and_record; this module only keeps the record.)
The report as a tracked step of its own, after the results' commit.

Why: the results of a case are committed first (one transaction), the PDF is rendered after. A full disk,
a worker killed in between or a renderer bug must not leave a case without its report unnoticed. So each
case records when its report was rendered (`report_at`), where, and the last error; a case is *due* while
report_at is unset or older than processed_at. The watcher's workers render due reports when idle, one
worker per case (a conditional UPDATE claims it and sets the next try, with exponential backoff), and
`chromobatch status` lists the cases whose report is missing.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

from sqlalchemy import ColumnElement, and_, exists, func, or_, select, update

from chromobatch.faults import backoff
from chromobatch.store.db import Case, Database, Job, rowcount, utcnow
from chromobatch.store.states import CaseStatus, JobState

log = logging.getLogger(__name__)

#: First retry of a failed rendering after this many seconds, doubling per failure up to the cap.
RETRY_FIRST_S = 5.0
RETRY_CAP_S = 300.0
MAX_ERROR_CHARS = 1000


@dataclass(frozen=True)
class MissingReport:
    case_id: str
    attempts: int
    error: str | None
    next_at: datetime | None


def retry_delay(attempts: int) -> float:
    """Seconds before the next try after `attempts` failed ones."""
    return backoff(attempts, first=RETRY_FIRST_S, cap=RETRY_CAP_S)


def _due() -> ColumnElement[bool]:
    return and_(Case.status == CaseStatus.DONE, Case.processed_at.is_not(None),
                or_(Case.report_at.is_(None), Case.report_at < Case.processed_at))


def _busy(cutoff: datetime) -> ColumnElement[bool]:
    """A worker is on the case right now (processing it, or rendering right after its commit)."""
    return exists().where(Job.case_pk == Case.id, Job.state.in_((JobState.RUNNING, JobState.DONE)),
                          Job.worker.is_not(None), Job.heartbeat_at >= cutoff)


def claim_due_reports(database: Database, *, busy_after: float, limit: int = 5) -> list[str]:
    """Case IDs whose report is due and whose next try has come; each is claimed by setting that next try.

    busy_after: a job heartbeat younger than this means its worker is still on the case (stale_after_seconds).
    """
    now = utcnow()
    claimed: list[str] = []
    with database.session() as s:
        rows = s.execute(select(Case.id, Case.case_id, Case.report_attempts).where(
            _due(), or_(Case.report_next_at.is_(None), Case.report_next_at <= now),
            ~_busy(now - timedelta(seconds=busy_after))).order_by(Case.processed_at).limit(limit)).all()
        for pk, case_id, attempts in rows:
            flipped = s.execute(
                update(Case).where(Case.id == pk, Case.report_attempts == attempts)
                .values(report_attempts=attempts + 1,
                        report_next_at=now + timedelta(seconds=retry_delay(attempts + 1)))
                .execution_options(synchronize_session=False))
            if rowcount(flipped) == 1:
                claimed.append(case_id)
    return claimed


def record_report(database: Database, case_id: str, *, path: Path | None = None, error: str | None = None,
                  claimed: bool = False) -> None:
    """Record a rendered report (path) or a failed rendering (error). A claimed try (claim_due_reports) has
    its next try set already; the pipeline's first rendering sets one here."""
    now = utcnow()
    with database.session() as s:
        case = s.execute(select(Case).where(Case.case_id == case_id)).scalar_one_or_none()
        if case is None:
            return
        if error is None:
            case.report_at, case.report_path, case.report_error = now, str(path) if path else None, None
            case.report_attempts, case.report_next_at = 0, None
        else:
            case.report_error = error[:MAX_ERROR_CHARS]
            if not claimed:
                case.report_attempts = (case.report_attempts or 0) + 1
                case.report_next_at = now + timedelta(seconds=retry_delay(case.report_attempts))


def missing_reports(database: Database, *, limit: int = 10) -> tuple[int, list[MissingReport]]:
    """How many done cases have no current report, and the oldest `limit` of them."""
    with database.session() as s:
        total = int(s.execute(select(func.count()).select_from(Case).where(_due())).scalar_one())
        rows = s.execute(select(Case).where(_due()).order_by(Case.processed_at).limit(limit)).scalars()
        items = [MissingReport(c.case_id, c.report_attempts or 0, c.report_error, c.report_next_at)
                 for c in rows]
    return total, items
