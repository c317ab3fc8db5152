"""The review decisions a signed-in user makes in the web review, each in one transaction that holds the case.

Labels go through review.labels (rows that supersede, never overwrite: `chromobatch history` shows web edits
like CLI ones, with the user as reviewer). Everything else a reviewer decides ("not a chromosome", a cell's
role, a typed karyotype) is a review_events row, and every sign-off and reopening a signoffs row: nothing is
changed without a record of who and when. A signed case is read-only until it is reopened.
"""

from __future__ import annotations

import logging
import re
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from chromobatch.errors import (
    CaseNotFound,
    CaseNotProcessed,
    CaseSigned,
    CellNotFound,
    ChromosomeNotFound,
    InvalidKaryotype,
    ReviewChanged,
    ReviewError,
)
from chromobatch.review.labels import Relabel, relabel_in_session
from chromobatch.store.db import Case, Cell, Chromosome, Database, Label, ReviewEvent, SignOff, utcnow
from chromobatch.store.states import CaseStatus, ReviewState

log = logging.getLogger(__name__)

CELL_ROLES = ("counted", "analysed")
MAX_COMMENT = 4000
MAX_KARYOTYPE = 500
#: count,sex chromosomes[,change...][[cells]], clones separated by '/': what ISCN karyotypes look like.
_CLONE = re.compile(r"^(?P<count>\d{2,3})(?:~\d{2,3})?,(?P<sex>[XY]{1,6})(?P<changes>(?:,[^,/\s\[\]]+)*)"
                    r"(?:\[\d{1,4}\])?$")


@dataclass(frozen=True)
class LabelResult:
    """What a label change did, for the page: the new label ids and a message for a concurrent edit."""

    changes: list[Relabel]
    message: str | None


def validate_karyotype(text: str) -> str:
    """An ISCN karyotype, checked for its form: count,sex chromosomes[,changes][[N]], clones joined by '/'."""
    value = " ".join((text or "").split())
    if not value:
        raise InvalidKaryotype("the karyotype is empty")
    if len(value) > MAX_KARYOTYPE:
        raise InvalidKaryotype(f"the karyotype is longer than {MAX_KARYOTYPE} characters")
    for clone in value.split("/"):
        m = _CLONE.match(clone.strip())
        if m is None:
            raise InvalidKaryotype(f"{clone.strip()!r} is not an ISCN karyotype (count,sex chromosomes[,changes])")
        if not 20 <= int(m.group("count")) <= 200:
            raise InvalidKaryotype(f"{clone.strip()!r}: a chromosome count of {m.group('count')} is not plausible")
    return value


def _case(s: Session, case_pk: int, *, for_edit: bool = True) -> Case:
    """The case, held for the transaction (PostgreSQL FOR UPDATE; SQLite's BEGIN IMMEDIATE holds it anyway)."""
    q = s.query(Case).filter(Case.id == case_pk)
    case = q.with_for_update().one_or_none() if for_edit else q.one_or_none()
    if case is None:
        raise CaseNotFound(f"no case with key {case_pk}")
    if for_edit and case.review_state == ReviewState.SIGNED:
        raise CaseSigned("this case is signed off and read-only")
    return case


def _touch(case: Case) -> None:
    if case.review_state == ReviewState.UNREVIEWED:
        case.review_state = ReviewState.IN_REVIEW


def case_of_chromosome(database: Database, chromosome_pk: int) -> int:
    with database.session() as s:
        pk = s.query(Chromosome.case_pk).filter(Chromosome.id == chromosome_pk).scalar()
    if pk is None:
        raise ChromosomeNotFound(f"no chromosome with key {chromosome_pk}")
    return int(pk)


