"""Receipt: a file's row is in the database, claimed for this worker, before anything else
happens to it.

For a batch, in one transaction: every file's unfinished row is found (a restart) or a new
`received` one inserted, claimed for this worker (:mod:`worker.processing.claims`), its
attempts counted, and the original of each undecided one looked up, so that a copy is
decided as a duplicate. The receipts of all workers on a database take turns on an advisory
lock, so a copy always finds its original, whoever handles each.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from sqlalchemy import bindparam, insert, select
from sqlalchemy.orm import Session

from worker.config import Config
from worker.processing.claims import Claims
from worker.processing.decision import Decider, Decision
from worker.processing.placement import IMAGES
from worker.records.clock import utcnow
from worker.records.models import ImageRecord
from worker.records.paths import display_name, path_to_db
from worker.records.store import (
    FILES_LOCK,
    FINAL_STATUSES,
    EventKind,
    ImageStatus,
    Store,
    event_row,
    insert_events,
)

log = logging.getLogger("mammo_screen")

# The statements run for every batch, built once: lists are bound as expanding parameters.
_UNFINISHED = select(ImageRecord).where(
    ImageRecord.source_path.in_(bindparam("sources", expanding=True)),
    ImageRecord.moved_at.is_(None),
)
# Ids must follow the batch's order (receipt order decides which copy is the original).
# sort_by_parameter_order makes SQLAlchemy guarantee it on every backend: on PostgreSQL its
# multi-row INSERT becomes INSERT .. SELECT .. ORDER BY, which takes serial values in order.
_INSERT_IMAGES = insert(IMAGES).returning(IMAGES.c.id, sort_by_parameter_order=True)
_SAME_CONTENT = (
    select(ImageRecord.id, ImageRecord.sha256)
    .where(
        ImageRecord.sha256.in_(bindparam("digests", expanding=True)),
        ImageRecord.status.in_((ImageStatus.SCORED, ImageStatus.RECEIVED, ImageStatus.QUARANTINED)),
    )
    .order_by(ImageRecord.id)
)

# A file of a batch as read: (path, sha256, size).
ReadFile = tuple[Path, str, int]
# A row's key among the unfinished ones: (source path, content).
_Key = tuple[str, str | None]


def relative_name(path: Path, inbox: Path) -> str:
    try:
        return display_name(path.relative_to(inbox).as_posix())
    except ValueError:
        return display_name(path.name)


class Receipt:
    def __init__(self, config: Config, store: Store, claims: Claims, decider: Decider) -> None:
        self.config = config
        self.store = store
        self.claims = claims
        self.decider = decider

    def receive_batch(
        self, files: list[ReadFile]
    ) -> tuple[list[ImageRecord | None], dict[int, int | None]]:
        """For each (path, sha256, size), in one transaction: find the file's unfinished row
        (a restart) or insert a new `received` one, and claim it for this worker. Returns
        the rows, and the original of each undecided one (see :func:`_originals_in`), read
        in the same transaction.

        None for a file that another live worker has claimed, or that a worker moved away
        after this one read it. The receipts of all workers on a database take turns (an
        advisory lock on PostgreSQL, BEGIN IMMEDIATE on SQLite), so two workers never both
        insert a row for one file, and a copy received after its original finds it.
        """
        with self.store.write() as s:
            self.store.serialise(s, FILES_LOCK)
            # The batch's unfinished rows in one query (at most one per path and content: the
            # partial unique index), and in one more, which of them this worker may handle.
            sources = [path_to_db(path) for path, _, _ in files]
            unfinished = _unfinished(s, sources)
            mine = set(
                s.scalars(
                    select(ImageRecord.id).where(
                        ImageRecord.id.in_([r.id for r in unfinished.values()]),
                        self.claims.claimable(),
                    )
                )
            ) if unfinished else set()
            new, keys = self._new_rows(files, sources, unfinished, mine)
            fresh = {(r["source_path"], r["sha256"]) for r in new}
            if new:
                # Inserted in the batch's order (their ids follow it), then the rows read
                # back with their ids.
                s.execute(_INSERT_IMAGES, new)
                unfinished = _unfinished(s, sources)
            rows = [None if key is None else unfinished[key] for key in keys]
            events = self._received(rows, keys, files, fresh)
            s.flush()
            insert_events(s, events)
            originals = _originals_in(
                s, [r for r in rows if r is not None and r.status not in FINAL_STATUSES]
            )
            for maybe in rows:
                if maybe is not None:
                    s.expunge(maybe)
        return rows, originals

    def _new_rows(
        self, files: list[ReadFile], sources: list[str], unfinished: dict[_Key, ImageRecord],
        mine: set[int],
    ) -> tuple[list[dict[str, Any]], list[_Key | None]]:
        """The rows to insert for files that have none, and each file's key (None: not this
        worker's to handle)."""
        new: list[dict[str, Any]] = []
        keys: list[_Key | None] = []
        for (path, digest, size), source in zip(files, sources, strict=True):
            row = unfinished.get((source, digest))
            if row is not None and row.id not in mine:
                keys.append(None)  # another live worker's: it decides and moves it
                continue
            if row is None and not path.exists():
                # Moved away (by another worker) since it was read: its row is final.
                keys.append(None)
                continue
            if row is None:
                # Its first attempt, counted here rather than updated after the insert.
                new.append({
                    "filename": relative_name(path, self.config.inbox),
                    "source_path": source,
                    "sha256": digest,
                    "size_bytes": size,
                    "status": ImageStatus.RECEIVED,
                    "received_at": utcnow(),
                    "attempts": 1,
                    "claimed_by": self.claims.worker_id,
                })
            keys.append((source, digest))
        return new, keys

    def _received(
        self, rows: list[ImageRecord | None], keys: list[_Key | None], files: list[ReadFile],
        fresh: set[_Key],
    ) -> list[dict[str, Any]]:
        """Claim each row found again and count its attempt (rows of the caller's
        transaction); returns the receipt's events.

        Each receipt of an undecided row counts an attempt: a file that crashes the worker
        every time (a decoder bug) is quarantined after max_attempts instead of looping."""
        events: list[dict[str, Any]] = []
        for maybe, key, (_, _, size) in zip(rows, keys, files, strict=True):
            if maybe is None:
                continue
            row = maybe
            if key in fresh:
                events.append(event_row(EventKind.RECEIVED, f"{size} bytes", image_id=row.id))
                continue  # unclaimed before, and its attempt counted
            self.claims.claim(row, events)
            if row.status == ImageStatus.RECEIVED:
                row.attempts += 1
                if row.attempts > 1:
                    events.append(
                        event_row(EventKind.RETRY, f"attempt {row.attempts}", image_id=row.id)
                    )
                if row.attempts > self.config.max_attempts:
                    self.decider.decide(row, events, Decision(
                        ImageStatus.QUARANTINED,
                        error=f"gave up after {row.attempts - 1} attempts "
                        f"(last: {row.error or 'worker stopped while handling it'})",
                    ))
        return events

    def receive_unreadable(self, path: Path, exc: OSError, attempts: int) -> int:
        """A file that cannot even be read: its row recorded without a hash and decided
        quarantined, in one transaction; returns its id (the move is the caller's)."""
        with self.store.write() as s:
            row = ImageRecord(
                filename=relative_name(path, self.config.inbox),
                source_path=path_to_db(path),
                sha256=None,
                size_bytes=None,
                status=ImageStatus.RECEIVED,
                attempts=attempts,
                received_at=utcnow(),
                claimed_by=self.claims.worker_id,
            )
            s.add(row)
            s.flush()
            events: list[dict[str, Any]] = []
            self.decider.decide(row, events, Decision(
                ImageStatus.QUARANTINED,
                error=f"unreadable after {attempts} attempts: {exc.strerror}",
            ))
            insert_events(s, events)
            return row.id


def _unfinished(s: Session, sources: list[str]) -> dict[_Key, ImageRecord]:
    """The unfinished rows of these inbox paths, by (path, content): at most one each
    (the partial unique index)."""
    return {
        (r.source_path, r.sha256): r
        for r in s.scalars(_UNFINISHED, {"sources": sources})
    }


def _originals_in(s: Session, records: list[ImageRecord]) -> dict[int, int | None]:
    """For each record, the id of the earliest other row with the same content (scored,
    pending or quarantined) received before it, or None; one query for them all."""
    if not records:
        return {}
    earlier: dict[str, list[int]] = {}
    for rid, digest in s.execute(
        _SAME_CONTENT, {"digests": list({r.sha256 for r in records})}
    ):
        earlier.setdefault(digest, []).append(rid)
    return {
        r.id: next((i for i in earlier.get(r.sha256 or "", []) if i < r.id), None)
        for r in records
    }
