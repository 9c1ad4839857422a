"""Breast and exam results: image scores aggregated per breast, breast scores per exam.

An exam is a study: all images with the same Study Instance UID (from the DICOM header, the
sidecar CSV or the file-name pattern). An image without one belongs to no exam and is listed
at image level only: an exam result nobody can attach to a patient's study would be of no use
downstream, and a plain inbox without identity keeps working exactly as before. Only `scored`
images count: duplicates and quarantined files never enter a breast or an exam, and a DICOM
instance received twice with different bytes (same SOP Instance UID) counts once, as its
latest copy.

An exam's life, each step committed before the next touches the disk:

    open --(study quiet for study_settle_seconds)--> scored: an `exam_results` row with its
         `breast_results`, and the outbox document's planned path
         --> outbox document written (temp name, fsync, hard link), `outbox_written_at` set
    scored --(a later image of the study is scored)--> open again (event `exam_reopened`); its
         next scoring is a new `exam_results` row and a new document, the earlier ones stay.

A crash after the commit and before the document is written is finished by the next step
(`write_owed_documents`). Rules: the breast score is the `breast` rule (mean or max, from the
model's metadata) over its images; the exam score the `exam` rule over its breasts. Images of
unknown laterality count in the exam, not in a breast: together they form one extra group,
aggregated by the breast rule, that enters the exam rule like a breast. Labels use the model's
threshold at every level.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import logging
import os
import re
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import bindparam, func, insert, select, update
from sqlalchemy.orm import Session

from worker.records.clock import utcnow
from worker.records.models import BreastResult, Event, Exam, ExamResult, ImageRecord
from worker.records.paths import display_name, path_from_db, path_to_db
from worker.records.store import EventKind, ExamStatus, ImageStatus, Store, event_row
from worker.scoring.model_metadata import ModelMetadata

log = logging.getLogger("mammo_screen")

SCHEMA_ID = "mammo-screen/exam-result/1"
LATERALITIES = ("L", "R")
BREAST_COLUMNS = ("patient_id", "study_uid", "laterality", "n_images", "score", "label")
EXAM_COLUMNS = ("patient_id", "study_uid", "n_images", "score", "label")


# ---- aggregation (pure) --------------------------------------------------------------------


def aggregate(scores: Iterable[float], rule: str) -> float:
    values = list(scores)
    if not values:
        raise ValueError("nothing to aggregate")
    if rule == "mean":
        return sum(values) / len(values)
    if rule == "max":
        return max(values)
    raise ValueError(f"unknown aggregation rule {rule!r}")


@dataclass(frozen=True)
class BreastScore:
    laterality: str
    n_images: int
    score: float


@dataclass(frozen=True)
class ExamScore:
    n_images: int
    score: float
    breasts: tuple[BreastScore, ...]


def score_exam(
    images: Iterable[tuple[str | None, float]], aggregation: dict[str, str]
) -> ExamScore:
    """(laterality, score) per image -> breast scores and the exam score."""
    groups: dict[str | None, list[float]] = {}
    for laterality, score in images:
        groups.setdefault(laterality if laterality in LATERALITIES else None, []).append(score)
    if not groups:
        raise ValueError("an exam needs at least one scored image")
    breasts = tuple(
        BreastScore(lat, len(groups[lat]), aggregate(groups[lat], aggregation["breast"]))
        for lat in LATERALITIES
        if lat in groups
    )
    parts = [b.score for b in breasts]
    if None in groups:  # unknown side: counts in the exam, in no breast
        parts.append(aggregate(groups[None], aggregation["breast"]))
    return ExamScore(
        n_images=sum(len(v) for v in groups.values()),
        score=aggregate(parts, aggregation["exam"]),
        breasts=breasts,
    )


def label_for(score: float, metadata: ModelMetadata, threshold: float) -> str:
    benign, malignant = metadata.class_names
    return malignant if score >= threshold else benign


# ---- joining an exam (called by the pipeline, inside its decision transaction) ------------


def _exam_event(s: Session, exam_id: int, kind: EventKind, detail: str | None = None) -> None:
    s.add(Event(image_id=None, exam_id=exam_id, kind=kind, detail=detail, at=utcnow()))


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


# ---- scoring settled exams and writing their outbox documents -----------------------------


def one_per_instance(images: list[ImageRecord]) -> list[ImageRecord]:
    """One image per SOP Instance UID, the latest received: a DICOM instance sent again with
    other bytes (re-encoded by a PACS, say) is the same image and must not count twice."""
    latest: dict[str, ImageRecord] = {}
    out = []
    for r in images:
        if r.sop_instance_uid is None:
            out.append(r)
        else:
            latest[r.sop_instance_uid] = r  # ordered by id: the last one wins
    return sorted(out + list(latest.values()), key=lambda r: r.id)


def _safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", text)[:64].lstrip(".") or "exam"


def _iso(value: dt.datetime | None) -> str | None:
    return None if value is None else value.isoformat() + "Z"


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
        with self.store.read() as s:
            return (
                s.scalar(
                    select(func.count())
                    .select_from(Exam)
                    .where(Exam.status == ExamStatus.OPEN.value)
                )
                or 0
            )

    def step(self, settle_now: bool = False) -> list[ExamScoring]:
        """Finish owed documents, then score every due exam and write its document."""
        self.write_owed_documents()
        out = []
        for exam_id in self.due(settle_now):
            scoring = self.score(exam_id)
            if scoring is not None:
                out.append(self._write_document(scoring))
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
                _exam_event(s, exam.id, EventKind.EXAM_SKIPPED, "no scored image")
                return None
            result = score_exam(((r.laterality, float(r.score)) for r in images), meta.aggregation)
            seq = exam.scorings + 1
            planned = self.outbox / f"{_safe_name(exam.study_uid)}.{seq:03d}.json"
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
            _exam_event(s, exam.id, EventKind.EXAM_SCORED,
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

    # ---- the outbox --------------------------------------------------------------------

    def write_owed_documents(self) -> int:
        with self.store.read() as s:
            owed = list(
                s.scalars(
                    select(ExamResult.id)
                    .where(ExamResult.outbox_written_at.is_(None))
                    .order_by(ExamResult.id)
                )
            )
        for result_id in owed:
            self._write(result_id)
        return len(owed)

    def _write_document(self, scoring: ExamScoring) -> ExamScoring:
        path = self._write(scoring.result_id)
        return dataclasses.replace(scoring, outbox_path=path)

    def _write(self, result_id: int) -> Path | None:
        """Write one result's document (built from the database alone, so a retry after a
        crash writes the same bytes) and record it. Never replaces a different file."""
        with self.store.read() as s:
            row = s.get(ExamResult, result_id)
            assert row is not None and row.outbox_path is not None
            doc = build_document(s, row)
        data = (json.dumps(doc, indent=2, ensure_ascii=False) + "\n").encode("utf-8")
        dest = path_from_db(row.outbox_path)
        try:
            dest = write_atomically(dest, data, alternative=f"r{result_id}")
        except OSError as exc:
            # Scores are committed; the document is owed and retried at the next step.
            log.error("outbox write failed file=%s error=%s (will retry)", dest, exc.strerror)
            return None
        with self.store.write() as s:
            fresh = s.get(ExamResult, result_id)
            assert fresh is not None
            fresh.outbox_path = path_to_db(dest)
            fresh.outbox_written_at = utcnow()
            _exam_event(s, fresh.exam_id, EventKind.OUTBOX_WRITTEN, display_name(dest.name))
        return dest


def write_atomically(dest: Path, data: bytes, alternative: str) -> Path:
    """Write `data` to `dest` by temp name + fsync + link; readers never see half a file.

    If `dest` already holds the same bytes (a retry after a crash, or another worker that
    wrote the same owed document first), that is success; if it holds something else, the
    document goes to `<stem>.<alternative>.json` instead: an existing document is never
    replaced. The temp file is linked to its name, which fails if the name exists, so of two
    workers racing on one document exactly one creates it (a rename would let the second
    replace the first, and a reader watching the folder would see the document twice).
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    for candidate in (dest, dest.with_name(f"{dest.stem}.{alternative}{dest.suffix}")):
        if _holds(candidate, data):
            return candidate
        if candidate.exists():
            continue
        # A dot-name: readers that skip hidden files never pick up a partial document.
        tmp = candidate.with_name(f".{candidate.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        if not publish(tmp, candidate):  # created meanwhile by another worker
            if _holds(candidate, data):
                return candidate
            continue
        dir_fd = os.open(candidate.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)  # make the new name itself durable
        finally:
            os.close(dir_fd)
        return candidate
    raise FileExistsError(f"outbox document exists with other content: {dest}")


def publish(tmp: Path, dest: Path) -> bool:
    """Give the finished file `tmp` the name `dest` unless that name exists (False then, and
    `dest` untouched); `tmp` is gone either way. A hard link fails on an existing name where
    a rename would replace it; file systems without hard links get the rename."""
    try:
        os.link(tmp, dest)
    except FileExistsError:
        tmp.unlink(missing_ok=True)
        return False
    except OSError:  # no hard links here (some network or FAT file systems)
        if dest.exists():
            tmp.unlink(missing_ok=True)
            return False
        os.replace(tmp, dest)
        return True
    tmp.unlink()
    return True


def _holds(path: Path, data: bytes) -> bool:
    try:
        return path.read_bytes() == data
    except OSError:
        return False


def build_document(s: Session, row: ExamResult) -> dict[str, Any]:
    """The outbox document of one exam scoring (schema `mammo-screen/exam-result/1`)."""
    ids = json.loads(row.image_ids)
    images = list(s.scalars(select(ImageRecord).where(ImageRecord.id.in_(ids))))
    images.sort(key=lambda r: r.id)
    breasts = list(
        s.scalars(
            select(BreastResult)
            .where(BreastResult.exam_result_id == row.id)
            .order_by(BreastResult.laterality)
        )
    )
    previous = None
    if row.seq > 1:
        prev = s.scalars(
            select(ExamResult)
            .where(ExamResult.exam_id == row.exam_id, ExamResult.seq < row.seq)
            .order_by(ExamResult.seq.desc())
        ).first()
        if prev is not None and prev.outbox_path is not None:
            previous = path_from_db(prev.outbox_path).name
    return {
        "schema": SCHEMA_ID,
        "exam_id": row.exam_id,
        "seq": row.seq,
        "supersedes": previous,
        "patient_id": row.patient_id,
        "study_uid": row.study_uid,
        "scored_at": _iso(row.scored_at),
        "model": {
            "version": row.model_version,
            "threshold": row.threshold,
            "threshold_rule": row.threshold_rule,
            "aggregation": {"breast": row.breast_rule, "exam": row.exam_rule},
        },
        "n_images": row.n_images,
        "score": row.score,
        "label": row.label,
        "breasts": [
            {"laterality": b.laterality, "n_images": b.n_images, "score": b.score, "label": b.label}
            for b in breasts
        ],
        "images": [
            {
                "id": r.id,
                "filename": r.filename,
                "sha256": r.sha256,
                "sop_instance_uid": r.sop_instance_uid,
                "laterality": r.laterality,
                "view": r.view,
                "score": r.score,
                "label": r.label,
                "model_version": r.model_version,
                "received_at": _iso(r.received_at),
                "scored_at": _iso(r.scored_at),
            }
            for r in images
        ],
    }


# ---- listing (screen results --level breast|exam) -----------------------------------------


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
                "scored_at": _iso(r.scored_at),
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
                "scored_at": _iso(by_id[b.exam_result_id].scored_at),
            }
            for b in breasts
        ]