def set_labels(database: Database, case_pk: int, user: str, wanted: dict[int, str],
               seen: dict[int, int | None]) -> LabelResult:
    """Move chromosomes to classes (one, or two for a swap) as reviewed labels by `user`.

    `seen` is the newest label id per chromosome that the user's page showed; when another user changed one
    of them since, the change is still recorded on top (both rows stay in the history) and the message says
    who changed it to what, so the user can look again.
    """
    if not wanted:
        raise ReviewError("no label change given")
    with database.session() as s:
        case = _case(s, case_pk)
        out = relabel_in_session(s, case, wanted, reviewer=user, seen=seen)
        _touch(case)
        conflicts = [r for r in out if r.conflict is not None]
        message = None
        if conflicts:
            parts = [f"chromosome {r.change.cell_number}.{r.change.number} was changed to {r.conflict.label} by "
                     f"{r.conflict.reviewer or 'an import'} after you opened this page"
                     for r in conflicts if r.conflict is not None]
            message = "; ".join(parts) + ". Your change was recorded after theirs: please check it."
    log.info("case key %d: %s set %d label(s)%s", case_pk, user, sum(r.change.changed for r in out),
             " over a concurrent edit" if message else "")
    return LabelResult(out, message)


def mark_not_chromosome(database: Database, chromosome_pk: int, user: str, value: bool) -> None:
    with database.session() as s:
        chrom = s.get(Chromosome, chromosome_pk)
        if chrom is None:
            raise ChromosomeNotFound(f"no chromosome with key {chromosome_pk}")
        case = _case(s, chrom.case_pk)
        if bool(chrom.not_chromosome) != value:
            s.add(ReviewEvent(case_pk=case.id, cell_id=chrom.cell_id, chromosome_id=chrom.id, kind="not_chromosome",
                              value=str(value).lower(), previous=str(bool(chrom.not_chromosome)).lower(),
                              user_name=user, at=utcnow()))
            chrom.not_chromosome = value
            _touch(case)
    log.info("chromosome key %d: %s marked not_chromosome=%s", chromosome_pk, user, value)


def set_cell_role(database: Database, cell_pk: int, user: str, role: str) -> None:
    role = (role or "").strip().lower()
    if role not in CELL_ROLES:
        raise ReviewError(f"a cell is 'counted' (counted only) or 'analysed', not {role!r}")
    with database.session() as s:
        cell = s.get(Cell, cell_pk)
        if cell is None:
            raise CellNotFound(f"no cell with key {cell_pk}")
        case = _case(s, cell.case_pk)
        if cell.role != role:
            s.add(ReviewEvent(case_pk=case.id, cell_id=cell.id, kind="cell_role", value=role, previous=cell.role,
                              user_name=user, at=utcnow()))
            cell.role = role
            _touch(case)


def set_karyotype(database: Database, case_pk: int, user: str, text: str, *, cell_pk: int | None = None) -> str:
    """The case's (or one cell's) karyotype as the reviewer writes it, checked for its ISCN form."""
    value = validate_karyotype(text)
    with database.session() as s:
        case = _case(s, case_pk)
        target: Case | Cell = case
        if cell_pk is not None:
            cell = s.get(Cell, cell_pk)
            if cell is None or cell.case_pk != case.id:
                raise CellNotFound(f"case key {case_pk} has no cell with key {cell_pk}")
            target = cell
        if target.reviewed_karyotype != value:
            s.add(ReviewEvent(case_pk=case.id, cell_id=cell_pk, kind="cell_karyotype" if cell_pk else "case_karyotype",
                              value=value, previous=target.reviewed_karyotype, user_name=user, at=utcnow()))
            target.reviewed_karyotype = value
            _touch(case)
    return value


def review_version(s: Session, case_pk: int) -> str:
    """Where the case's review stands: the newest label row, review decision and sign-off row ids. The case
    page sends it with its sign-off form; any label change, decision or sign-off/reopening since changes it."""
    label = s.execute(select(func.max(Label.id)).join(Chromosome, Chromosome.id == Label.chromosome_id)
                      .where(Chromosome.case_pk == case_pk)).scalar()
    event = s.execute(select(func.max(ReviewEvent.id)).where(ReviewEvent.case_pk == case_pk)).scalar()
    signoff = s.execute(select(func.max(SignOff.id)).where(SignOff.case_pk == case_pk)).scalar()
    return f"{label or 0}.{event or 0}.{signoff or 0}"


