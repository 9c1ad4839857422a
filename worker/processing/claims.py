"""Claims: which worker handles a file when several share one inbox (PostgreSQL).

The receipt claims each file's row for this worker (`claimed_by`); a file claimed by another
live worker is left to it; only the claimer decides and moves a file; a worker whose heartbeat
is older than the lease loses its claims to the next worker that meets its files.
"""

from __future__ import annotations

import datetime as dt
import logging
from typing import Any

from sqlalchemy import ColumnElement, or_, select

from worker.config import Config
from worker.records.clock import utcnow
from worker.records.models import ImageRecord, WorkerRecord
from worker.records.store import EventKind, event_row

log = logging.getLogger("mammo_screen")


class Claims:
    """This worker's side of the claims. `worker_id` is its id in `workers`, set once its
    heartbeat has started (None until then, and with a single worker's tests)."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.worker_id: int | None = None

    def claimable(self) -> ColumnElement[bool]:
        """Rows this worker may handle: unclaimed, its own, or claimed by a worker that has
        stopped or whose last beat is older than the lease (heartbeat_stale_seconds): a
        worker killed mid-batch has its claims taken over once its lease runs out."""
        cutoff = utcnow() - dt.timedelta(seconds=self.config.heartbeat_stale_seconds)
        dead = select(WorkerRecord.id).where(
            or_(WorkerRecord.stopped_at.is_not(None), WorkerRecord.last_beat_at < cutoff)
        )
        return or_(
            ImageRecord.claimed_by.is_(None),
            ImageRecord.claimed_by == self.worker_id,
            ImageRecord.claimed_by.in_(dead),
        )

    def claim(self, row: ImageRecord, events: list[dict[str, Any]]) -> None:
        """Claim a row of the caller's transaction for this worker; taking it over from
        another worker is an event."""
        if row.claimed_by not in (None, self.worker_id):
            events.append(event_row(
                EventKind.TAKEN_OVER, f"from worker {row.claimed_by} (lease expired)",
                image_id=row.id
            ))
            log.warning("taken over id=%d from worker=%s", row.id, row.claimed_by)
        row.claimed_by = self.worker_id
