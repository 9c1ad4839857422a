"""Every table of the database, as SQLAlchemy models: the one place the schema is written.

Alembic's migrations (worker/records/migrations) and the check that they agree with these
models (tests/test_schema.py) read `Base.metadata`, which holds every table once this module
is imported. The code that reads and writes them lives beside: the store and a file's states
(worker/records/store.py), heartbeats (heartbeat.py), heatmaps (heatmaps.py), the queue of
results for a PACS (pacs_queue.py); the states stored in the string columns are enums there.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import Float, ForeignKey, Index, Integer, LargeBinary, String, Text, event, text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from worker.records.clock import utcnow


class Base(DeclarativeBase):
    pass


OPEN_FILE_INDEX = "uq_images_open_file"
OPEN_FILE = "moved_at IS NULL"  # a row whose file has not yet left the inbox


class ImageRecord(Base):
    __tablename__ = "images"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    filename: Mapped[str] = mapped_column(Text)  # path relative to the inbox, as dropped
    source_path: Mapped[str] = mapped_column(Text)  # absolute path in the inbox
    # NULL only for a file that could never be read (quarantined after max_attempts).
    sha256: Mapped[str | None] = mapped_column(String(64), index=True)
    size_bytes: Mapped[int | None] = mapped_column(Integer)
    status: Mapped[str] = mapped_column(String(16), index=True)
    received_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    scored_at: Mapped[dt.datetime | None] = mapped_column(default=None)
    score: Mapped[float | None] = mapped_column(Float, default=None)
    label: Mapped[str | None] = mapped_column(String(32), default=None)
    threshold: Mapped[float | None] = mapped_column(Float, default=None)
    model_version: Mapped[str | None] = mapped_column(String(128), default=None)
    error: Mapped[str | None] = mapped_column(Text, default=None)
    duplicate_of: Mapped[int | None] = mapped_column(ForeignKey("images.id"), default=None)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    final_path: Mapped[str | None] = mapped_column(Text, default=None)
    moved_at: Mapped[dt.datetime | None] = mapped_column(default=None)
    # Identity (worker/imaging/identity.py): only what joining a breast and an exam needs.
    patient_id: Mapped[str | None] = mapped_column(String(64), default=None)
    study_uid: Mapped[str | None] = mapped_column(String(64), default=None, index=True)
    laterality: Mapped[str | None] = mapped_column(String(1), default=None)  # L, R
    view: Mapped[str | None] = mapped_column(String(16), default=None)  # CC, MLO, ...
    sop_instance_uid: Mapped[str | None] = mapped_column(String(64), default=None)
    # The worker (workers.id) whose claim this row is, for several workers on one inbox
    # (PostgreSQL): only it decides and moves the file until its lease runs out.
    claimed_by: Mapped[int | None] = mapped_column(Integer, default=None, index=True)

    __table_args__ = (
        # At most one unfinished row per (inbox path, content): the exactly-once guard. Its
        # predicate on PostgreSQL is added when the table is created there
        # (`_open_file_index_on_postgresql`).
        Index(
            OPEN_FILE_INDEX, "source_path", "sha256", unique=True, sqlite_where=text(OPEN_FILE)
        ),
    )


@event.listens_for(ImageRecord.__table__, "before_create")
def _open_file_index_on_postgresql(table: Any, connection: Any, **_: Any) -> None:
    """Give the exactly-once index its predicate on PostgreSQL, as the table is created there.
    Named in the model, `postgresql_where` would make SQLAlchemy import its PostgreSQL dialect
    with this module: about 25 ms of every worker's start, on SQLite too."""
    if connection.dialect.name == "postgresql":
        (index,) = [i for i in table.indexes if i.name == OPEN_FILE_INDEX]
        index.dialect_options["postgresql"]["where"] = text(OPEN_FILE)


