"""Placement: each decided file moved to its planned destination, then the moves recorded;
and reconciliation of the moves that a crash or a full disk left owed.

A decision's destination is committed before the file moves, and a batch's moves are
committed together after them. A crash in between leaves the moves owed: :meth:`reconcile`
finds each file gone from the inbox and at its destination, and records it as moved. A file
is read once: before its move, its stat fingerprint says whether it is still what was read,
and only a changed file is hashed again.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any, NamedTuple

from sqlalchemy import Row, bindparam, select, update

from worker.faults import crash_point
from worker.processing.claims import Claims
from worker.processing.reading import Fingerprint, fingerprint, stream_sha256
from worker.records.clock import utcnow
from worker.records.models import ImageRecord
from worker.records.paths import display_name, path_from_db
from worker.records.store import FINAL_STATUSES, EventKind, Store, event_row, insert_events

log = logging.getLogger("mammo_screen")

IMAGES = ImageRecord.__table__

# The statements run for every batch, built once (building and keying a statement costs
# about as much CPU as SQLite takes to run it): lists are bound as expanding parameters.
_MOVE_COLUMNS = (
    "id", "filename", "status", "score", "label", "error", "sha256", "final_path", "claimed_by",
)
# The columns a move needs.
FOR_MOVE = select(*(IMAGES.c[key] for key in _MOVE_COLUMNS)).where(
    IMAGES.c.id.in_(bindparam("ids", expanding=True))
)
_LOCK_FOR_MOVE = (
    select(IMAGES.c.id, IMAGES.c.moved_at)
    .where(IMAGES.c.id.in_(bindparam("ids", expanding=True)))
    .order_by(IMAGES.c.id)
    .with_for_update()
)
UPDATE_IMAGE = update(IMAGES).where(IMAGES.c.id == bindparam("b_id"))


class Placement(StrEnum):
    """What became of a decided file at its move (its event kind has the same name)."""

    MOVED = "moved"  # at its destination (moved now, or found there after a crash)
    REPLACED = "replaced"  # changed in the inbox after it was read: left for the scan
    MISSING = "missing"  # gone from the inbox and not at its destination

    @property
    def event_kind(self) -> EventKind:
        return EventKind(self.value)


_NOT_MOVED_DETAIL = {
    Placement.REPLACED: "file changed in the inbox before it could be moved",
    Placement.MISSING: "file gone before it could be moved",
}


@dataclass
class BatchFile:
    path: Path
    record_id: int
    fingerprint: Fingerprint | None  # at read time; None: unknown, hash again before moving


@dataclass(frozen=True)
class FileResult:
    """What happened to one file in a batch (for callers and tests; the DB is the record)."""

    path: Path
    record_id: int | None
    status: str
    score: float | None = None
    label: str | None = None
    error: str | None = None


class _Placed(NamedTuple):
    placement: Placement
    dest: Path


class Placer:
    def __init__(self, store: Store, claims: Claims) -> None:
        self.store = store
        self.claims = claims
        # Files read and hashed a second time before their move (their stat changed, or
        # their read was before a restart): the replaced-file check, counted.
        self.rehashed = 0

    def move_batch(
        self, files: list[BatchFile], rows: dict[int, Row[Any]] | None = None
    ) -> list[FileResult]:
        """Move each decided file to its planned destination, then record all the moves in
        one transaction. A crash in between leaves the moves owed (see :meth:`reconcile`).
        `rows`: the files' rows as committed (from the decisions' commit), or None to read
        them."""
        if rows is None:
            with self.store.read() as s:  # the columns needed, without ORM objects
                rows = {
                    r.id: r
                    for r in s.execute(FOR_MOVE, {"ids": [f.record_id for f in files]})
                }
        results: list[FileResult] = []
        placed: dict[int, _Placed] = {}
        for f in files:
            row = rows[f.record_id]
            results.append(FileResult(f.path, row.id, row.status, row.score, row.label, row.error))
            if row.status not in FINAL_STATUSES or row.final_path is None:
                continue
            if row.claimed_by != self.claims.worker_id:
                continue  # taken over by another worker: its move, not ours
            dest = path_from_db(row.final_path)
            try:
                placed[row.id] = _Placed(self.place(f, row.sha256, dest), dest)
            except OSError as exc:
                # The decision is committed; the move is owed and retried by reconcile().
                level = log.error if exc.errno == errno.ENOSPC else log.warning
                level(
                    "move failed file=%s id=%d error=%s (will retry)",
                    row.filename,
                    row.id,
                    exc.strerror,
                )
        if not placed:
            return results
        self._record(placed)
        for rid, (placement, _) in placed.items():
            if placement != Placement.MOVED:
                log.warning("%s file=%s id=%d (not moved)", placement, rows[rid].filename, rid)
        return results

    def _record(self, placed: dict[int, _Placed]) -> None:
        """Commit the moves (and the files found not movable) in one transaction."""
        moved_at = utcnow()
        with self.store.write() as s:
            # The rows locked (PostgreSQL) and read in one query: one already moved (by a
            # worker that took it over meanwhile) is left as it is.
            owed = [
                rid
                for rid, done in s.execute(_LOCK_FOR_MOVE, {"ids": list(placed)})
                if done is None
            ]
            moved = [rid for rid in owed if placed[rid].placement == Placement.MOVED]
            lost = [rid for rid in owed if placed[rid].placement != Placement.MOVED]
            if moved:
                s.execute(UPDATE_IMAGE, [{"b_id": rid, "moved_at": moved_at} for rid in moved])
            if lost:  # nothing at the destination: no final path
                s.execute(
                    UPDATE_IMAGE,
                    [{"b_id": rid, "moved_at": moved_at, "final_path": None} for rid in lost],
                )
            insert_events(s, [_move_event(rid, *placed[rid]) for rid in owed])

    def place(self, f: BatchFile, sha256: str | None, dest: Path) -> Placement:
        """Move one file, and say what happened."""
        if (f.path.exists() and sha256 is not None and not self._unchanged(f, sha256)
                and f.path.exists()):
            # Replaced under us after it was read: the new content is a new file, which
            # the scan will find; the old content is gone, so there is nothing to move.
            # (Gone by now instead: moved by a worker that took over; see below.)
            return Placement.REPLACED
        if f.path.exists():
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(str(f.path), str(dest))
            crash_point("after_move")
            return Placement.MOVED
        return Placement.MOVED if dest.exists() else Placement.MISSING

    def _unchanged(self, f: BatchFile, sha256: str) -> bool:
        """Whether the file still holds the content that was read and decided on. Its stat
        fingerprint (device, inode, size, mtime, ctime) unchanged since the read says so
        without reading it again; otherwise, or when no fingerprint is known (after a
        restart), the file is read and hashed again (counted in `rehashed`)."""
        if f.fingerprint is not None:
            try:
                if fingerprint(os.stat(f.path)) == f.fingerprint:
                    return True
            except OSError:
                return False
        self.rehashed += 1
        try:
            return stream_sha256(f.path)[0] == sha256
        except OSError:
            return False

    def reconcile(self) -> int:
        """Finish the moves that a crash or a full disk left owed: this worker's, unclaimed
        ones, and those of workers whose lease has run out (claimed here first; rows another
        worker is claiming at this moment are skipped). Returns how many."""
        with self.store.read() as s:  # the usual case, nothing owed: no write transaction
            if s.scalar(
                select(ImageRecord.id).where(
                    ImageRecord.moved_at.is_(None), ImageRecord.status.in_(FINAL_STATUSES)
                ).limit(1)
            ) is None:
                return 0
        with self.store.write() as s:
            owed = list(
                s.scalars(
                    select(ImageRecord)
                    .where(
                        ImageRecord.moved_at.is_(None),
                        ImageRecord.status.in_(FINAL_STATUSES),
                        self.claims.claimable(),
                    )
                    .with_for_update(skip_locked=True)
                )
            )
            # Another worker's file is taken over only if it is visible here (its inbox path
            # or its destination): with a local inbox per machine, another machine's owed
            # move is not this worker's to record as missing.
            worker_id = self.claims.worker_id
            owed = [r for r in owed if r.claimed_by in (None, worker_id) or _visible(r)]
            events: list[dict[str, Any]] = []
            for row in owed:
                self.claims.claim(row, events)
            insert_events(s, events)
        if owed:
            self.move_batch([BatchFile(path_from_db(r.source_path), r.id, None) for r in owed])
            log.info("reconciled moves=%d", len(owed))
        return len(owed)


def _move_event(rid: int, placement: Placement, dest: Path) -> dict[str, Any]:
    detail = display_name(dest) if placement == Placement.MOVED else _NOT_MOVED_DETAIL[placement]
    return event_row(placement.event_kind, detail, image_id=rid)


def _visible(row: ImageRecord) -> bool:
    """Whether this machine sees the row's file, in the inbox or at its destination."""
    return path_from_db(row.source_path).exists() or (
        row.final_path is not None and path_from_db(row.final_path).exists()
    )
