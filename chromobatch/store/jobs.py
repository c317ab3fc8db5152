"""The job queue in the `jobs` table, shared by every worker process (and host) on one database.

Job states: queued -> running -> done | failed (a failed attempt below max_attempts goes back to queued).

* Enqueue is race-safe without a unique constraint: the case row is the lock (PostgreSQL: INSERT ... ON
  CONFLICT DO NOTHING, then SELECT ... FOR UPDATE; SQLite: every transaction is BEGIN IMMEDIATE, so writers
  are serialised anyway), and a case never has two queued/running jobs.
* Claim: PostgreSQL picks a row with SELECT ... FOR UPDATE SKIP LOCKED; both backends then flip it with a
  conditional UPDATE ... WHERE state='queued', so two claimers can never get the same job.
* A running job carries a heartbeat; one whose heartbeat is older than stale_after_seconds belongs to a
  dead worker and is re-queued (or failed once max_attempts claims were used up). Attempts count claims,
  so a case that kills its worker every time still ends `failed`.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import func, or_, select, update
from sqlalchemy.orm import Session

from chromobatch import validate_case_id
from chromobatch.store.db import Case, Database, Job, RejectedFile, active_model, aware, rowcount, utcnow
from chromobatch.store.reports import missing_reports
from chromobatch.store.states import CaseStatus, JobState

log = logging.getLogger(__name__)

ACTIVE_STATES = (JobState.QUEUED, JobState.RUNNING)
#: Longest error text stored on a job or case (tracebacks are logged, not stored).
MAX_ERROR_CHARS = 2000
#: Most rejected files `status` lists (the report and `review` list all of a case's).
MAX_LISTED_FILES = 50


@dataclass(frozen=True)
class EnqueueResult:
    """What enqueue did: queued (a new job), active (a job is already queued/running), leftover (the folder
    was already processed by `job_id` but not moved yet: a crash between commit and move), or gone."""

    action: str
    case_id: str
    job_id: int | None = None
    job_state: str | None = None
    finished_at: datetime | None = None


@dataclass(frozen=True)
class ClaimedJob:
    id: int
    case_pk: int
    case_id: str
    path: str
    attempts: int
    worker: str
    created_at: datetime | None = None
    #: When this claim started: a folder that changed after it is still being delivered.
    started_at: datetime | None = None


@dataclass(frozen=True)
class ReclaimedJob:
    id: int
    case_id: str
    path: str
    state: str  # queued (will be retried) | failed (attempts used up)
    worker: str | None


def last_change(folder: Path) -> datetime | None:
    """Newest ctime under a folder (ctime, unlike mtime, cannot be set back by `cp -p`); None if it is gone."""
    newest = 0
    try:
        newest = os.stat(folder).st_ctime_ns
        for dirpath, dirnames, filenames in os.walk(folder):
            for name in dirnames + filenames:
                try:
                    newest = max(newest, os.lstat(os.path.join(dirpath, name)).st_ctime_ns)
                except FileNotFoundError:
                    continue
    except FileNotFoundError:
        return None
    return datetime.fromtimestamp(newest / 1e9, UTC)


def _clip(text: str) -> str:
    return text if len(text) <= MAX_ERROR_CHARS else text[:MAX_ERROR_CHARS - 3] + "..."


def _insert_case_if_missing(s: Session, case_id: str, path: str) -> None:
    values: dict[str, Any] = {"case_id": case_id, "source_path": path, "status": CaseStatus.RECEIVED, "meta": {},
                              "received_at": utcnow()}
    dialect = s.get_bind().dialect.name
    if dialect == "postgresql":
        from sqlalchemy.dialects import postgresql

        s.execute(postgresql.insert(Case).values(**values).on_conflict_do_nothing(index_elements=["case_id"]))
    elif dialect == "sqlite":
        from sqlalchemy.dialects import sqlite

        s.execute(sqlite.insert(Case).values(**values).on_conflict_do_nothing(index_elements=["case_id"]))
    elif s.execute(select(Case.id).where(Case.case_id == case_id)).first() is None:  # pragma: no cover
        s.add(Case(**values))  # only SQLite and PostgreSQL are supported
        s.flush()


def enqueue(database: Database, case_dir: Path) -> EnqueueResult:
    """Queue a ready case folder once; raises InvalidCaseId for a folder name that is not a case ID."""
    case_dir = Path(case_dir).absolute()
    case_id = validate_case_id(case_dir.name)
    path = str(case_dir)
    with database.session() as s:
        _insert_case_if_missing(s, case_id, path)
        case = s.execute(select(Case).where(Case.case_id == case_id).with_for_update()).scalar_one()
        active = s.execute(select(Job).where(Job.case_pk == case.id, Job.state.in_(ACTIVE_STATES))
                           .order_by(Job.id).limit(1)).scalar_one_or_none()
        if active is not None:
            return EnqueueResult("active", case_id, active.id, active.state)
        changed = last_change(case_dir)
        if changed is None:
            return EnqueueResult("gone", case_id)
        last = s.execute(select(Job).where(Job.case_pk == case.id).order_by(Job.id.desc()).limit(1)
                         ).scalar_one_or_none()
        started = aware(last.started_at) if last is not None else None
        if last is not None and last.path == path and started is not None and changed < started:
            # Nothing in the folder changed since that job picked it up: it is that job's folder, left behind.
            return EnqueueResult("leftover", case_id, last.id, last.state, aware(last.finished_at))
        job = Job(case_pk=case.id, path=path, state=JobState.QUEUED, attempts=0, created_at=utcnow())
        s.add(job)
        case.source_path = path
        if case.status == CaseStatus.FAILED:
            case.status, case.error = CaseStatus.RECEIVED, None
        s.flush()
        return EnqueueResult("queued", case_id, job.id, JobState.QUEUED)


def claim(database: Database, worker: str) -> ClaimedJob | None:
    """Take the oldest queued job for `worker`, or None when nothing is queued."""
    for _ in range(20):  # lost races only: another claimer flipped our candidate first
        with database.session() as s:
            pick = select(Job.id).where(Job.state == JobState.QUEUED).order_by(Job.id).limit(1)
            if s.get_bind().dialect.name == "postgresql":
                pick = pick.with_for_update(skip_locked=True)
            job_id = s.execute(pick).scalar_one_or_none()
            if job_id is None:
                return None
            now = utcnow()
            flipped = s.execute(
                update(Job).where(Job.id == job_id, Job.state == JobState.QUEUED)
                .values(state=JobState.RUNNING, worker=worker[:128], attempts=Job.attempts + 1, started_at=now,
                        heartbeat_at=now, finished_at=None)
                .execution_options(synchronize_session=False))
            if rowcount(flipped) != 1:
                continue
            row = s.execute(select(Job, Case.case_id).join(Case, Case.id == Job.case_pk)
                            .where(Job.id == job_id)).one()
            job, case_id = row
            return ClaimedJob(job.id, job.case_pk, case_id, job.path, job.attempts, worker[:128],
                              aware(job.created_at), aware(job.started_at))
    return None


def heartbeat(database: Database, job_id: int, worker: str) -> bool:
    """Refresh a running job's heartbeat; False when the job is no longer ours (reclaimed meanwhile).

    A job this worker already marked done (the pipeline commits that with the results, before the report
    is rendered) still counts as ours.
    """
    with database.session() as s:
        res = s.execute(update(Job).where(Job.id == job_id, Job.state.in_((JobState.RUNNING, JobState.DONE)),
                                          Job.worker == worker[:128])
                        .values(heartbeat_at=utcnow()).execution_options(synchronize_session=False))
        return rowcount(res) == 1


def reclaim_stale(database: Database, *, stale_after: float, max_attempts: int) -> list[ReclaimedJob]:
    """Re-queue running jobs whose heartbeat expired (their worker died); fail those out of attempts."""
    cutoff = utcnow() - timedelta(seconds=stale_after)
    out: list[ReclaimedJob] = []
    with database.session() as s:
        pick = (select(Job, Case).join(Case, Case.id == Job.case_pk)
                .where(Job.state == JobState.RUNNING, or_(Job.heartbeat_at.is_(None), Job.heartbeat_at < cutoff))
                .order_by(Job.id))
        if s.get_bind().dialect.name == "postgresql":
            pick = pick.with_for_update(of=Job, skip_locked=True)
        for job, case in s.execute(pick).all():
            error = (f"worker {job.worker} stopped responding (no heartbeat for more than {stale_after:g}s) "
                     f"during attempt {job.attempts}")
            if job.attempts >= max_attempts:
                job.state, job.finished_at = JobState.FAILED, utcnow()
                job.error = _clip(f"{error}; giving up after {job.attempts} attempts")
                case.status, case.error = CaseStatus.FAILED, job.error
            else:
                job.state, job.error = JobState.QUEUED, _clip(error)
            out.append(ReclaimedJob(job.id, case.case_id, job.path, job.state, job.worker))
            job.worker, job.heartbeat_at = None, None
    return out


def finish_done(database: Database, job_id: int, worker: str) -> None:
    """Mark our job done (the pipeline normally did so in its own transaction; this is the safety net)."""
    now = utcnow()
    with database.session() as s:
        s.execute(update(Job).where(Job.id == job_id, Job.state == JobState.RUNNING, Job.worker == worker[:128])
                  .values(state=JobState.DONE, finished_at=now, error=None)
                  .execution_options(synchronize_session=False))
        s.execute(update(Job).where(Job.id == job_id, Job.state == JobState.DONE, Job.finished_at.is_(None))
                  .values(finished_at=now).execution_options(synchronize_session=False))


def record_failure(database: Database, job_id: int, worker: str, error: str, *, max_attempts: int,
                   permanent: bool = False) -> str:
    """Record a failed attempt: back to queued while attempts remain (and the error may pass), else failed.

    Returns the job's new state; a job that is no longer ours (reclaimed meanwhile) is left alone.
    """
    with database.session() as s:
        job = s.execute(select(Job).where(Job.id == job_id).with_for_update()).scalar_one_or_none()
        if job is None:
            return "gone"
        if job.state != JobState.RUNNING or job.worker != worker[:128]:
            return job.state
        job.error = _clip(error)
        if permanent or job.attempts >= max_attempts:
            job.state, job.finished_at = JobState.FAILED, utcnow()
            case = s.get(Case, job.case_pk)
            if case is not None:
                case.status, case.error = CaseStatus.FAILED, job.error
        else:
            job.state, job.worker, job.heartbeat_at = JobState.QUEUED, None, None
        return job.state


def release(database: Database, job_id: int, worker: str, error: str) -> bool:
    """Give a running job back to the queue without spending its attempt (a transient fault, a stop)."""
    with database.session() as s:
        res = s.execute(update(Job).where(Job.id == job_id, Job.state == JobState.RUNNING, Job.worker == worker[:128])
                        .values(state=JobState.QUEUED, worker=None, heartbeat_at=None, error=_clip(error),
                                attempts=func.max(Job.attempts - 1, 0) if s.get_bind().dialect.name == "sqlite"
                                else func.greatest(Job.attempts - 1, 0))
                        .execution_options(synchronize_session=False))
        return rowcount(res) == 1


def set_case_location(database: Database, case_id: str, path: Path) -> None:
    """Remember where a case folder went (processed/ or failed/), so nobody has to search for it."""
    with database.session() as s:
        s.execute(update(Case).where(Case.case_id == case_id).values(source_path=str(path))
                  .execution_options(synchronize_session=False))


def outstanding(database: Database) -> int:
    """Jobs still queued or running (any worker): `--once` waits for these to end."""
    with database.session() as s:
        return int(s.execute(select(func.count()).select_from(Job).where(Job.state.in_(ACTIVE_STATES))).scalar_one())


def _age_s(now: datetime, then: datetime | None) -> float | None:
    then = aware(then)
    return None if then is None else round((now - then).total_seconds(), 1)


def _iso(value: datetime | None) -> str | None:
    value = aware(value)
    return value.isoformat(timespec="seconds") if value is not None else None


def queue_status(database: Database, *, recent: int = 10, failed: int = 10) -> dict[str, Any]:
    """Queue depth, running and failed jobs, recent cases and the active model, for `chromobatch status`."""
    now = utcnow()
    with database.session() as s:
        counts = {str(state): 0 for state in JobState}
        for state, n in s.execute(select(Job.state, func.count()).group_by(Job.state)):
            counts[state] = int(n)
        running = [
            {"job": j.id, "case_id": cid, "worker": j.worker, "attempts": j.attempts,
             "started_at": _iso(j.started_at),
             "heartbeat_age_s": _age_s(now, j.heartbeat_at)}
            for j, cid in s.execute(select(Job, Case.case_id).join(Case, Case.id == Job.case_pk)
                                    .where(Job.state == JobState.RUNNING).order_by(Job.id))]
        failed_jobs = [
            {"job": j.id, "case_id": cid, "attempts": j.attempts, "finished_at": _iso(j.finished_at),
             "error": j.error}
            for j, cid in s.execute(select(Job, Case.case_id).join(Case, Case.id == Job.case_pk)
                                    .where(Job.state == JobState.FAILED).order_by(Job.id.desc()).limit(failed))]
        recent_rows = list(s.execute(select(Case).order_by(
            func.coalesce(Case.processed_at, Case.received_at).desc(), Case.id.desc()).limit(recent)).scalars())
        cases = [{"case_id": c.case_id, "status": c.status, "karyotype": c.karyotype,
                  "processed_at": _iso(c.processed_at), "error": c.error} for c in recent_rows]
        recent_pks = [c.id for c in recent_rows]
        not_used = [
            {"case_id": cid, "file": r.source_file, "reason": r.reason}
            for r, cid in s.execute(select(RejectedFile, Case.case_id).join(Case, Case.id == RejectedFile.case_pk)
                                    .where(RejectedFile.case_pk.in_(recent_pks))
                                    .order_by(Case.case_id, RejectedFile.source_file).limit(MAX_LISTED_FILES))]
        active = active_model(s)
        model = None if active is None else {
            "id": active.id, "name": active.name, "version": active.version, "backbone": active.backbone,
            "sha256": active.sha256, "promoted_at": _iso(active.promoted_at)}
    n_missing, missing = missing_reports(database, limit=failed)
    return {"jobs": counts, "queue_depth": counts["queued"], "running": running, "failed": failed_jobs,
            "recent_cases": cases, "files_not_used": not_used, "reports_missing": n_missing,
            "missing_reports": [{"case_id": m.case_id, "attempts": m.attempts, "error": m.error,
                                 "next_try_at": _iso(m.next_at)} for m in missing],
            "active_model": model}


def format_status(status: dict[str, Any]) -> list[str]:
    """queue_status() as the lines `chromobatch status` prints."""
    j = status["jobs"]
    model = status["active_model"]
    lines = [f"queue: {j['queued']} queued, {j['running']} running, {j['done']} done, {j['failed']} failed",
             "active model: " + (f"{model['name']} {model['version']} ({model['backbone']}, "
                                 f"{model['sha256'][:12]})" if model else "none")]
    if status["running"]:
        lines.append("running:")
        lines += [f"  job {r['job']}  {r['case_id']}  worker {r['worker']}  attempt {r['attempts']}  "
                  f"heartbeat {r['heartbeat_age_s']}s ago" for r in status["running"]]
    if status["failed"]:
        lines.append("failed jobs:")
        lines += [f"  job {f['job']}  {f['case_id']}  after {f['attempts']} attempt(s)  {f['finished_at']}  "
                  f"{(f['error'] or '').splitlines()[0][:160] if f['error'] else ''}" for f in status["failed"]]
    if status["reports_missing"]:
        lines.append(f"reports missing: {status['reports_missing']} case(s) (tried again by the watcher; or run "
                     "`chromobatch report CASE`)")
        lines += [f"  {m['case_id']:<24} {m['attempts']} failed tr{'y' if m['attempts'] == 1 else 'ies'}"
                  + (f", next at {m['next_try_at']}" if m["next_try_at"] else "")
                  + (f": {m['error'].splitlines()[0][:160]}" if m["error"] else "") for m in status["missing_reports"]]
    if status["recent_cases"]:
        lines.append("recent cases:")
        lines += [f"  {c['case_id']:<24} {c['status']:<10} {c['karyotype'] or '-':<28} {c['processed_at'] or '-'}"
                  for c in status["recent_cases"]]
    if status["files_not_used"]:
        lines.append("files not used (recent cases):")
        lines += [f"  {f['case_id']:<24} {f['file']}: {f['reason'][:160]}" for f in status["files_not_used"]]
    return lines
