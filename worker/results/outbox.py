"""The outbox: one JSON document per exam scoring (schema `mammo-screen/exam-result/1`).

A document is planned (`document_path`, recorded as `exam_results.outbox_path`) in the
transaction that records the scoring, and written after it (`write_document`): built from the
database alone, so that a retry after a crash writes the same bytes, and written durably
(worker/records/durable.py), never replacing a different file. `outbox_written_at` and the
event `outbox_written` record it once it is in place; a document still owed is written by the
next step (`write_owed_documents`).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from worker.records.clock import iso, utcnow
from worker.records.durable import write_atomically
from worker.records.models import BreastResult, ExamResult, ImageRecord
from worker.records.paths import display_name, path_from_db, path_to_db, safe_stem
from worker.records.store import EventKind, Store, exam_event

log = logging.getLogger("mammo_screen")

SCHEMA_ID = "mammo-screen/exam-result/1"


def document_path(outbox: Path, study_uid: str, seq: int) -> Path:
    """Where the document of an exam's `seq`-th scoring is planned."""
    return outbox / f"{safe_stem(study_uid, 'exam')}.{seq:03d}.json"


def write_owed_documents(store: Store) -> int:
    """Write every planned document not yet written (after a crash, or a failed write)."""
    with store.read() as s:
        owed = list(
            s.scalars(
                select(ExamResult.id)
                .where(ExamResult.outbox_written_at.is_(None))
                .order_by(ExamResult.id)
            )
        )
    for result_id in owed:
        write_document(store, result_id)
    return len(owed)


def write_document(store: Store, result_id: int) -> Path | None:
    """Write one result's document and record it; None when the write failed (it stays owed).
    Never replaces a different file."""
    with store.read() as s:
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
    with store.write() as s:
        fresh = s.get(ExamResult, result_id)
        assert fresh is not None
        fresh.outbox_path = path_to_db(dest)
        fresh.outbox_written_at = utcnow()
        exam_event(s, fresh.exam_id, EventKind.OUTBOX_WRITTEN, display_name(dest.name))
    return dest


def images_of(s: Session, result: ExamResult) -> list[ImageRecord]:
    """The images one exam scoring combined, in id order."""
    ids = json.loads(result.image_ids)
    images = list(s.scalars(select(ImageRecord).where(ImageRecord.id.in_(ids))))
    images.sort(key=lambda r: r.id)
    return images


def build_document(s: Session, row: ExamResult) -> dict[str, Any]:
    """The outbox document of one exam scoring (schema `mammo-screen/exam-result/1`)."""
    images = images_of(s, row)
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
        "scored_at": iso(row.scored_at),
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
                "received_at": iso(r.received_at),
                "scored_at": iso(r.scored_at),
            }
            for r in images
        ],
    }
