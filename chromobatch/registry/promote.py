"""The registry by hand: list model versions, promote one, roll back to the one active before.

Registry history: ModelVersion.promoted_at is the latest activation; every registration, promotion,
retirement and rollback is also appended to ModelVersion.metrics["history"] (time, event, reason).
`activate` and `note_event` are also how nightly retraining (registry.retrain) promotes or keeps a
candidate, so a hand promotion and a nightly one leave the same history.
"""

from __future__ import annotations

import logging
from datetime import datetime
from typing import Any

from sqlalchemy.orm import Session

from chromobatch.errors import ModelError
from chromobatch.store.db import Database, ModelVersion, model_stain, utcnow
from chromobatch.store.states import ModelStatus, Stain

log = logging.getLogger(__name__)


def note_event(row: ModelVersion, event: str, reason: str | None, at: datetime) -> None:
    """Append to metrics["history"] (a new dict, so SQLAlchemy sees the JSON change)."""
    metrics = dict(row.metrics or {})
    metrics["history"] = [*metrics.get("history", []),
                          {"at": at.isoformat(timespec="seconds"), "event": event, "reason": reason}]
    row.metrics = metrics


def activate(s: Session, row: ModelVersion, reason: str, event: str = "promoted") -> None:
    """Make `row` the active model of its stain: whatever served that stain is retired, in the same
    transaction (the active model of another stain stays)."""
    now = utcnow()
    others = (s.query(ModelVersion).filter(ModelVersion.status == ModelStatus.ACTIVE, ModelVersion.id != row.id)
              .with_for_update().all())
    for other in others:
        if model_stain(other) != model_stain(row):
            continue
        other.status = ModelStatus.RETIRED
        note_event(other, "retired", f"replaced by {row.name} {row.version}", now)
    row.status, row.promoted_at, row.reason = ModelStatus.ACTIVE, now, reason
    note_event(row, event, reason, now)


def find_version(s: Session, ref: str) -> ModelVersion:
    """A model version by id, version, name-version, or a unique sha256 prefix (>= 8 hex digits)."""
    text = ref.strip()
    hits: list[ModelVersion] = []
    if text.isdigit():
        row = s.get(ModelVersion, int(text))
        hits = [row] if row is not None else []
    if not hits:
        hits = s.query(ModelVersion).filter(ModelVersion.version == text).all()
    if not hits:
        hits = [r for r in s.query(ModelVersion).all() if f"{r.name}-{r.version}" == text
                or f"{r.name} {r.version}" == text or (len(text) >= 8 and r.sha256.startswith(text.lower()))]
    if not hits:
        raise ModelError(f"no model version {ref!r} in the registry", hint="See `chromobatch models list`.")
    if len(hits) > 1:
        raise ModelError(f"{ref!r} matches {len(hits)} model versions; use the id",
                         hint="See `chromobatch models list`.")
    return hits[0]


def list_models(database: Database) -> list[dict[str, Any]]:
    with database.session() as s:
        return [{"id": r.id, "name": r.name, "version": r.version, "status": r.status, "backbone": r.backbone,
                 "stain": model_stain(r).value, "val_accuracy": (r.metrics or {}).get("val", {}).get("accuracy"),
                 "created_at": r.created_at, "promoted_at": r.promoted_at, "reason": r.reason, "file": r.file,
                 "history": list((r.metrics or {}).get("history", []))}
                for r in s.query(ModelVersion).order_by(ModelVersion.id)]


def promote(database: Database, ref: str, *, reason: str | None = None) -> ModelVersion:
    """Make a model version active by hand (the watchers switch to it before their next case)."""
    with database.session() as s:
        row = find_version(s, ref)
        if row.status == ModelStatus.ACTIVE:
            raise ModelError(f"model {row.name} {row.version} is already the active one")
        activate(s, row, reason or "promoted by hand")
    log.info("model %s %s (id %d) promoted", row.name, row.version, row.id)
    return row


def rollback(database: Database, *, reason: str | None = None, stain: str = Stain.G) -> tuple[ModelVersion,
                                                                                            ModelVersion]:
    """Re-activate the model of `stain` that was active before the current one and retire the current one.

    'Before' = the retired model of that stain retired most recently (by the history), else the latest
    promoted_at. Returns (retired, reactivated).
    """
    stain = Stain.of(stain)
    with database.session() as s:
        current = next((r for r in s.query(ModelVersion).filter_by(status=ModelStatus.ACTIVE)
                        .order_by(ModelVersion.id.desc()).with_for_update() if model_stain(r) == stain), None)
        if current is None:
            raise ModelError(f"no active {stain.band} model to roll back")

        def retired_at(r: ModelVersion) -> str:
            times = [h["at"] for h in (r.metrics or {}).get("history", []) if h.get("event") == "retired"]
            return max(times) if times else (r.promoted_at.isoformat() if r.promoted_at else "")

        previous = [r for r in s.query(ModelVersion).filter(ModelVersion.status == ModelStatus.RETIRED,
                                                            ModelVersion.promoted_at.isnot(None))
                    if model_stain(r) == stain]
        if not previous:
            raise ModelError("no previously active model to roll back to",
                             hint="Promote a candidate with `chromobatch models promote VERSION`.")
        target = max(previous, key=lambda r: (retired_at(r), r.id))
        activate(s, target, reason or f"rollback from {current.name} {current.version}", event="rollback")
        note_event(current, "rolled_back", reason, utcnow())
    log.info("rolled back: model id %d retired, id %d active again", current.id, target.id)
    return current, target


def format_models(rows: list[dict[str, Any]]) -> list[str]:
    """Lines for `chromobatch models list`; 'serves' names the stain each active model reads."""
    out = [f"{'id':>4}  {'status':<9}  {'serves':<8}  {'name':<16}  {'version':<18}  {'val acc':>7}  "
           f"{'promoted':<19}  reason"]
    for r in rows:
        acc = f"{r['val_accuracy']:.4f}" if isinstance(r["val_accuracy"], (int, float)) else "-"
        promoted = r["promoted_at"].strftime("%Y-%m-%d %H:%M:%S") if r["promoted_at"] else "-"
        band = Stain.of(r.get("stain")).band
        serves = band if r["status"] == ModelStatus.ACTIVE else f"({band})"
        out.append(f"{r['id']:>4}  {r['status']:<9}  {serves:<8}  {r['name'][:16]:<16}  {r['version'][:18]:<18}  "
                   f"{acc:>7}  {promoted:<19}  {r['reason'] or ''}")
    return out
