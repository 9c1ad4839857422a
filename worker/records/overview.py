"""What the database says about a site at a glance (`screen status`): files by status, the last
one received, rows whose file has not yet left the inbox, exams by status, the queue of results
for a PACS and the running workers."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import func, select

from worker.records.clock import iso
from worker.records.heartbeat import running_workers
from worker.records.models import Exam, ImageRecord
from worker.records.pacs_queue import queue_summary
from worker.records.store import Store


@dataclass(frozen=True)
class Overview:
    counts: dict[str, int]  # images by status
    last_received: str | None  # ISO time of the newest image row
    unfinished_rows: int  # rows whose file has not yet left the inbox (moved_at empty)
    exams: dict[str, int]  # open (waiting for their study to settle) and scored
    send: dict[str, Any]  # the PACS queue (pacs_queue.queue_summary)
    workers: list[dict[str, Any]]  # not stopped, each live or stale (heartbeat.running_workers)


def overview(store: Store, stale_after_seconds: float) -> Overview:
    workers = running_workers(store, stale_after_seconds)
    counts = store.counts_by_status()
    with store.read() as s:
        last = s.scalar(select(func.max(ImageRecord.received_at)))
        owed = s.scalar(
            select(func.count()).select_from(ImageRecord).where(ImageRecord.moved_at.is_(None))
        )
        exams = {
            status: n
            for status, n in s.execute(select(Exam.status, func.count()).group_by(Exam.status))
        }
        send = queue_summary(s)
    return Overview(counts, iso(last), owed or 0, exams, send, workers)