class Event(Base):
    """The history of each file: every attempt, failure, decision and move, in order."""

    __tablename__ = "events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    image_id: Mapped[int | None] = mapped_column(ForeignKey("images.id"), index=True)
    # Set for an exam's events (scored, reopened, outbox written); image_id is then NULL.
    exam_id: Mapped[int | None] = mapped_column(ForeignKey("exams.id"), default=None, index=True)
    at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    kind: Mapped[str] = mapped_column(String(32))
    detail: Mapped[str | None] = mapped_column(Text, default=None)


class Exam(Base):
    """One exam: a study, by Study Instance UID (images without one belong to no exam).

    `status` is an ExamStatus: `open` while it waits for its study to be quiet for
    study_settle_seconds after `last_image_at`, `scored` after; a later image reopens it.
    """

    __tablename__ = "exams"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_uid: Mapped[str] = mapped_column(String(64), unique=True)
    patient_id: Mapped[str | None] = mapped_column(String(64), default=None)
    status: Mapped[str] = mapped_column(String(16), index=True)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    last_image_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    scorings: Mapped[int] = mapped_column(Integer, default=0)


class ExamResult(Base):
    """One scoring of an exam; a rescoring adds a row, so earlier scores stay on record.

    The outbox document is planned (`outbox_path`) in the same commit as the scores and
    written after it; `outbox_written_at` is set once the file is in place.
    """

    __tablename__ = "exam_results"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    exam_id: Mapped[int] = mapped_column(ForeignKey("exams.id"), index=True)
    seq: Mapped[int] = mapped_column(Integer)  # 1 for the first scoring of the exam, then 2...
    scored_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    patient_id: Mapped[str | None] = mapped_column(String(64), default=None)
    study_uid: Mapped[str | None] = mapped_column(String(64), default=None)
    n_images: Mapped[int] = mapped_column(Integer)
    score: Mapped[float] = mapped_column(Float)
    label: Mapped[str] = mapped_column(String(32))
    threshold: Mapped[float] = mapped_column(Float)
    threshold_rule: Mapped[str | None] = mapped_column(Text, default=None)
    model_version: Mapped[str] = mapped_column(String(128))
    breast_rule: Mapped[str] = mapped_column(String(16))
    exam_rule: Mapped[str] = mapped_column(String(16))
    image_ids: Mapped[str] = mapped_column(Text)  # JSON list of the images this scoring used
    outbox_path: Mapped[str | None] = mapped_column(Text, default=None)
    outbox_written_at: Mapped[dt.datetime | None] = mapped_column(default=None)

    __table_args__ = (Index("uq_exam_results_seq", "exam_id", "seq", unique=True),)


class BreastResult(Base):
    """One breast of one exam scoring."""

    __tablename__ = "breast_results"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    exam_result_id: Mapped[int] = mapped_column(ForeignKey("exam_results.id"), index=True)
    laterality: Mapped[str] = mapped_column(String(1))
    n_images: Mapped[int] = mapped_column(Integer)
    score: Mapped[float] = mapped_column(Float)
    label: Mapped[str] = mapped_column(String(32))


class HeatmapRecord(Base):
    """Where the model looked on one scored image (worker/records/heatmaps.py): a small map
    covering the decoded picture, float16 bytes of shape (rows, cols), committed with its
    score."""

    __tablename__ = "heatmaps"

    image_id: Mapped[int] = mapped_column(ForeignKey("images.id"), primary_key=True)
    model_version: Mapped[str] = mapped_column(String(128))
    rows: Mapped[int] = mapped_column(Integer)
    cols: Mapped[int] = mapped_column(Integer)
    data: Mapped[bytes] = mapped_column(LargeBinary)


class Outcome(Base):
    """Ground truth (e.g. biopsy result) for an image's content, keyed by its SHA-256."""

    __tablename__ = "outcomes"

    sha256: Mapped[str] = mapped_column(String(64), primary_key=True)
    label: Mapped[str] = mapped_column(String(32))
    source: Mapped[str | None] = mapped_column(Text, default=None)
    imported_at: Mapped[dt.datetime] = mapped_column(default=utcnow)


