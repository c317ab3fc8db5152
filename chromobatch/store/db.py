"""The database: SQLAlchemy 2 ORM models, engine set-up and Alembic migrations.

SQLite (a file path) is the embedded default; PostgreSQL (a postgresql+psycopg:// URL) is the
multi-worker backend. The schema is owned by the Alembic migrations in the repository's migrations/.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, overload

from sqlalchemy import (
    JSON,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Integer,
    LargeBinary,
    String,
    Text,
    UniqueConstraint,
    create_engine,
    event,
    inspect,
    select,
)
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import ArgumentError, NoSuchModuleError, SQLAlchemyError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, relationship, sessionmaker

from chromobatch.errors import DatabaseError
from chromobatch.store.states import CaseStatus, JobState, ModelStatus, ReviewState, Stain

log = logging.getLogger(__name__)



def _migrations_dir() -> Path:
    """The repository's migrations/ in a checkout; the packaged chromobatch.migrations in a wheel install."""
    repo = Path(__file__).resolve().parents[2] / "migrations"
    if (repo / "env.py").is_file():
        return repo
    return Path(__file__).resolve().parents[1] / "migrations"


MIGRATIONS_DIR = _migrations_dir()


def utcnow() -> datetime:
    return datetime.now(UTC)


@overload
def aware(value: datetime) -> datetime: ...


@overload
def aware(value: None) -> None: ...


def aware(value: datetime | None) -> datetime | None:
    """SQLite hands back naive datetimes (stored as UTC); make them comparable with utcnow()."""
    if value is None or value.tzinfo is not None:
        return value
    return value.replace(tzinfo=UTC)


class Base(DeclarativeBase):
    type_annotation_map = {dict[str, Any]: JSON, list[Any]: JSON}


class Case(Base):
    """One patient specimen: a folder of metaphase cells dropped by the lab."""

    __tablename__ = "cases"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    case_id: Mapped[str] = mapped_column(String(128), unique=True)
    source_path: Mapped[str] = mapped_column(Text)
    #: received | ingested | processing | done | failed
    status: Mapped[str] = mapped_column(String(16), default=CaseStatus.RECEIVED, index=True)
    received_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    processed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    error: Mapped[str | None] = mapped_column(Text)
    #: Patient/study identifiers from DICOM (PatientID, AccessionNumber, StudyDate, ...); never logged.
    meta: Mapped[dict[str, Any]] = mapped_column("metadata", JSON, default=dict)
    input_format: Mapped[str | None] = mapped_column(String(16))
    #: sha256 over the sorted (file, sha256) pairs of the accepted files: what was ingested.
    content_sha256: Mapped[str | None] = mapped_column(String(64))
    #: Case summary from the pipeline (counts per cell, modal number, suggested karyotype, flags).
    summary: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    karyotype: Mapped[str | None] = mapped_column(Text)
    model_version_id: Mapped[int | None] = mapped_column(ForeignKey("model_versions.id"))
    #: The report is a step of its own after the results' commit: due while report_at is unset or older
    #: than processed_at; a failed rendering keeps its error and is tried again at report_next_at.
    report_path: Mapped[str | None] = mapped_column(Text)
    report_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    report_error: Mapped[str | None] = mapped_column(Text)
    report_attempts: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    report_next_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    #: The web review (migration 0005): unreviewed | in_review | signed, and the karyotype the reviewer typed.
    review_state: Mapped[str] = mapped_column(String(16), default=ReviewState.UNREVIEWED,
                                              server_default=ReviewState.UNREVIEWED.value, index=True)
    reviewed_karyotype: Mapped[str | None] = mapped_column(Text)

    cells: Mapped[list[Cell]] = relationship(back_populates="case", cascade="all, delete-orphan",
                                             order_by="Cell.index")
    rejected: Mapped[list[RejectedFile]] = relationship(back_populates="case", cascade="all, delete-orphan")


