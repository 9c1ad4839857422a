"""The screening record: one row per file received, its fate, and the known outcomes.

The store opens the database (SQLite or PostgreSQL) and holds its transactions and the queries
several commands share; the tables themselves are in worker/records/models.py.

A file's life is an explicit state machine, every step committed before the filesystem is
touched:

    received --> scored | duplicate | quarantined     (status, committed with the planned
                                                        destination in `final_path`)
             --> moved                                 (`moved_at` set after the file moved)

A row whose status is final but whose `moved_at` is empty is a move still owed; start-up
reconciliation finishes it. A partial unique index makes it impossible to hold two unfinished
rows for the same inbox path and content, so a restart can never record a file twice.

Scored images join an exam (`exams`, one row per study); each scoring of an exam is a row of
`exam_results` (with its `breast_results`), kept forever, so a rescored exam keeps its history
(see worker/results/exams.py for that state machine).

The schema is versioned with Alembic (worker/records/migrations, run by
worker/records/schema.py when a database is opened). A database made before Alembic is
first upgraded in place by the pre-Alembic step, `Store._upgrade`: missing tables are
created and missing nullable columns added (`UPGRADE_COLUMNS`), nothing dropped; it is
then stamped at the baseline revision. Schema changes from here on are Alembic revisions,
not entries in UPGRADE_COLUMNS.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from enum import StrEnum
from typing import Any

from sqlalchemy import create_engine, event, func, insert, inspect, select, text
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from worker.records.clock import utcnow
from worker.records.models import Base, Event, ImageRecord, Outcome
from worker.records.schema import bring_up_to_date, is_current

log = logging.getLogger("mammo_screen")


class ImageStatus(StrEnum):
    """An image's state in `images.status` (stored as the value)."""

    RECEIVED = "received"  # its row is committed; not yet decided
    SCORED = "scored"
    DUPLICATE = "duplicate"  # the same bytes as an earlier image (its score is the original's)
    QUARANTINED = "quarantined"  # refused, with its reason


FINAL_STATUSES = (ImageStatus.SCORED, ImageStatus.DUPLICATE, ImageStatus.QUARANTINED)


class EventKind(StrEnum):
    """What an `events` row records (stored as the value in `events.kind`)."""

    RECEIVED = "received"
    RETRY = "retry"  # received again after a crash, before any decision
    TAKEN_OVER = "taken_over"  # claimed from a worker whose lease expired
    SCORED = "scored"
    DUPLICATE = "duplicate"
    QUARANTINED = "quarantined"
    MOVED = "moved"  # the file left the inbox for its folder
    REPLACED = "replaced"  # the file changed in the inbox before it could be moved
    MISSING = "missing"  # the file was gone before it could be moved
    EXAM_OPENED = "exam_opened"
    EXAM_REOPENED = "exam_reopened"  # a late image reopened a scored exam
    EXAM_SCORED = "exam_scored"
    EXAM_SKIPPED = "exam_skipped"  # no scored image to score the exam on
    OUTBOX_WRITTEN = "outbox_written"


class ExamStatus(StrEnum):
    OPEN = "open"  # waiting for its study to be quiet (new, or reopened by a late image)
    SCORED = "scored"  # its latest scoring covers every image it has


def event_row(
    kind: EventKind, detail: str | None = None, *, image_id: int | None = None,
    exam_id: int | None = None
) -> dict[str, Any]:
    """One `events` row, timed now, for :func:`insert_events`."""
    return {"image_id": image_id, "exam_id": exam_id, "kind": kind, "detail": detail,
            "at": utcnow()}


def exam_event(s: Session, exam_id: int, kind: EventKind, detail: str | None = None) -> None:
    """An exam's event (no image), added to the session's transaction."""
    s.add(Event(image_id=None, exam_id=exam_id, kind=kind, detail=detail, at=utcnow()))


_INSERT_EVENTS = insert(Event.__table__)


def insert_events(s: Session, rows: list[dict[str, Any]]) -> None:
    """A transaction's events in one INSERT executed for each row, in the order given (their
    ids follow it), without an ORM object per event."""
    if rows:
        s.execute(_INSERT_EVENTS, rows)


# Nullable columns added after the first release: added in place to an older database.
UPGRADE_COLUMNS: dict[str, tuple[str, ...]] = {
    "images": ("patient_id", "study_uid", "laterality", "view", "sop_instance_uid", "claimed_by"),
    "events": ("exam_id",),
}


# Advisory lock keys (PostgreSQL): schema set-up, and the receipt and decision transactions
# of every worker on the database, which take turns so that a file is claimed by one worker and
# a copy always finds its original.
SCHEMA_LOCK = 0x6D616D6D6F01
FILES_LOCK = 0x6D616D6D6F02