class OutcomeChange(Base):
    """Every outcome recorded or replaced, in order: a replaced label stays in this history."""

    __tablename__ = "outcome_changes"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    sha256: Mapped[str] = mapped_column(String(64), index=True)
    label: Mapped[str] = mapped_column(String(32))
    previous_label: Mapped[str | None] = mapped_column(String(32), default=None)
    source: Mapped[str | None] = mapped_column(Text, default=None)  # file name and line
    at: Mapped[dt.datetime] = mapped_column(default=utcnow)


class SitePointRecord(Base):
    """A site operating point (`screen calibrate`): a threshold chosen on this site's own
    outcomes for one model version. Rows are never changed: calibrating a name again adds a
    row, and the newest row of a (name, model version) is the point in force, so the
    history stays (see worker/scoring/site_points.py)."""

    __tablename__ = "site_points"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(64), index=True)
    model_version: Mapped[str] = mapped_column(String(128))
    level: Mapped[str] = mapped_column(String(16))  # image, breast or exam
    target: Mapped[str] = mapped_column(String(16))  # sensitivity, specificity, recall_rate
    target_value: Mapped[float] = mapped_column(Float)
    threshold: Mapped[float] = mapped_column(Float)
    women: Mapped[int] = mapped_column(Integer)  # resampling groups (patients) behind it
    units: Mapped[int] = mapped_column(Integer)  # images, breasts or exams with an outcome
    figures: Mapped[str] = mapped_column(Text)  # JSON: each figure and its 95% interval
    created_by: Mapped[str] = mapped_column(String(128))
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)


class WorkerRecord(Base):
    """One worker process's life (worker/records/heartbeat.py): a new table, so databases from
    older releases gain it through `create_all` without any change to the existing tables."""

    __tablename__ = "workers"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    pid: Mapped[int] = mapped_column(Integer)
    host: Mapped[str] = mapped_column(String(255))
    command: Mapped[str] = mapped_column(String(16))  # watch | process
    inbox: Mapped[str] = mapped_column(Text, index=True)
    model_path: Mapped[str] = mapped_column(Text)
    model_version: Mapped[str] = mapped_column(String(128))
    config_path: Mapped[str | None] = mapped_column(Text, default=None)
    beat_seconds: Mapped[float] = mapped_column(Float)
    started_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    last_beat_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    stopped_at: Mapped[dt.datetime | None] = mapped_column(default=None, index=True)
    stop_reason: Mapped[str | None] = mapped_column(Text, default=None)


class ResultInstance(Base):
    """One DICOM instance to deliver to the PACS (its life: worker/records/pacs_queue.py)."""

    __tablename__ = "result_instances"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    exam_result_id: Mapped[int] = mapped_column(ForeignKey("exam_results.id"), index=True)
    image_id: Mapped[int | None] = mapped_column(ForeignKey("images.id"), default=None)
    kind: Mapped[str] = mapped_column(String(8))  # InstanceKind
    study_uid: Mapped[str] = mapped_column(String(64))
    series_uid: Mapped[str] = mapped_column(String(64))
    sop_instance_uid: Mapped[str] = mapped_column(String(64), unique=True)
    sop_class_uid: Mapped[str] = mapped_column(String(64))
    # A report that replaces an earlier one of the same exam (a rescoring): that one's UID.
    supersedes_uid: Mapped[str | None] = mapped_column(String(64), default=None)
    state: Mapped[str] = mapped_column(String(16), index=True)  # DeliveryState
    path: Mapped[str | None] = mapped_column(Text, default=None)  # the built file
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    built_at: Mapped[dt.datetime | None] = mapped_column(default=None)
    sent_at: Mapped[dt.datetime | None] = mapped_column(default=None)
    sent_to: Mapped[str | None] = mapped_column(Text, default=None)  # AE@host:port
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    # A worker's hold on the row while it builds or sends it (several workers, PostgreSQL).
    claimed_until: Mapped[dt.datetime | None] = mapped_column(default=None)
    status_code: Mapped[int | None] = mapped_column(Integer, default=None)  # the PACS's answer
    last_error: Mapped[str | None] = mapped_column(Text, default=None)
    first_failed_at: Mapped[dt.datetime | None] = mapped_column(default=None)
