"""Listing recorded results and the history of their outcomes."""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select

from worker.records.store import OutcomeChange, Store, utcnow

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


def _iso(value: dt.datetime | None) -> str | None:
    return None if value is None else value.isoformat() + "Z"


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
                "received_at": _iso(r.received_at),
                "scored_at": _iso(r.scored_at),
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
                "at": _iso(c.at),
            }
            for c in changes
        ]


@dataclass(frozen=True)
class WaitingExams:
    """Open exams: their studies have not yet been quiet for [worker] study_settle_seconds."""

    count: int
    next_due: dt.datetime | None  # naive UTC: when the earliest of them may be scored
    settle_seconds: float


def waiting_exams(store: Store, settle_seconds: float) -> WaitingExams:
    from sqlalchemy import func

    from worker.records.store import Exam, ExamStatus

    with store.read() as s:
        count, quiet_since = s.execute(
            select(func.count(), func.min(Exam.last_image_at)).where(
                Exam.status == ExamStatus.OPEN.value)).one()
    due = None if quiet_since is None else quiet_since + dt.timedelta(seconds=settle_seconds)
    return WaitingExams(count or 0, due, settle_seconds)


def describe_waiting(waiting: WaitingExams, now: dt.datetime | None = None) -> str | None:
    """One line for `screen results --level breast|exam`, whose rows hold only scored exams."""
    if not waiting.count or waiting.next_due is None:
        return None
    left = (waiting.next_due - (now or utcnow())).total_seconds()
    at = waiting.next_due.replace(microsecond=0).isoformat() + "Z"
    when = f"in {left:.0f} s ({at})" if left > 0 else f"now (due since {at})"
    return (f"{waiting.count} exam(s) not listed: waiting for their study to settle "
            f"([worker] study_settle_seconds = {waiting.settle_seconds:g}); the next is scored "
            f"{when} by a running `screen watch` or the next `screen process` "
            "(`screen process --settle-now` scores them all now)")
