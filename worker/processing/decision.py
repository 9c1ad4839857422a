"""The decision: what becomes of a received file (scored, duplicate or quarantined, with its
reason), where it is to go, and the commit of a batch's decisions in one transaction.

A :class:`Decision` is made off the database (in the scoring thread, or at receipt for a
duplicate) and committed by the calling thread in batch order (:meth:`Decider.commit`), so a
duplicate always finds its original decided. The planned destination is committed with the
decision, before the file moves (:mod:`worker.processing.placement`).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import Row, bindparam, select
from sqlalchemy.orm import Session

from worker.config import Config
from worker.imaging.identity import Identity
from worker.processing.claims import Claims
from worker.processing.placement import FOR_MOVE, IMAGES, UPDATE_IMAGE
from worker.records.clock import utcnow
from worker.records.heatmaps import insert_heatmaps
from worker.records.models import ImageRecord
from worker.records.paths import path_from_db, path_to_db
from worker.records.store import (
    FILES_LOCK,
    FINAL_STATUSES,
    EventKind,
    ImageStatus,
    Store,
    event_row,
    insert_events,
)
from worker.results.exams import Joining, join_exams

log = logging.getLogger("mammo_screen")

# The columns a decision sets (the identity columns it brings along included).
DECIDED_COLUMNS = (
    "status", "score", "label", "threshold", "model_version", "scored_at", "error",
    "duplicate_of", "final_path", "patient_id", "study_uid", "laterality", "view",
    "sop_instance_uid",
)
# The columns a decision reads.
_DECISION_COLUMNS = ("id", "filename", "source_path", "claimed_by", *DECIDED_COLUMNS)
_FOR_DECISION = select(*(IMAGES.c[key] for key in _DECISION_COLUMNS)).where(
    IMAGES.c.id.in_(bindparam("ids", expanding=True))
)
# What a duplicate copies from its scored original.
_SCORE_COLUMNS = ("score", "label", "threshold", "model_version", "scored_at")


@dataclass(frozen=True)
class Decision:
    """One file's decision, not yet committed. A field left None leaves the row's column as
    it is (undecided rows have none of them set)."""

    status: ImageStatus
    score: float | None = None
    label: str | None = None
    threshold: float | None = None
    model_version: str | None = None
    scored_at: dt.datetime | None = None
    error: str | None = None
    duplicate_of: int | None = None  # a duplicate's original (its row id)
    # Who and which breast, recorded with the decision whatever it is (None: not read).
    identity: Identity | None = None
    # The attention map's `heatmaps` row, for a scored image of a model that has one.
    heatmap: dict[str, Any] | None = None

    def columns(self) -> dict[str, Any]:
        """The image columns this decision sets (the planned destination apart)."""
        out = {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(self)
            if f.name not in ("identity", "heatmap") and getattr(self, f.name) is not None
        }
        if self.identity is not None:
            out.update(self.identity.as_columns())
        return out


def _unique_destination(folder: Path, rel: Path, record_id: int) -> Path:
    dest = folder / rel
    if not dest.exists():
        return dest
    return dest.with_name(f"{dest.stem}.{record_id}{dest.suffix}")


class Decider:
    """Turns decisions into rows: on one row of a caller's transaction (:meth:`decide`), or a
    batch's in one transaction of their own (:meth:`commit`)."""

    def __init__(self, config: Config, store: Store, claims: Claims) -> None:
        self.config = config
        self.store = store
        self.claims = claims

    def decide(self, row: ImageRecord, events: list[dict[str, Any]], decision: Decision) -> None:
        """Set a final status and the planned destination on a row of the caller's
        transaction, and add its event to `events` (see :meth:`columns`)."""
        for key, value in self.columns(row, decision, events).items():
            setattr(row, key, value)

    def columns(
        self, row: ImageRecord | Row[Any], decision: Decision, events: list[dict[str, Any]]
    ) -> dict[str, Any]:
        """The columns of `row` once decided (every column in DECIDED_COLUMNS: the row's own
        value unless the decision sets it), planned destination included; adds the
        decision's event to `events` and logs it."""
        status = decision.status
        values = {key: getattr(row, key) for key in DECIDED_COLUMNS}
        values.update(decision.columns())
        folder = (self.config.quarantine if status == ImageStatus.QUARANTINED
                  else self.config.processed)
        rel = path_from_db(row.source_path)
        try:
            rel = rel.relative_to(self.config.inbox)
        except ValueError:
            rel = Path(rel.name)
        values["final_path"] = path_to_db(_unique_destination(folder, rel, row.id))
        score, label, error = values["score"], values["label"], values["error"]
        detail = (
            error
            if status == ImageStatus.QUARANTINED
            else (f"score={score:.4f} label={label}" if score is not None else None)
        )
        events.append(event_row(EventKind(status), detail, image_id=row.id))
        log_fn = log.warning if status == ImageStatus.QUARANTINED else log.info
        log_fn(
            "%s file=%s id=%d score=%s label=%s%s",
            status,
            row.filename,
            row.id,
            "-" if score is None else f"{score:.4f}",
            label or "-",
            f" reason={error}" if error else "",
        )
        return values

    def commit(
        self, decided: Mapping[int, Decision], then_read: list[int] | None = None
    ) -> dict[int, Row[Any]] | None:
        """Commit a batch's decisions in one transaction: the rows read in one query,
        updated in one UPDATE executed per row, their events inserted in one INSERT (in the
        order they happened: each decision, then the exam event it caused), scored images
        joined to their exams (worker/results/exams.py). Returns the rows `then_read` as the
        move needs them (see :meth:`worker.processing.placement.Placer.move_batch`), read at
        the end of the same transaction instead of in one more; None when there was nothing
        to decide."""
        if not decided:
            return None
        with self.store.write() as s:
            self.store.serialise(s, FILES_LOCK)
            # The columns needed, without ORM objects.
            rows = {
                r.id: r
                for r in s.execute(_FOR_DECISION, {"ids": list(decided)})
            }
            # Each row's columns once decided, by id: a duplicate copies its original's.
            updates: dict[int, dict[str, Any]] = {}
            events: dict[int, list[dict[str, Any]]] = {}
            joining: list[Joining] = []
            heatmaps: list[dict[str, Any]] = []
            # Originals first, so that a duplicate in the same batch can copy their result.
            for rid in sorted(decided):
                row, decision = rows[rid], decided[rid]
                if row.status in FINAL_STATUSES or row.claimed_by != self.claims.worker_id:
                    continue  # decided already, or taken over by another worker
                if decision.status == ImageStatus.DUPLICATE:
                    assert decision.duplicate_of is not None
                    decision = self._as_its_original(
                        decision, self._original(s, rows, updates, decision.duplicate_of))
                values = updates[rid] = self.columns(row, decision, events.setdefault(rid, []))
                if decision.status == ImageStatus.SCORED and decision.heatmap is not None:
                    heatmaps.append(decision.heatmap)
                # A scored image joins its exam in the same commit as its score.
                if decision.status == ImageStatus.SCORED and values["study_uid"] is not None:
                    joining.append(Joining(rid, values["study_uid"], values["patient_id"]))
            if updates:
                s.execute(
                    UPDATE_IMAGE, [{"b_id": rid, **values} for rid, values in updates.items()]
                )
                insert_heatmaps(s, heatmaps)
                for rid, event in join_exams(s, joining, utcnow()).items():
                    events[rid].append(event)
                insert_events(s, [e for rid in updates for e in events[rid]])
            if then_read is None:
                return None
            return {r.id: r for r in s.execute(FOR_MOVE, {"ids": then_read})}

    @staticmethod
    def _as_its_original(decision: Decision, original: Mapping[str, Any] | None) -> Decision:
        """A duplicate's decision completed from its original: quarantined with it, or
        carrying its score."""
        if original is not None and original["status"] == ImageStatus.QUARANTINED:
            return dataclasses.replace(
                decision, status=ImageStatus.QUARANTINED,
                error=f"duplicate of #{original['id']}, quarantined: {original['error']}",
            )
        if original is not None and original["status"] == ImageStatus.SCORED:
            return dataclasses.replace(
                decision, **{key: original[key] for key in _SCORE_COLUMNS})
        return decision

    @staticmethod
    def _original(
        s: Session, rows: dict[int, Row[Any]], updates: dict[int, dict[str, Any]],
        rid: int,
    ) -> dict[str, Any] | None:
        """A duplicate's original as committed by this transaction: decided just now (its
        new columns), or its row as read."""
        if rid in updates:
            return {"id": rid, **updates[rid]}
        row = rows.get(rid) or s.execute(_FOR_DECISION, {"ids": [rid]}).first()
        if row is None:
            return None
        return {"id": rid, **{key: getattr(row, key) for key in DECIDED_COLUMNS}}
