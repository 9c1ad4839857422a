"""Listing recorded results and importing ground-truth outcomes."""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from worker.audit.outcome_labels import OUTCOME_LABELS, describe_vocabulary
from worker.records.clock import iso, utcnow
from worker.records.models import BreastResult, ExamResult, ImageRecord, Outcome, OutcomeChange
from worker.records.paths import path_from_db
from worker.records.store import Store

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

_LABEL_OF = {
    word: label for label, aliases in OUTCOME_LABELS.items() for word in (label, *aliases)
}


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


class OutcomeFileError(ValueError):
    """An outcomes file that cannot be imported as it is; nothing was recorded."""


class OutcomeConflictError(OutcomeFileError):
    """Rows that would change recorded outcomes, without --replace; nothing was recorded."""


@dataclass
class ImportSummary:
    matched: int = 0  # rows that matched at least one screened image
    added: int = 0  # outcomes recorded for the first time
    replaced: int = 0  # outcomes changed (with replace=True); the old ones stay in the history
    unchanged: int = 0  # already recorded with the same label
    unmatched: list[str] = field(default_factory=list)
    invalid: list[str] = field(default_factory=list)  # rows skipped (skip_invalid=True)

    @property
    def updated(self) -> int:
        return self.added + self.replaced


@dataclass(frozen=True)
class _Row:
    line: int
    key: str  # what the row names: its sha256, else its filename
    sha256: str
    filename: str
    label: str


def _normalise_label(value: str) -> str | None:
    return _LABEL_OF.get(value.strip().lower())


def _read_rows(csv_path: Path) -> tuple[list[_Row], list[str]]:
    """The file's rows, and a description of each invalid one (with its line number)."""
    try:
        text = csv_path.read_text(encoding="utf-8-sig")
    except OSError as exc:
        raise OutcomeFileError(f"cannot read outcomes file {csv_path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise OutcomeFileError(f"outcomes file {csv_path} is not UTF-8 text") from None
    reader = csv.DictReader(io.StringIO(text))
    cols = set(reader.fieldnames or [])
    if "label" not in cols or not cols & {"filename", "sha256"}:
        raise OutcomeFileError(
            f"{csv_path}: needs a 'label' column and a 'filename' or 'sha256' column, "
            f"found {sorted(cols)}"
        )
    rows: list[_Row] = []
    invalid: list[str] = []
    for row in reader:
        line = reader.line_num
        sha = (row.get("sha256") or "").strip().lower()
        name = (row.get("filename") or "").strip()
        raw_label = row.get("label") or ""
        label = _normalise_label(raw_label)
        if label is None:
            invalid.append(f"line {line}: label {raw_label.strip()!r} is not in the vocabulary")
        elif not sha and not name:
            invalid.append(f"line {line}: no filename or sha256")
        else:
            rows.append(_Row(line, sha or name, sha, name, label))
    return rows, invalid


def _listing(items: list[str], limit: int = 5) -> str:
    more = f"; and {len(items) - limit} more" if len(items) > limit else ""
    return "; ".join(items[:limit]) + more


def import_outcomes(
    store: Store, csv_path: Path, skip_invalid: bool = False, replace: bool = False
) -> ImportSummary:
    """Record true labels from a CSV with `label` and `filename` and/or `sha256` columns.

    All or nothing, in one transaction: an invalid row (a label outside OUTCOME_LABELS, no
    filename or sha256) fails the import unless `skip_invalid`, and a row that would change an
    outcome already recorded fails it unless `replace`. Every change is appended to the
    `outcome_changes` history, so a replaced label is never lost. A filename matches an image
    whose recorded name (relative to the inbox) or base name is equal; rows that match nothing
    are reported, never silently dropped.
    """
    rows, invalid = _read_rows(csv_path)
    if invalid and not skip_invalid:
        raise OutcomeFileError(
            f"{csv_path}: {len(invalid)} invalid row(s), nothing imported: {_listing(invalid)} "
            f"(labels: {describe_vocabulary()}; --skip-invalid skips such rows)"
        )
    summary = ImportSummary(invalid=invalid)
    with store.write() as s:
        by_sha = {sha for (sha,) in s.execute(select(ImageRecord.sha256))}
        by_name: dict[str, set[str]] = {}
        for name, sha in s.execute(select(ImageRecord.filename, ImageRecord.sha256)):
            if sha is None:
                continue  # never read, so no content to attach an outcome to
            by_name.setdefault(name, set()).add(sha)
            by_name.setdefault(Path(name).name, set()).add(sha)
        wanted: dict[str, _Row] = {}  # sha256 -> the row that gives its label
        clashes: list[str] = []
        for row in rows:
            shas = {row.sha256} & by_sha if row.sha256 else set()
            if not shas and row.filename:
                shas = by_name.get(row.filename) or by_name.get(Path(row.filename).name) or set()
            if not shas:
                summary.unmatched.append(row.key)
                continue
            summary.matched += 1
            for digest in sorted(shas):
                earlier = wanted.setdefault(digest, row)
                if earlier.label != row.label:
                    clashes.append(
                        f"line {row.line}: {row.key} is {row.label}, "
                        f"line {earlier.line} said {earlier.label}"
                    )
        if clashes:  # the file contradicts itself: no flag makes that right
            raise OutcomeFileError(
                f"{csv_path}: {len(clashes)} row(s) contradict earlier rows, nothing imported: "
                f"{_listing(clashes)}"
            )
        existing = {
            o.sha256: o for o in s.scalars(select(Outcome).where(Outcome.sha256.in_(wanted)))
        }
        conflicts = [
            f"line {row.line}: {row.key} is recorded as {existing[sha].label}, "
            f"the file says {row.label}"
            for sha, row in wanted.items()
            if sha in existing and existing[sha].label != row.label
        ]
        if conflicts and not replace:
            raise OutcomeConflictError(
                f"{csv_path}: {len(conflicts)} row(s) would change recorded outcomes, nothing "
                f"imported: {_listing(conflicts)} (--replace replaces them; the old labels "
                "stay in the history)"
            )
        now = utcnow()
        for sha, row in wanted.items():
            old = existing.get(sha)
            if old is not None and old.label == row.label:
                summary.unchanged += 1
                continue
            source = f"{csv_path.name} line {row.line}"
            s.add(
                OutcomeChange(
                    sha256=sha,
                    label=row.label,
                    previous_label=None if old is None else old.label,
                    source=source,
                    at=now,
                )
            )
            if old is None:
                s.add(Outcome(sha256=sha, label=row.label, source=csv_path.name, imported_at=now))
                summary.added += 1
            else:
                old.label, old.source, old.imported_at = row.label, csv_path.name, now
                summary.replaced += 1
    return summary


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


@dataclass(frozen=True)
class WaitingExams:
    """Open exams: their studies have not yet been quiet for [worker] study_settle_seconds."""

    count: int
    next_due: dt.datetime | None  # naive UTC: when the earliest of them may be scored
    settle_seconds: float


def waiting_exams(store: Store, settle_seconds: float) -> WaitingExams:
    from sqlalchemy import func

    from worker.records.models import Exam
    from worker.records.store import ExamStatus

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
