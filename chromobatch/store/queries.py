"""Questions several rooms ask of the database, answered in one place."""

from __future__ import annotations

from sqlalchemy import func
from sqlalchemy.orm import Session

from chromobatch.store.db import Chromosome, Label


def newest_labels(s: Session, case_pk: int) -> dict[int, Label]:
    """The current label of every labelled chromosome of a case (the newest row; rows are never
    overwritten), in one query."""
    newest = (s.query(func.max(Label.id)).join(Chromosome, Chromosome.id == Label.chromosome_id)
              .filter(Chromosome.case_pk == case_pk).group_by(Label.chromosome_id))
    return {lab.chromosome_id: lab for lab in s.query(Label).filter(Label.id.in_(newest.scalar_subquery()))}
