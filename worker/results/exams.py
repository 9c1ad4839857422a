"""Exams and their state machine: scored images join their study's exam, a quiet study is scored.

An exam is a study: all images with the same Study Instance UID (from the DICOM header, the
sidecar CSV or the file-name pattern). An image without one belongs to no exam and is listed
at image level only: an exam result nobody can attach to a patient's study would be of no use
downstream, and a plain inbox without identity keeps working exactly as before. Only `scored`
images count: duplicates and quarantined files never enter a breast or an exam (the scores are
aggregated by worker/results/aggregation.py).

An exam's life, each step committed before the next touches the disk:

    open --(study quiet for study_settle_seconds)--> scored: an `exam_results` row with its
         `breast_results`, and the outbox document's planned path
         --> outbox document written (worker/results/outbox.py), `outbox_written_at` set
    scored --(a later image of the study is scored)--> open again (event `exam_reopened`); its
         next scoring is a new `exam_results` row and a new document, the earlier ones stay.

A crash after the commit and before the document is written is finished by the next step
(`write_owed_documents`).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import bindparam, func, insert, select, update
from sqlalchemy.orm import Session

from worker.records.clock import utcnow
from worker.records.models import BreastResult, Exam, ExamResult, ImageRecord
from worker.records.paths import path_to_db
from worker.records.store import EventKind, ExamStatus, ImageStatus, Store, event_row, exam_event
from worker.results.aggregation import label_for, one_per_instance, score_exam
from worker.results.outbox import document_path, write_document, write_owed_documents
from worker.scoring.model_metadata import ModelMetadata

log = logging.getLogger("mammo_screen")


# ---- joining an exam (called by the pipeline, inside its decision transaction) ------------


@dataclass(frozen=True)
class Joining:
    """A newly scored image that joins its study's exam."""

    image_id: int
    study_uid: str
    patient_id: str | None


_EXAMS = Exam.__table__
# Built once: they run for every batch.
_EXAMS_OF = select(_EXAMS.c.id, _EXAMS.c.study_uid, _EXAMS.c.patient_id, _EXAMS.c.status).where(
    _EXAMS.c.study_uid.in_(bindparam("uids", expanding=True))
)
_INSERT_EXAMS = insert(_EXAMS)
_UPDATE_EXAM = update(_EXAMS).where(_EXAMS.c.id == bindparam("b_id"))


def join_exams(s: Session, images: list[Joining], now: dt.datetime) -> dict[int, dict[str, Any]]:
    """Newly scored images join their exams, in the order given (the decision order): an
    exam is created for the first image of a study it has not seen, or notes the activity
    (and the patient, if it had none) and reopens if it was scored. In a few statements for
    the batch: the exams read in one query, the new ones inserted in one INSERT executed per
    exam (ids in the order of their first image) and read back, the others updated in one
    UPDATE. Returns the `events` row (exam_opened, exam_reopened) that an image caused, by
    image id, for the caller to insert after that image's own event, so that the history
    keeps the order in which things happened."""
    if not images:
        return {}
    known = {
        r.study_uid: r for r in s.execute(_EXAMS_OF, {"uids": list({i.study_uid for i in images})})
    }
    new: dict[str, dict[str, Any]] = {}  # by study, in the order of their first image
    opened: list[Joining] = []
    changed: dict[int, dict[str, Any]] = {}
    reopened: list[tuple[Joining, int]] = []
    for image in images:
        exam = known.get(image.study_uid)
        if exam is None:
            values = new.get(image.study_uid)
            if values is None:
                new[image.study_uid] = {
                    "study_uid": image.study_uid,
                    "patient_id": image.patient_id,
                    "status": ExamStatus.OPEN.value,
                    "created_at": now,
                    "last_image_at": now,
                    "scorings": 0,
                }
                opened.append(image)
            elif values["patient_id"] is None:
                values["patient_id"] = image.patient_id
            continue
        values = changed.setdefault(
            exam.id, {"b_id": exam.id, "patient_id": exam.patient_id, "status": exam.status}
        )
        values["last_image_at"] = now
        if values["patient_id"] is None:
            values["patient_id"] = image.patient_id
        if values["status"] == ExamStatus.SCORED.value:
            values["status"] = ExamStatus.OPEN.value
            reopened.append((image, exam.id))
    if changed:
        s.execute(_UPDATE_EXAM, list(changed.values()))
    ids: dict[str, int] = {}
    if new:
        s.execute(_INSERT_EXAMS, list(new.values()))
        ids = {r.study_uid: r.id for r in s.execute(_EXAMS_OF, {"uids": list(new)})}
    events: dict[int, dict[str, Any]] = {}
    for image in opened:
        events[image.image_id] = event_row(
            EventKind.EXAM_OPENED, f"image #{image.image_id}", exam_id=ids[image.study_uid]
        )
    for image, exam_id in reopened:
        events[image.image_id] = event_row(
            EventKind.EXAM_REOPENED, f"late image #{image.image_id}", exam_id=exam_id
        )
        log.info(
            "exam reopened exam=%d study=%s image=%d", exam_id, image.study_uid, image.image_id
        )
    return events


# ---- scoring settled exams ----------------------------------------------------------------


@dataclass(frozen=True)
class ExamScoring:
    """One exam scoring made by a step (for callers and tests; the DB is the record)."""

    exam_id: int
    result_id: int
    seq: int
    study_uid: str
    score: float
    label: str
    outbox_path: Path | None