def sign_off(database: Database, case_pk: int, user: str, karyotype: str, comment: str,
             seen: str | None = None) -> str:
    """Sign a case with its final karyotype and a comment; it is read-only from then on. Returns its case ID.

    `seen`: the review_version the signer's page showed (the case page's form sends it); when the case was
    changed since (another reviewer's label, decision or sign-off), nothing is signed: the signer must look
    at the case as it is now, not sign labels they never saw."""
    value = validate_karyotype(karyotype)
    comment = (comment or "").strip()[:MAX_COMMENT]
    with database.session() as s:
        case = _case(s, case_pk)
        if case.status != CaseStatus.DONE:
            raise CaseNotProcessed(f"the case is {case.status}, not processed: there is no finished karyogram to "
                                   "sign off")
        if seen is not None and seen != review_version(s, case.id):
            raise ReviewChanged("the case was changed (labels or review decisions) after you opened this page: "
                                "reload it, look at the changes, then sign it off")
        now = utcnow()
        s.add(SignOff(case_pk=case.id, action="signed", user_name=user, at=now, karyotype=value, comment=comment))
        if case.reviewed_karyotype != value:
            s.add(ReviewEvent(case_pk=case.id, kind="case_karyotype", value=value, previous=case.reviewed_karyotype,
                              user_name=user, at=now))
        case.reviewed_karyotype = value
        case.review_state = ReviewState.SIGNED
        case_id = case.case_id
    log.info("case key %d signed off by %s", case_pk, user)
    return case_id


def reopen(database: Database, case_pk: int, user: str, comment: str, *, admin: bool) -> str:
    """Reopen a signed case (recorded, with the reason): by whoever signed it, or an admin."""
    comment = (comment or "").strip()[:MAX_COMMENT]
    if not comment:
        raise ReviewError("say why the case is reopened (a comment is required)")
    with database.session() as s:
        case = _case(s, case_pk, for_edit=False)
        if case.review_state != ReviewState.SIGNED:
            raise ReviewError("the case is not signed off, there is nothing to reopen")
        last = (s.query(SignOff).filter(SignOff.case_pk == case.id, SignOff.action == "signed")
                .order_by(SignOff.id.desc()).first())
        if not admin and (last is None or last.user_name != user):
            raise PermissionError("only the reviewer who signed the case, or an admin, may reopen it")
        s.add(SignOff(case_pk=case.id, action="reopened", user_name=user, at=utcnow(), comment=comment))
        case.review_state = ReviewState.IN_REVIEW
        case_id = case.case_id
    log.info("case key %d reopened by %s", case_pk, user)
    return case_id


#: The loggers of the code a sign-off runs to render the PDF: they name the case by its case ID (right for the
#: batch CLI), which in the web review's log must be the database key instead.
_REPORT_LOGGERS = ("chromobatch.service.reports", "chromobatch.report.render", "chromobatch.report.pdf",
                   "chromobatch.report.dicom", "chromobatch.report.overlay", "chromobatch.report.view")
_rendering: ContextVar[tuple[str, int] | None] = ContextVar("chromobatch_web_rendering", default=None)


class _CaseIdRedactor(logging.Filter):
    """Replaces the case ID of the report being rendered for the web (the context's) by its database key, in
    the message and in a logged traceback; lines logged outside a web re-render pass unchanged."""

    def filter(self, record: logging.LogRecord) -> bool:
        current = _rendering.get()
        if current is None:
            return True
        case_id, case_pk = current
        key = f"key {case_pk}"
        message = record.getMessage()
        if case_id in message:
            record.msg, record.args = message.replace(case_id, key), None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text and case_id in record.exc_text:
            record.exc_text = record.exc_text.replace(case_id, key)
        return True


_REDACTOR = _CaseIdRedactor()
for _name in _REPORT_LOGGERS:
    logging.getLogger(_name).addFilter(_REDACTOR)


def rerender_report(database: Database, case_id: str, reports_dir: Path, case_pk: int) -> Path | None:
    """The PDF again, now with the sign-off; a rendering failure is recorded and retried by the watcher. The
    report code's log lines name the case by `case_pk` here: no case ID in the web review's log."""
    from chromobatch.service.reports import render_and_record

    token = _rendering.set((case_id, case_pk))
    try:
        return render_and_record(database, case_id, reports_dir)
    finally:
        _rendering.reset(token)