class Cell(Base):
    """One metaphase of a case: a sub-folder, or a DICOM series."""

    __tablename__ = "cells"
    __table_args__ = (UniqueConstraint("case_pk", "name"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    case_pk: Mapped[int] = mapped_column(ForeignKey("cases.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(256))
    index: Mapped[int] = mapped_column(Integer, default=0)
    #: Whole metaphase input only (else None): the file the cell came from, its content hash, the image as
    #: stored (normalised greyscale PNG, for the report's outlined metaphase), how many chromosomes were
    #: counted in it and the segmentation's notes ({"segmenter": ..., "clusters": [...], ...}).
    source_file: Mapped[str | None] = mapped_column(Text)
    source_sha256: Mapped[str | None] = mapped_column(String(64))
    image_png: Mapped[bytes | None] = mapped_column(LargeBinary, deferred=True)
    count: Mapped[int | None] = mapped_column(Integer)
    segmentation: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    #: The web review (migration 0005): counted (counted only) | analysed | None (not decided), and the
    #: cell's karyotype as the reviewer typed it.
    role: Mapped[str | None] = mapped_column(String(16))
    reviewed_karyotype: Mapped[str | None] = mapped_column(Text)

    case: Mapped[Case] = relationship(back_populates="cells")
    chromosomes: Mapped[list[Chromosome]] = relationship(back_populates="cell", cascade="all, delete-orphan",
                                                         order_by="Chromosome.id")


class Chromosome(Base):
    """One chromosome crop, stored normalised (greyscale, dark on light, cropped, native scale) as PNG."""

    __tablename__ = "chromosomes"
    __table_args__ = (UniqueConstraint("case_pk", "sha256"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    case_pk: Mapped[int] = mapped_column(ForeignKey("cases.id", ondelete="CASCADE"), index=True)
    cell_id: Mapped[int] = mapped_column(ForeignKey("cells.id", ondelete="CASCADE"), index=True)
    source_file: Mapped[str] = mapped_column(Text)
    sha256: Mapped[str] = mapped_column(String(64))
    width: Mapped[int] = mapped_column(Integer)
    height: Mapped[int] = mapped_column(Integer)
    #: Polarity of the source image: dark_on_light (G-band) or bright_on_dark (Q-band).
    polarity: Mapped[str] = mapped_column(String(16))
    crop_png: Mapped[bytes] = mapped_column(LargeBinary)
    #: Cut from a whole metaphase only (else None): the instance number in its cell's image, the bounding
    #: box [x0, y0, x1, y1] and outline polygon [[x, y], ...] in that image, and flags such as
    #: {"cluster": N} for an object kept whole because it holds about N chromosomes. sha256 is then the
    #: instance's own content identity (source file hash + its mask), so two chromosomes of one file differ.
    instance: Mapped[int | None] = mapped_column(Integer)
    box: Mapped[list[Any] | None] = mapped_column(JSON)
    polygon: Mapped[list[Any] | None] = mapped_column(JSON)
    flags: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    #: Marked "not a chromosome" by a reviewer (debris, a nucleus): left out of counts, karyotypes and
    #: training; every marking is a review_events row.
    not_chromosome: Mapped[bool] = mapped_column(Boolean, default=False, server_default="0")

    cell: Mapped[Cell] = relationship(back_populates="chromosomes")
    predictions: Mapped[list[Prediction]] = relationship(back_populates="chromosome",
                                                         cascade="all, delete-orphan")
    labels: Mapped[list[Label]] = relationship(back_populates="chromosome", cascade="all, delete-orphan",
                                               order_by="Label.id", foreign_keys="Label.chromosome_id")


class RejectedFile(Base):
    """A file of a case that could not be used, with the reason shown to the lab."""

    __tablename__ = "rejected_files"
    __table_args__ = (UniqueConstraint("case_pk", "source_file"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    case_pk: Mapped[int] = mapped_column(ForeignKey("cases.id", ondelete="CASCADE"), index=True)
    source_file: Mapped[str] = mapped_column(Text)
    reason: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)

    case: Mapped[Case] = relationship(back_populates="rejected")


class ModelVersion(Base):
    __tablename__ = "model_versions"
    __table_args__ = (UniqueConstraint("name", "version"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(128))
    version: Mapped[str] = mapped_column(String(64))
    backbone: Mapped[str] = mapped_column(String(128))
    file: Mapped[str] = mapped_column(Text)
    sha256: Mapped[str] = mapped_column(String(64), index=True)
    metrics: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    #: candidate | active | retired
    status: Mapped[str] = mapped_column(String(16), default=ModelStatus.CANDIDATE, index=True)
    reason: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    promoted_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


def model_stain(row: ModelVersion) -> Stain:
    """The stain a registered model serves (metrics["stain"]; none recorded: G-band)."""
    return Stain.of((row.metrics or {}).get("stain"))


def active_model(s: Session, *, exclude_id: int | None = None, stain: str | None = Stain.G) -> ModelVersion | None:
    """The model new cases of a stain use: the newest row with status 'active' that serves `stain` (None: any
    stain). One active model per stain; the stain is kept in the metrics JSON, so it is filtered here, over
    the few active rows, not in SQL."""
    q = select(ModelVersion).where(ModelVersion.status == ModelStatus.ACTIVE)
    if exclude_id is not None:
        q = q.where(ModelVersion.id != exclude_id)
    for row in s.execute(q.order_by(ModelVersion.id.desc())).scalars():
        if stain is None or model_stain(row) == stain:
            return row
    return None


class Prediction(Base):
    __tablename__ = "predictions"
    __table_args__ = (UniqueConstraint("chromosome_id", "model_version_id"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    chromosome_id: Mapped[int] = mapped_column(ForeignKey("chromosomes.id", ondelete="CASCADE"), index=True)
    model_version_id: Mapped[int] = mapped_column(ForeignKey("model_versions.id"), index=True)
    #: Top-1 class from the model (image + its size prior, when it has one), before assignment.
    label: Mapped[str] = mapped_column(String(2))
    #: Class after karyotype-aware assignment within the cell.
    assigned_label: Mapped[str | None] = mapped_column(String(2))
    confidence: Mapped[float] = mapped_column(Float)
    probabilities: Mapped[list[Any]] = mapped_column(JSON)
    flags: Mapped[list[Any]] = mapped_column(JSON, default=list)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)

    chromosome: Mapped[Chromosome] = relationship(back_populates="predictions")


class Label(Base):
    """A ground-truth label; rows are never overwritten, a new row supersedes the previous one."""

    __tablename__ = "labels"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    chromosome_id: Mapped[int] = mapped_column(ForeignKey("chromosomes.id", ondelete="CASCADE"), index=True)
    label: Mapped[str] = mapped_column(String(2))
    #: imported | reviewed
    source: Mapped[str] = mapped_column(String(16))
    reviewer: Mapped[str | None] = mapped_column(String(128))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    supersedes_id: Mapped[int | None] = mapped_column(ForeignKey("labels.id"))

    chromosome: Mapped[Chromosome] = relationship(back_populates="labels", foreign_keys=[chromosome_id])


class Job(Base):
    """A unit of work for the watcher workers: process one case folder."""

    __tablename__ = "jobs"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    case_pk: Mapped[int] = mapped_column(ForeignKey("cases.id", ondelete="CASCADE"), index=True)
    path: Mapped[str] = mapped_column(Text)
    #: queued | running | done | failed
    state: Mapped[str] = mapped_column(String(16), default=JobState.QUEUED, index=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    worker: Mapped[str | None] = mapped_column(String(128))
    heartbeat_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    error: Mapped[str | None] = mapped_column(Text)


class User(Base):
    """A local account of the web review (`chromobatch users`): a password hash, never the password."""

    __tablename__ = "users"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(128), unique=True)
    #: viewer | reviewer | admin
    role: Mapped[str] = mapped_column(String(16))
    password_hash: Mapped[str] = mapped_column(Text)
    active: Mapped[bool] = mapped_column(Boolean, default=True, server_default="1")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    password_changed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class SignOff(Base):
    """A case signed (who, when, final karyotype, comment) or reopened; rows are only ever added."""

    __tablename__ = "signoffs"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    case_pk: Mapped[int] = mapped_column(ForeignKey("cases.id", ondelete="CASCADE"), index=True)
    #: signed | reopened
    action: Mapped[str] = mapped_column(String(16))
    user_name: Mapped[str] = mapped_column(String(128))
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    karyotype: Mapped[str | None] = mapped_column(Text)
    comment: Mapped[str | None] = mapped_column(Text)


class ReviewEvent(Base):
    """A review decision other than a label (those are Label rows): not a chromosome, a cell's role, a
    typed karyotype. Append-only: the audit trail of the web review."""

    __tablename__ = "review_events"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    case_pk: Mapped[int] = mapped_column(ForeignKey("cases.id", ondelete="CASCADE"), index=True)
    cell_id: Mapped[int | None] = mapped_column(ForeignKey("cells.id", ondelete="CASCADE"))
    chromosome_id: Mapped[int | None] = mapped_column(ForeignKey("chromosomes.id", ondelete="CASCADE"))
    kind: Mapped[str] = mapped_column(String(32))
    value: Mapped[str | None] = mapped_column(Text)
    previous: Mapped[str | None] = mapped_column(Text)
    user_name: Mapped[str] = mapped_column(String(128))
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


# --------------------------------------------------------------------------------------------------
# Engine, sessions, migrations


def resolve_url(db: str | Path) -> str:
    """A path becomes a SQLite URL; anything with '://' is taken as an SQLAlchemy URL."""
    text = str(db)
    if "://" in text:
        try:
            url = make_url(text)
            url.get_dialect()
        except (ArgumentError, NoSuchModuleError) as exc:
            raise DatabaseError(f"not a valid database URL: {exc}") from exc
        except ModuleNotFoundError as exc:
            raise DatabaseError(f"database driver missing: {exc.name}",
                                hint="Install the PostgreSQL extra: pip install 'chromobatch[postgres]'.") from exc
        return text
    return f"sqlite:///{Path(text).expanduser().resolve()}"


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA busy_timeout=30000")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.close()


def make_engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        # hide_parameters: error messages must never quote row values (patient metadata) into logs.
        engine = create_engine(url, connect_args={"timeout": 30}, hide_parameters=True)
        event.listen(engine, "connect", _sqlite_pragmas)

        # pysqlite's own transaction handling defers BEGIN; emit it ourselves so that a transaction's
        # first read already holds the lock it needs (BEGIN IMMEDIATE), which avoids upgrade deadlocks.
        @event.listens_for(engine, "connect")
        def _no_autobegin(dbapi_conn: Any, _record: Any) -> None:
            dbapi_conn.isolation_level = None

        @event.listens_for(engine, "begin")
        def _begin(conn: Any) -> None:
            conn.exec_driver_sql("BEGIN IMMEDIATE")

        return engine
    try:
        return create_engine(url, pool_pre_ping=True, hide_parameters=True)
    except ModuleNotFoundError as exc:
        raise DatabaseError(f"database driver missing: {exc.name}",
                            hint="Install the PostgreSQL extra: pip install 'chromobatch[postgres]'.") from exc


def alembic_config(url: str) -> Any:
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


def _shown(url: str) -> str:
    return make_url(url).render_as_string(hide_password=True)


def upgrade(url: str, revision: str = "head") -> None:
    from alembic import command
    from alembic.util import CommandError

    engine = make_engine(url)
    try:
        with engine.begin() as conn:
            cfg = alembic_config(url)
            cfg.attributes["connection"] = conn
            if conn.dialect.name == "postgresql":
                # Two workers starting together must not both run the migrations.
                conn.exec_driver_sql("SELECT pg_advisory_xact_lock(727274)")
            command.upgrade(cfg, revision)
    except CommandError as exc:
        raise DatabaseError(f"cannot migrate {_shown(url)}: {exc}",
                            hint="Is the database from a newer chromobatch? Upgrade chromobatch first.") from exc
    except SQLAlchemyError as exc:
        raise DatabaseError(f"cannot open database {_shown(url)}: {getattr(exc, 'orig', None) or exc}") from exc
    finally:
        engine.dispose()


def current_revision(engine: Engine) -> str | None:
    from alembic.runtime.migration import MigrationContext

    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def head_revision() -> str:
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(alembic_config("sqlite://")).get_current_head() or ""


class Database:
    """An engine plus a session factory; `session()` is one transaction."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.engine = make_engine(url)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)

    @property
    def dialect(self) -> str:
        return self.engine.dialect.name

    @contextmanager
    def session(self) -> Iterator[Session]:
        """Commit on success, roll back on any exception."""
        with self._sessions() as s, s.begin():
            yield s

    def dispose(self) -> None:
        self.engine.dispose()

    def __enter__(self) -> Database:
        return self

    def __exit__(self, *exc: object) -> None:
        """`with connect(url) as database:` closes the engine's connections however the block ends."""
        self.dispose()


def connect(db: str | Path, *, migrate: bool | None = None) -> Database:
    """Open a database; SQLite files are migrated to the newest schema automatically.

    PostgreSQL is shared by several workers, so its schema changes only with `chromobatch db upgrade`
    (or migrate=True); a PostgreSQL database at an older revision is refused with that hint.
    """
    url = resolve_url(db)
    is_sqlite = url.startswith("sqlite")
    if is_sqlite and url != "sqlite://":
        parent = Path(url.removeprefix("sqlite:///")).parent
        if not parent.is_dir():
            raise DatabaseError(f"folder for the SQLite database does not exist: {parent}")
    if migrate is None:
        migrate = is_sqlite
    try:
        if migrate:
            upgrade(url)
        database = Database(url)
        rev = current_revision(database.engine)
    except SQLAlchemyError as exc:  # not a database file, server down, wrong credentials, ...
        raise DatabaseError(f"cannot open database {_shown(url)}: {getattr(exc, 'orig', None) or exc}") from exc
    if rev != head_revision():
        database.dispose()
        raise DatabaseError(f"database schema is at revision {rev or 'empty'}, this chromobatch needs "
                            f"{head_revision()}", hint="Run `chromobatch db upgrade --db ...` first.")
    return database


def table_names(database: Database) -> list[str]:
    return sorted(inspect(database.engine).get_table_names())


def rowcount(result: Any) -> int:
    """Rows an UPDATE or DELETE matched: Session.execute returns a CursorResult for them (typed as Result)."""
    return int(result.rowcount)
