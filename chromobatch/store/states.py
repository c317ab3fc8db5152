"""The states stored in the database, as StrEnums: one spelling of each, checked by the type checker.

They are `str` subclasses, so rows written before (plain strings) compare equal and SQL binds them as text.
"""

from __future__ import annotations

from enum import StrEnum

from chromobatch.errors import ConfigError


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


class Stain(StrEnum):
    """The banding a model reads and a case was stained with; a model serves one stain.

    Stored in model.json ("stain") and in ModelVersion.metrics["stain"]; a model or row without one is G-band
    (every model before Q-band models existed read G-band)."""

    G = "G"
    Q = "Q"

    @classmethod
    def of(cls, value: object) -> Stain:
        """The stain a model.json or registry metrics value names; missing means G-band."""
        if value is None or value == "":
            return cls.G
        try:
            return cls(str(value).upper())
        except ValueError:
            raise ConfigError(f"unknown stain {value!r}", hint="A stain is G (G-band) or Q (Q-band).") from None

    @classmethod
    def from_polarity(cls, polarity: object) -> Stain | None:
        """The stain a scanned crop's polarity shows: dark on light is G-band, bright on dark Q-band
        (fluorescent); None when it is not known."""
        return {"dark_on_light": cls.G, "bright_on_dark": cls.Q}.get(str(polarity)) if polarity else None

    @property
    def band(self) -> str:
        """'G-band' or 'Q-band', as a report or `models list` says it."""
        return f"{self.value}-band"


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
