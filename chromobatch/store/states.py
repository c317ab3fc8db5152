"""The states stored in the database, as StrEnums: one spelling of each, checked by the type checker.

They are `str` subclasses, so rows written before (plain strings) compare equal and SQL binds them as text.
"""

from __future__ import annotations

from enum import StrEnum


class CaseStatus(StrEnum):
    RECEIVED = "received"
    INGESTED = "ingested"
    PROCESSING = "processing"
    DONE = "done"
    FAILED = "failed"


class JobState(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"


class ModelStatus(StrEnum):
    CANDIDATE = "candidate"
    ACTIVE = "active"
    RETIRED = "retired"


class LabelSource(StrEnum):
    IMPORTED = "imported"
    REVIEWED = "reviewed"


class ReviewState(StrEnum):
    """Where a case stands in the web review: nobody looked, someone changed something, signed off."""

    UNREVIEWED = "unreviewed"
    IN_REVIEW = "in_review"
    SIGNED = "signed"


class UserRole(StrEnum):
    """viewer: reads; reviewer: edits and signs; admin: a reviewer who may also reopen any case."""

    VIEWER = "viewer"
    REVIEWER = "reviewer"
    ADMIN = "admin"
