"""The delivery queue of DICOM results (one row per instance to send), and its planning.

An exam scoring with DICOM images plans, in the same transaction that records the scoring
(`plan_results`, called by ExamBook.score), one structured report for the exam and one
Secondary Capture per DICOM image. Each row's life, every step committed before the next
touches the disk or the network:

    planned --built (file written durably under [send] results_dir)--> ready
    ready --C-STORE accepted--> sent
    ready --transient failure (no association, abort, timeout, 0xA7xx out of resources)-->
          ready again after a backoff (attempts, last_error, status_code recorded)
    ready --failure status from the PACS (0xA9xx, 0xCxxx, 0x01xx, SOP class refused)--> rejected
    planned --cannot be built (source file gone, not DICOM)--> failed
    ready --its built file is gone--> planned (built again: the same bytes)

UIDs are fixed when the row is planned, from the source study, the model version and the
exam's scoring sequence, so a retry after a crash or an outage re-sends the same instance
(the PACS replaces or ignores it) and never creates a second copy under another UID.

Instances are built after the commit, not inside it: decoding a full-size mammogram takes
seconds, which the scoring transaction (SQLite's one writer) must not wait for, and keeping
megabytes of pixels in database rows would bloat every backup. The row records the built
file's path, and a re-send reads the same bytes; a build is a function of the database and
the source file, so building again gives the same bytes too.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from sqlalchemy import event, func, select
from sqlalchemy.orm import Session

from worker.records.clock import iso, utcnow
from worker.records.models import ExamResult, ImageRecord, ResultInstance

COMPREHENSIVE_3D_SR = "1.2.840.10008.5.1.4.1.1.88.34"
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"


class DeliveryState(StrEnum):
    PLANNED = "planned"  # UIDs fixed, file not yet built
    READY = "ready"  # file built, waiting to be sent (or to be retried)
    SENT = "sent"  # the PACS accepted it
    REJECTED = "rejected"  # the PACS refused it with a failure status: not retried
    FAILED = "failed"  # could not be built (the reason says why): not retried


WAITING = (DeliveryState.PLANNED.value, DeliveryState.READY.value)


class InstanceKind(StrEnum):
    REPORT = "sr"  # the exam's TID 1500 measurement report
    CAPTURE = "sc"  # one image's Secondary Capture


def result_uid(prefix: str, study_uid: str, model_version: str, seq: int, role: str) -> str:
    """A result's UID, the same every time for the same study, model, scoring and role: a
    hash of them under `prefix` (pydicom's root when empty; never pydicom's random form)."""
    from pydicom.uid import PYDICOM_ROOT_UID, generate_uid  # pydicom: 0.3 s of every start

    return str(generate_uid(prefix=prefix or PYDICOM_ROOT_UID,
                            entropy_srcs=[study_uid, model_version, str(seq), role]))


@dataclass(frozen=True)
class ResultUids:
    prefix: str
    study_uid: str
    model_version: str
    seq: int

    def uid(self, role: str) -> str:
        return result_uid(self.prefix, self.study_uid, self.model_version, self.seq, role)

    @property
    def report_series(self) -> str:
        return self.uid("sr-series")

    @property
    def report(self) -> str:
        return self.uid("sr")

    @property
    def capture_series(self) -> str:
        return self.uid("sc-series")

    def capture(self, source_sop_instance_uid: str) -> str:
        return self.uid(f"sc:{source_sop_instance_uid}")


def planner(uid_prefix: str, on_planned: Callable[[], None] | None = None
            ) -> Callable[[Session, ExamResult, list[ImageRecord]], int]:
    """ExamBook's hook: plan a scoring's results inside its transaction (see the module)."""

    def plan(s: Session, result: ExamResult, images: list[ImageRecord]) -> int:
        n = plan_results(s, result, images, uid_prefix)
        if n and on_planned is not None:  # once committed: the sender then sees the rows
            event.listen(s, "after_commit", lambda _s: on_planned(), once=True)
        return n

    return plan


def plan_results(s: Session, result: ExamResult, images: list[ImageRecord],
                 uid_prefix: str) -> int:
    """Queue the report and the captures of one exam scoring; only DICOM images (those with
    a SOP Instance UID) are referenced or captured. Returns the number of rows queued."""
    dicom = [r for r in images if r.sop_instance_uid is not None]
    if not dicom or result.study_uid is None:
        return 0
    uids = ResultUids(uid_prefix, result.study_uid, result.model_version, result.seq)
    earlier = s.scalars(
        select(ResultInstance.sop_instance_uid)
        .join(ExamResult, ExamResult.id == ResultInstance.exam_result_id)
        .where(ExamResult.exam_id == result.exam_id, ExamResult.seq < result.seq,
               ResultInstance.kind == InstanceKind.REPORT.value)
        .order_by(ExamResult.seq.desc())
    ).first()
    now = utcnow()
    common: dict[str, Any] = {"exam_result_id": result.id, "study_uid": result.study_uid,
                              "state": DeliveryState.PLANNED.value, "created_at": now,
                              "next_attempt_at": now, "attempts": 0}
    s.add(ResultInstance(**common, kind=InstanceKind.REPORT.value,
                         series_uid=uids.report_series, sop_instance_uid=uids.report,
                         sop_class_uid=COMPREHENSIVE_3D_SR, supersedes_uid=earlier))
    for r in dicom:
        s.add(ResultInstance(**common, kind=InstanceKind.CAPTURE.value, image_id=r.id,
                             series_uid=uids.capture_series,
                             sop_instance_uid=uids.capture(str(r.sop_instance_uid)),
                             sop_class_uid=SECONDARY_CAPTURE))
    return 1 + len(dicom)


def queue_summary(s: Session) -> dict[str, Any]:
    """Counts by state and the oldest failure still waiting (for `screen status`)."""
    counts = {state: n for state, n in s.execute(
        select(ResultInstance.state, func.count()).group_by(ResultInstance.state))}
    oldest = s.scalars(
        select(ResultInstance)
        .where(ResultInstance.state.in_(WAITING), ResultInstance.first_failed_at.is_not(None))
        .order_by(ResultInstance.first_failed_at, ResultInstance.id)
    ).first()
    stopped = s.scalars(
        select(ResultInstance)
        .where(ResultInstance.state.in_([DeliveryState.REJECTED.value,
                                         DeliveryState.FAILED.value]))
        .order_by(ResultInstance.id)
    ).first()
    return {
        "counts": counts,
        "waiting": sum(counts.get(state, 0) for state in WAITING),
        "oldest_failure": None if oldest is None else _failure(oldest),
        "first_refused": None if stopped is None else _failure(stopped),
    }


def _failure(row: ResultInstance) -> dict[str, Any]:
    return {"sop_instance_uid": row.sop_instance_uid, "kind": row.kind, "state": row.state,
            "attempts": row.attempts, "status_code": row.status_code, "error": row.last_error,
            "since": iso(row.first_failed_at)}
