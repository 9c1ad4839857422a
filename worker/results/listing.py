"""Listing recorded results and the history of their outcomes."""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from worker.records.clock import iso, utcnow
from worker.records.models import BreastResult, ExamResult, OutcomeChange
from worker.records.paths import path_from_db
from worker.records.store import Store
from worker.results.exams import WaitingExams

RESULT_COLUMNS = (
    "id",
    "filename",
    "sha256",
    "size_bytes",
    "status",
    "score",
    "label",
    "threshold",
    "model_version",
    "received_at",
    "scored_at",
    "error",
    "duplicate_of",
    "final_path",
    "outcome",
    "patient_id",
    "study_uid",
    "laterality",
    "view",
    "sop_instance_uid",
)


def result_rows(store: Store, since: dt.datetime | None = None) -> list[dict[str, Any]]:
    outcomes = store.outcomes()
    rows = []
    for r in store.all_images(since):
        rows.append(
            {
                "id": r.id,
                "filename": r.filename,
                "sha256": r.sha256,
                "size_bytes": r.size_bytes,
                "status": r.status,
                "score": r.score,
                "label": r.label,
                "threshold": r.threshold,
                "model_version": r.model_version,
                "received_at": iso(r.received_at),
                "scored_at": iso(r.scored_at),
                "error": r.error,
                "duplicate_of": r.duplicate_of,
                "final_path": r.final_path,
                "outcome": outcomes.get(r.sha256),
                "patient_id": r.patient_id,
                "study_uid": r.study_uid,
                "laterality": r.laterality,
                "view": r.view,
                "sop_instance_uid": r.sop_instance_uid,
            }
        )
    return rows


def format_rows(
    rows: list[dict[str, Any]], fmt: str, columns: tuple[str, ...] = RESULT_COLUMNS
) -> str:
    """JSON (every key of each row) or CSV (exactly `columns`, in that order)."""
    if fmt == "json":
        return json.dumps(rows, indent=2)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n", extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: "" if row[k] is None else row[k] for k in columns})
    return buf.getvalue()


def outcome_history(store: Store, sha256: str) -> list[dict[str, Any]]:
    """Every label recorded for this content, oldest first."""
    with store.read() as s:
        changes = s.scalars(
            select(OutcomeChange).where(OutcomeChange.sha256 == sha256).order_by(OutcomeChange.id)
        )
        return [
            {
                "label": c.label,
                "previous_label": c.previous_label,
                "source": c.source,
                "at": iso(c.at),
            }
            for c in changes
        ]


def describe_waiting(waiting: WaitingExams, now: dt.datetime | None = None) -> str | None:
    """One line for `screen results --level breast|exam`, whose rows hold only scored exams."""
    if not waiting.count or waiting.next_due is None:
        return None
    left = (waiting.next_due - (now or utcnow())).total_seconds()
    at = iso(waiting.next_due.replace(microsecond=0))
    when = f"in {left:.0f} s ({at})" if left > 0 else f"now (due since {at})"
    return (f"{waiting.count} exam(s) not listed: waiting for their study to settle "
            f"([worker] study_settle_seconds = {waiting.settle_seconds:g}); the next is scored "
            f"{when} by a running `screen watch` or the next `screen process` "
            "(`screen process --settle-now` scores them all now)")


# ---- breasts and exams (screen results --level breast|exam) --------------------------------

BREAST_COLUMNS = ("patient_id", "study_uid", "laterality", "n_images", "score", "label")
EXAM_COLUMNS = ("patient_id", "study_uid", "n_images", "score", "label")


def _latest_results(s: Session) -> list[ExamResult]:
    latest = (
        select(ExamResult.exam_id, func.max(ExamResult.seq).label("seq"))
        .group_by(ExamResult.exam_id)
        .subquery()
    )
    return list(
        s.scalars(
            select(ExamResult)
            .join(
                latest,
                (ExamResult.exam_id == latest.c.exam_id) & (ExamResult.seq == latest.c.seq),
            )
            .order_by(ExamResult.exam_id)
        )
    )


def _results(s: Session, history: bool, since: dt.datetime | None) -> list[ExamResult]:
    if history:
        results = list(s.scalars(select(ExamResult).order_by(ExamResult.id)))
    else:
        results = _latest_results(s)
    return [r for r in results if since is None or r.scored_at >= since]


def exam_rows(
    store: Store, history: bool = False, since: dt.datetime | None = None
) -> list[dict[str, Any]]:
    """One row per exam (its latest scoring), or per scoring with `history`; `since`
    keeps scorings made at or after that time."""
    with store.read() as s:
        results = _results(s, history, since)
        return [
            {
                "patient_id": r.patient_id,
                "study_uid": r.study_uid,
                "n_images": r.n_images,
                "score": r.score,
                "label": r.label,
                "exam_id": r.exam_id,
                "seq": r.seq,
                "scored_at": iso(r.scored_at),
                "model_version": r.model_version,
                "threshold": r.threshold,
                "outbox": None if r.outbox_path is None else path_from_db(r.outbox_path).name,
            }
            for r in results
        ]


def breast_rows(
    store: Store, history: bool = False, since: dt.datetime | None = None
) -> list[dict[str, Any]]:
    """One row per breast of each exam's latest scoring (or of every scoring)."""
    with store.read() as s:
        results = _results(s, history, since)
        by_id = {r.id: r for r in results}
        breasts = s.scalars(
            select(BreastResult)
            .where(BreastResult.exam_result_id.in_(list(by_id)))
            .order_by(BreastResult.exam_result_id, BreastResult.laterality)
        )
        return [
            {
                "patient_id": by_id[b.exam_result_id].patient_id,
                "study_uid": by_id[b.exam_result_id].study_uid,
                "laterality": b.laterality,
                "n_images": b.n_images,
                "score": b.score,
                "label": b.label,
                "exam_id": by_id[b.exam_result_id].exam_id,
                "seq": by_id[b.exam_result_id].seq,
                "scored_at": iso(by_id[b.exam_result_id].scored_at),
            }
            for b in breasts
        ]