@dataclass(frozen=True)
class WaitingExams:
    """Open exams: their studies have not yet been quiet for [worker] study_settle_seconds."""

    count: int
    next_due: dt.datetime | None  # naive UTC: when the earliest of them may be scored
    settle_seconds: float


def waiting_exams(store: Store, settle_seconds: float) -> WaitingExams:
    """How many exams are open, and when the earliest may be scored."""
    with store.read() as s:
        count, quiet_since = s.execute(
            select(func.count(), func.min(Exam.last_image_at)).where(
                Exam.status == ExamStatus.OPEN.value)).one()
    due = None if quiet_since is None else quiet_since + dt.timedelta(seconds=settle_seconds)
    return WaitingExams(count or 0, due, settle_seconds)



class ExamBook:
    """Scores exams whose study has settled and writes their outbox documents."""

    def __init__(
        self,
        store: Store,
        metadata: ModelMetadata,
        outbox: Path,
        settle_seconds: float,
        clock: Callable[[], dt.datetime] = utcnow,
        operating_point: str = "",
        on_scored: Callable[[Session, ExamResult, list[ImageRecord]], object] | None = None,
    ) -> None:
        self.store = store
        # Called inside the scoring's transaction (worker.records.pacs_queue plans DICOM results).
        self.on_scored = on_scored
        self.metadata = metadata
        # Breasts and exams are called at the same operating point as the images.
        self.operating_point, self.point = metadata.operating_point(operating_point)
        self.outbox = outbox
        self.settle_seconds = settle_seconds
        self.clock = clock  # naive UTC, like every stored time

    def due(self, settle_now: bool = False) -> list[int]:
        """Open exams whose study has been quiet for settle_seconds (all with settle_now)."""
        cutoff = self.clock() - dt.timedelta(seconds=self.settle_seconds)
        with self.store.read() as s:
            q = select(Exam.id).where(Exam.status == ExamStatus.OPEN.value).order_by(Exam.id)
            if not settle_now:
                q = q.where(Exam.last_image_at <= cutoff)
            return list(s.scalars(q))

    def waiting(self) -> int:
        return waiting_exams(self.store, self.settle_seconds).count

    def step(self, settle_now: bool = False) -> list[ExamScoring]:
        """Finish owed documents, then score every due exam and write its document."""
        write_owed_documents(self.store)
        out = []
        for exam_id in self.due(settle_now):
            scoring = self.score(exam_id)
            if scoring is not None:
                path = write_document(self.store, scoring.result_id)
                out.append(dataclasses.replace(scoring, outbox_path=path))
        return out

    def score(self, exam_id: int) -> ExamScoring | None:
        """Score one open exam and commit the result with its planned document path."""
        meta = self.metadata
        with self.store.write() as s:
            # Several workers: the first to lock the exam scores it; the next finds it scored.
            exam = s.get(Exam, exam_id, with_for_update=True)
            if exam is None or exam.status != ExamStatus.OPEN.value:
                return None
            q = (
                select(ImageRecord)
                .where(ImageRecord.status == ImageStatus.SCORED,
                       ImageRecord.study_uid == exam.study_uid)
                .order_by(ImageRecord.id)
            )
            images = one_per_instance([r for r in s.scalars(q) if r.score is not None])
            if not images:  # cannot happen through join_exams; do not loop on it
                exam.status = ExamStatus.SCORED.value
                exam_event(s, exam.id, EventKind.EXAM_SKIPPED, "no scored image")
                return None
            result = score_exam(((r.laterality, float(r.score)) for r in images), meta.aggregation)
            seq = exam.scorings + 1
            planned = document_path(self.outbox, exam.study_uid, seq)
            row = ExamResult(
                exam_id=exam.id,
                seq=seq,
                scored_at=self.clock(),
                patient_id=exam.patient_id,
                study_uid=exam.study_uid,
                n_images=result.n_images,
                score=result.score,
                label=label_for(result.score, meta, self.point.threshold),
                threshold=self.point.threshold,
                threshold_rule=self.point.rule or None,
                model_version=meta.model_version,
                breast_rule=meta.aggregation["breast"],
                exam_rule=meta.aggregation["exam"],
                image_ids=json.dumps([r.id for r in images]),
                outbox_path=path_to_db(planned),
            )
            s.add(row)
            s.flush()
            for b in result.breasts:
                s.add(
                    BreastResult(
                        exam_result_id=row.id,
                        laterality=b.laterality,
                        n_images=b.n_images,
                        score=b.score,
                        label=label_for(b.score, meta, self.point.threshold),
                    )
                )
            if self.on_scored is not None:
                self.on_scored(s, row, images)
            exam.scorings = seq
            exam.status = ExamStatus.SCORED.value
            exam_event(s, exam.id, EventKind.EXAM_SCORED,
                        f"seq={seq} n={result.n_images} score={row.score:.4f}")
            scoring = ExamScoring(
                exam.id, row.id, seq, exam.study_uid, row.score, row.label, planned
            )
        log.info(
            "exam scored exam=%d study=%s seq=%d images=%d score=%.4f label=%s",
            scoring.exam_id,
            scoring.study_uid,
            seq,
            result.n_images,
            scoring.score,
            scoring.label,
        )
        return scoring
