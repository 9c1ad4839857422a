"""Worker heartbeats: which workers run, where, and which model each one serves.

Every `screen watch` and `screen process` holds one row in the `workers` table from the moment
it holds the inbox lock. The worker's loop calls `Heartbeat.beat()` on every pass; it writes at
most once per `heartbeat_seconds`, so the per-file path gains no database writes. A clean exit
marks the row stopped. A killed or hung worker stops beating, and `screen status` calls it
stale once its last beat is older than `heartbeat_stale_seconds`. With SQLite, a new worker that
takes the inbox lock closes the rows still open for that inbox: the lock proves their owners are
gone. With PostgreSQL (several workers, no inbox lock) it closes only those whose last beat is
older than `heartbeat_stale_seconds`: that is also the lease of their claims on files
(worker/processing/claims.py), which other workers then take over.

The beat comes from the loop, not from a timer thread, so that a worker whose loop is stuck
stops beating too.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from enum import StrEnum
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.exc import OperationalError

from worker.config import Config
from worker.records.clock import iso, utcnow
from worker.records.models import WorkerRecord
from worker.records.paths import path_to_db
from worker.records.store import Store

log = logging.getLogger("mammo_screen")


class WorkerState(StrEnum):
    LIVE = "live"
    STALE = "stale"  # no beat for heartbeat_stale_seconds: killed, hung, or its machine is down
    STOPPED = "stopped"


class Heartbeat:
    """The running worker's row: `start()` once the inbox lock is held, `beat()` from the
    loop, `stop()` on the way out."""

    def __init__(
        self,
        store: Store,
        config: Config,
        model_path: str,
        model_version: str,
        command: str,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.store = store
        self.config = config
        self.model_path = model_path
        self.model_version = model_version
        self.command = command
        self.clock = clock
        self.worker_id: int | None = None
        self._last = 0.0
        # Told the new worker id once the row exists (the pipeline claims files under it).
        self.on_start: Callable[[int], None] = lambda _id: None

    def start(self) -> int:
        inbox = path_to_db(self.config.inbox)
        now = utcnow()
        with self.store.write() as s:
            record = WorkerRecord(
                pid=os.getpid(),
                host=socket.gethostname(),
                command=self.command,
                inbox=inbox,
                model_path=self.model_path,
                model_version=self.model_version,
                config_path=None if self.config.source is None else str(self.config.source),
                beat_seconds=self.config.heartbeat_seconds,
                started_at=now,
                last_beat_at=now,
            )
            s.add(record)
            s.flush()
            gone = [
                WorkerRecord.inbox == inbox,
                WorkerRecord.stopped_at.is_(None),
                WorkerRecord.id != record.id,
            ]
            if not self.store.is_sqlite:
                # No inbox lock: other workers share it. Only those whose lease has run out
                # are gone (their claims are taken over: worker/processing/claims.py).
                cutoff = now - dt.timedelta(seconds=self.config.heartbeat_stale_seconds)
                gone.append(WorkerRecord.last_beat_at < cutoff)
            # With SQLite we hold the inbox lock: whoever left these rows open is gone.
            s.execute(
                update(WorkerRecord)
                .where(*gone)
                .values(stopped_at=now, stop_reason=f"gone (worker {record.id} took the inbox)")
            )
            self.worker_id = record.id
        self.on_start(record.id)
        self._last = self.clock()
        log.info("worker id=%d model=%s", self.worker_id, self.model_version)
        return self.worker_id

    @contextmanager
    def running(self) -> Iterator[Heartbeat]:
        """The row for the duration of the block, marked stopped however the block ends."""
        self.start()
        try:
            yield self
        except BaseException as exc:
            self.stop(f"exited with an error ({type(exc).__name__})")
            raise
        self.stop()

    def beat(self) -> None:
        """Record that the loop is alive, at most once per heartbeat_seconds."""
        if self.worker_id is None or self.clock() - self._last < self.config.heartbeat_seconds:
            return
        self._last = self.clock()
        try:
            with self.store.write() as s:
                s.execute(
                    update(WorkerRecord)
                    .where(WorkerRecord.id == self.worker_id)
                    # A worker called gone after a long stall is back: live again.
                    .values(last_beat_at=utcnow(), stopped_at=None, stop_reason=None)
                )
        except OperationalError as exc:
            # A busy database must not stop the scoring; the next beat tries again.
            log.warning("heartbeat not recorded error=%s", str(exc).splitlines()[0])

    def stop(self, reason: str = "stopped") -> None:
        if self.worker_id is None:
            return
        try:
            with self.store.write() as s:
                now = utcnow()
                s.execute(
                    update(WorkerRecord)
                    .where(WorkerRecord.id == self.worker_id)
                    .values(stopped_at=now, last_beat_at=now, stop_reason=reason)
                )
        except OperationalError as exc:
            log.warning("worker stop not recorded error=%s", str(exc).splitlines()[0])
        self.worker_id = None


def running_workers(store: Store, stale_after_seconds: float) -> list[dict[str, Any]]:
    """Workers not marked stopped, oldest first, each `live` or `stale` by its last beat."""
    now = utcnow()
    with store.read() as s:
        rows = list(
            s.scalars(
                select(WorkerRecord)
                .where(WorkerRecord.stopped_at.is_(None))
                .order_by(WorkerRecord.id)
            )
        )
    out = []
    for r in rows:
        age = (now - r.last_beat_at).total_seconds()
        state = WorkerState.STALE if age > stale_after_seconds else WorkerState.LIVE
        out.append(
            {
                "id": r.id,
                "state": state.value,
                "pid": r.pid,
                "host": r.host,
                "command": r.command,
                "inbox": r.inbox,
                "model_path": r.model_path,
                "model_version": r.model_version,
                "config_path": r.config_path,
                "started_at": iso(r.started_at),
                "last_beat_at": iso(r.last_beat_at),
                "seconds_since_beat": round(age, 1),
            }
        )
    return out