class Store:
    """SQLAlchemy engine set up for many readers and one writer on SQLite.

    WAL lets `screen report` read while the worker writes; a busy timeout waits instead of
    failing; write transactions start with BEGIN IMMEDIATE so that the busy handler applies
    (a deferred transaction that upgrades to a write fails at once with "database is locked").
    """

    def __init__(self, url: str, busy_timeout_seconds: float = 30.0) -> None:
        self.url = url
        self.is_sqlite = url.startswith("sqlite")
        self.is_postgres = url.startswith("postgresql")
        kwargs: dict[str, Any] = {}
        if self.is_sqlite:
            kwargs["connect_args"] = {"timeout": busy_timeout_seconds, "check_same_thread": False}
        self.engine: Engine = create_engine(url, **kwargs)
        if self.is_sqlite:
            self._setup_sqlite(busy_timeout_seconds)
        with self.engine.connect() as conn:
            current = is_current(conn)  # the usual case: a read, no lock taken
        if not current:
            # A write transaction from the start (BEGIN IMMEDIATE on SQLite), and one at a
            # time on PostgreSQL, where several workers may start at once.
            with self.engine.execution_options(mammo_immediate=True).begin() as conn:
                self._serialise(conn, SCHEMA_LOCK)
                bring_up_to_date(conn, self._upgrade)
        self._writer = self.engine.execution_options(mammo_immediate=True)

    def _setup_sqlite(self, busy_timeout_seconds: float) -> None:
        @event.listens_for(self.engine, "connect")
        def _on_connect(dbapi_conn: Any, _record: Any) -> None:
            dbapi_conn.isolation_level = None  # we issue BEGIN ourselves
            cur = dbapi_conn.cursor()
            cur.execute(f"PRAGMA busy_timeout = {int(busy_timeout_seconds * 1000)}")
            cur.execute("PRAGMA journal_mode = WAL")
            cur.execute("PRAGMA synchronous = FULL")
            cur.execute("PRAGMA foreign_keys = ON")
            cur.close()

        @event.listens_for(self.engine, "begin")
        def _on_begin(conn: Any) -> None:
            immediate = conn.get_execution_options().get("mammo_immediate", False)
            conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")

    def _serialise(self, conn: Any, key: int) -> None:
        """Wait for, then hold until the transaction ends, the lock named `key` (PostgreSQL).
        SQLite needs none: its write transactions (BEGIN IMMEDIATE) already take turns."""
        if self.is_postgres:
            conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": key})

    def serialise(self, s: Session, key: int) -> None:
        """:meth:`_serialise` inside a session's transaction."""
        self._serialise(s.connection(), key)

    def _upgrade(self, conn: Any) -> None:
        """The pre-Alembic step: add the columns a database made before Alembic lacks
        (create_all, already run, makes only missing tables). Frozen: later schema changes
        are Alembic revisions."""
        for table_name, columns in UPGRADE_COLUMNS.items():
            table = Base.metadata.tables[table_name]
            present = {c["name"] for c in inspect(conn).get_columns(table_name)}
            missing = [name for name in columns if name not in present]
            for name in missing:
                col = table.c[name]
                ddl = col.type.compile(dialect=conn.dialect)
                for fk in col.foreign_keys:
                    ddl += f" REFERENCES {fk.column.table.name} ({fk.column.name})"
                conn.exec_driver_sql(f"ALTER TABLE {table_name} ADD COLUMN {name} {ddl}")
            if missing:
                log.info("upgraded database table=%s added=%s", table_name, ",".join(missing))
                for index in table.indexes:
                    index.create(conn, checkfirst=True)

    @contextmanager
    def write(self) -> Iterator[Session]:
        """A write transaction, committed on success, rolled back on any exception."""
        with Session(self._writer, expire_on_commit=False) as session, session.begin():
            yield session

    @contextmanager
    def read(self) -> Iterator[Session]:
        with Session(self.engine, expire_on_commit=False) as session, session.begin():
            yield session

    def dispose(self) -> None:
        self.engine.dispose()

    # ---- queries used by several commands -------------------------------------------------

    def counts_by_status(self, since: dt.datetime | None = None) -> dict[str, int]:
        with self.read() as s:
            q = select(ImageRecord.status, func.count()).group_by(ImageRecord.status)
            if since is not None:
                q = q.where(ImageRecord.received_at >= since)
            return {status: n for status, n in s.execute(q)}

    def all_images(self, since: dt.datetime | None = None) -> list[ImageRecord]:
        with self.read() as s:
            q = select(ImageRecord).order_by(ImageRecord.id)
            if since is not None:
                q = q.where(ImageRecord.received_at >= since)
            return list(s.scalars(q))

    def outcomes(self) -> dict[str, str]:
        with self.read() as s:
            return {o.sha256: o.label for o in s.scalars(select(Outcome))}
