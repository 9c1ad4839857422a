"""Score a batch of settled inbox files and record each one's fate exactly once.

Order of work for a batch, each step durable before the next:
1. read bytes and hash them (in threads), then record (or find, after a crash) every file's
   row in one transaction: `received`;
2. preprocess the new ones (in threads), score them, then commit every outcome with its
   planned destination in one transaction;
3. move each file, then commit the batch's `moved_at` in one transaction.
A crash between any two steps leaves rows that the next run finishes: `reconcile()` owes the
moves, and the inbox scan finds the rest. Every step is also written to the `events` table.

Several workers on one inbox (PostgreSQL): the receipt claims each file's row for this worker
(`claimed_by`); a file claimed by another live worker is left to it; only the claimer decides
and moves a file; a worker whose heartbeat is older than the lease loses its claims to the next
worker that meets its files (see `_claimable`). Receipts and decisions of all workers take
turns on an advisory lock, so a copy always finds its original, whoever handles each.

Batches overlap, as stages in their own threads: `begin` reads and hashes a batch (decode
threads), commits its receipt and hands its files to the decode threads for preprocessing and
then to the scoring thread (one by default, so ONNX Runtime sees one batch at a time, in
`begin` order; `[model] streams` runs several);
`finish` waits for its scores, commits its decisions and its moves. A caller (the watcher)
begins the next batch before it finishes this one, so that ONNX Runtime scores batch N while
the calling thread commits and moves batch N-1 and receives batch N+1. Only the calling
thread touches the database: decisions are committed in batch order, so a duplicate always
finds its original decided, and a crash anywhere leaves what the steps above say. A file is
read once: before its move, its stat fingerprint says whether it is still what was read, and
only a changed file is hashed again.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import errno
import hashlib
import logging
import os
import shutil
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy import ColumnElement, Row, bindparam, insert, or_, select, update
from sqlalchemy.orm import Session

from worker.config import Config, MissingPathError
from worker.faults import crash_point
from worker.imaging.dicom import DicomPolicy
from worker.imaging.errors import ImageError
from worker.imaging.heatmap_geometry import Frame, preprocess_with_frame, to_original_frame
from worker.imaging.identity import IdentityReader
from worker.imaging.preprocess import PreprocessSettings
from worker.records.clock import utcnow
from worker.records.heatmaps import heatmap_row, insert_heatmaps
from worker.records.models import ImageRecord, WorkerRecord
from worker.records.paths import display_name, path_from_db, path_to_db
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
from worker.scoring.scorer import Scorer

log = logging.getLogger("mammo_screen")


@dataclass(frozen=True)
class FileResult:
    """What happened to one file in a batch (for callers and tests; the DB is the record)."""

    path: Path
    record_id: int | None
    status: str
    score: float | None = None
    label: str | None = None
    error: str | None = None


def relative_name(path: Path, inbox: Path) -> str:
    try:
        return display_name(path.relative_to(inbox).as_posix())
    except ValueError:
        return display_name(path.name)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _unique_destination(folder: Path, rel: Path, record_id: int) -> Path:
    dest = folder / rel
    if not dest.exists():
        return dest
    return dest.with_name(f"{dest.stem}.{record_id}{dest.suffix}")


# The columns a decision sets (the identity columns it brings along included).
_DECIDED_COLUMNS = (
    "status", "score", "label", "threshold", "model_version", "scored_at", "error",
    "duplicate_of", "final_path", "patient_id", "study_uid", "laterality", "view",
    "sop_instance_uid",
)
# The columns a decision reads.
_DECISION_COLUMNS = ("id", "filename", "source_path", "claimed_by", *_DECIDED_COLUMNS)
# The columns a move needs.
_MOVE_COLUMNS = (
    "id", "filename", "status", "score", "label", "error", "sha256", "final_path", "claimed_by",
)
_IMAGES = ImageRecord.__table__

# The statements run for every batch, built once (building and keying a statement costs
# about as much CPU as SQLite takes to run it): lists are bound as expanding parameters.
_UNFINISHED = select(ImageRecord).where(
    ImageRecord.source_path.in_(bindparam("sources", expanding=True)),
    ImageRecord.moved_at.is_(None),
)
# Ids must follow the batch's order (receipt order decides which copy is the original).
# sort_by_parameter_order makes SQLAlchemy guarantee it on every backend: on PostgreSQL its
# multi-row INSERT becomes INSERT .. SELECT .. ORDER BY, which takes serial values in order.
_INSERT_IMAGES = insert(_IMAGES).returning(_IMAGES.c.id, sort_by_parameter_order=True)
_SAME_CONTENT = (
    select(ImageRecord.id, ImageRecord.sha256)
    .where(
        ImageRecord.sha256.in_(bindparam("digests", expanding=True)),
        ImageRecord.status.in_((ImageStatus.SCORED, ImageStatus.RECEIVED, ImageStatus.QUARANTINED)),
    )
    .order_by(ImageRecord.id)
)
_FOR_DECISION = select(*(_IMAGES.c[key] for key in _DECISION_COLUMNS)).where(
    _IMAGES.c.id.in_(bindparam("ids", expanding=True))
)
_FOR_MOVE = select(*(_IMAGES.c[key] for key in _MOVE_COLUMNS)).where(
    _IMAGES.c.id.in_(bindparam("ids", expanding=True))
)
_LOCK_FOR_MOVE = (
    select(_IMAGES.c.id, _IMAGES.c.moved_at)
    .where(_IMAGES.c.id.in_(bindparam("ids", expanding=True)))
    .order_by(_IMAGES.c.id)
    .with_for_update()
)
_UPDATE_IMAGE = update(_IMAGES).where(_IMAGES.c.id == bindparam("b_id"))


class Pipeline:
    def __init__(self, config: Config, store: Store, scorer: Scorer) -> None:
        self.config = config
        self.store = store
        self.scorer = scorer
        pre = scorer.metadata.preprocess
        # The model decides the preprocessing; the config may only tighten the size limit.
        self.settings = dataclasses.replace(pre, max_pixels=min(pre.max_pixels, config.max_pixels))
        self.dicom_policy = DicomPolicy.for_config(config)
        # Read failures of files that have no row yet: path -> count.
        self.read_failures: dict[Path, int] = {}
        self.identity = IdentityReader(config.filename_pattern, config.sidecar_csv)
        # Reading, hashing and decoding run here (file reads, hashlib and OpenCV release the
        # GIL) while ONNX Runtime scores the batch before in the scoring thread.
        self.pool = ThreadPoolExecutor(max_workers=decode_threads(), thread_name_prefix="decode")
        # ONNX Runtime (which releases the GIL) runs here, batches taken in the order they
        # were begun, while the calling thread does the database and the moves. One thread by
        # default; `[model] streams` scores that many batches side by side (faster on a
        # machine whose cores one call cannot keep busy, at the cost of memory).
        self.scoring = ThreadPoolExecutor(max_workers=scorer.streams,
                                          thread_name_prefix="score")
        self.scoring.submit(scorer.warm_up, config.batch_size)
        # Files read and hashed a second time before their move (their stat changed, or
        # their read was before a restart): the replaced-file check, counted.
        self.rehashed = 0
        # This worker's id in `workers` (set once its heartbeat has started): the owner of
        # its claims when several workers share the inbox (PostgreSQL).
        self.worker_id: int | None = None

    # ---- claims (several workers on one inbox) ---------------------------------------------

    def _claimable(self) -> ColumnElement[bool]:
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

    def _claim(self, row: ImageRecord, events: list[dict[str, Any]]) -> None:
        if row.claimed_by not in (None, self.worker_id):
            events.append(event_row(
                EventKind.TAKEN_OVER, f"from worker {row.claimed_by} (lease expired)",
                image_id=row.id
            ))
            log.warning("taken over id=%d from worker=%s", row.id, row.claimed_by)
        row.claimed_by = self.worker_id

    # ---- step 1: record receipt ------------------------------------------------------------

    def _receive(self, path: Path, data: bytes) -> ImageRecord:
        """One file's receipt (see :meth:`_receive_batch`)."""
        record = self._receive_batch([(path, _sha256(data), len(data))])[0][0]
        assert record is not None
        return record

    def _receive_batch(
        self, files: list[tuple[Path, str, int]]
    ) -> tuple[list[ImageRecord | None], dict[int, int | None]]:
        """For each (path, sha256, size), in one transaction: find the file's unfinished row
        (a restart) or insert a new `received` one, and claim it for this worker. Returns
        the rows, and the original of each undecided one (see :meth:`_originals_in`), read
        in the same transaction.

        None for a file that another live worker has claimed, or that a worker moved away
        after this one read it. The receipts of all workers on a database take turns (an
        advisory lock on PostgreSQL, BEGIN IMMEDIATE on SQLite), so two workers never both
        insert a row for one file, and a copy received after its original finds it.

        Each receipt of an undecided row counts an attempt: a file that crashes the worker
        every time (a decoder bug) is quarantined after max_attempts instead of looping.
        """
        with self.store.write() as s:
            self.store.serialise(s, FILES_LOCK)
            # The batch's unfinished rows in one query (at most one per path and content: the
            # partial unique index), and in one more, which of them this worker may handle.
            sources = [path_to_db(path) for path, _, _ in files]
            unfinished = self._unfinished(s, sources)
            mine = set(
                s.scalars(
                    select(ImageRecord.id).where(
                        ImageRecord.id.in_([r.id for r in unfinished.values()]),
                        self._claimable(),
                    )
                )
            ) if unfinished else set()
            new: list[dict[str, Any]] = []
            keys: list[tuple[str, str] | None] = []
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
                        "claimed_by": self.worker_id,
                    })
                keys.append((source, digest))
            fresh = {(r["source_path"], r["sha256"]) for r in new}
            if new:
                # Inserted in the batch's order (their ids follow it), then the rows read
                # back with their ids.
                s.execute(_INSERT_IMAGES, new)
                unfinished = self._unfinished(s, sources)
            rows = [None if key is None else unfinished[key] for key in keys]
            events: list[dict[str, Any]] = []
            for maybe, key, (_, _, size) in zip(rows, keys, files, strict=True):
                if maybe is None:
                    continue
                row = maybe
                if key in fresh:
                    events.append(event_row(EventKind.RECEIVED, f"{size} bytes", image_id=row.id))
                    continue  # unclaimed before, and its attempt counted
                self._claim(row, events)
                if row.status == ImageStatus.RECEIVED:
                    row.attempts += 1
                    if row.attempts > 1:
                        events.append(
                            event_row(EventKind.RETRY, f"attempt {row.attempts}", image_id=row.id)
                        )
                    if row.attempts > self.config.max_attempts:
                        self._decide(
                            row,
                            events,
                            ImageStatus.QUARANTINED,
                            error=f"gave up after {row.attempts - 1} attempts "
                            f"(last: {row.error or 'worker stopped while handling it'})",
                        )
            s.flush()
            insert_events(s, events)
            originals = self._originals_in(
                s, [r for r in rows if r is not None and r.status not in FINAL_STATUSES]
            )
            for maybe in rows:
                if maybe is not None:
                    s.expunge(maybe)
        return rows, originals

    @staticmethod
    def _unfinished(s: Session, sources: list[str]) -> dict[tuple[str, str | None], ImageRecord]:
        """The unfinished rows of these inbox paths, by (path, content): at most one each
        (the partial unique index)."""
        return {
            (r.source_path, r.sha256): r
            for r in s.scalars(_UNFINISHED, {"sources": sources})
        }

    @staticmethod
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

    # ---- the batch -------------------------------------------------------------------------

    def process(self, paths: list[Path]) -> list[FileResult]:
        """Every step for one batch, in order (the watcher overlaps batches with begin/finish)."""
        return self.finish(self.begin(paths))

    def begin(self, paths: list[Path]) -> Batch:
        """Read and hash the files (in threads), commit their receipt in one transaction, then
        start preprocessing them (decode threads) and scoring them (the scoring thread, after
        the batches begun before), so that both run while the caller finishes the batch
        before this one. Preprocessing starts only after the receipt is committed: a file
        that kills the worker while decoding has an attempt counted for it."""
        loads = list(self.pool.map(_load, paths))
        readable: list[tuple[Path, _Loaded]] = []
        for path, loaded in zip(paths, loads, strict=True):
            if self._read_ok(path, loaded):
                readable.append((path, loaded))
        batch = Batch()
        if not readable:
            return batch
        received, originals = self._receive_batch(
            [(path, loaded.sha256, loaded.fingerprint[2]) for path, loaded in readable]
        )
        crash_point("after_receive")
        for (path, _), r in zip(readable, received, strict=True):
            if r is None:
                batch.elsewhere.append(path)
                log.info("left to another worker file=%s (claimed, or moved)", display_name(path))
        mine = [(f, r) for f, r in zip(readable, received, strict=True) if r is not None]
        readable = [f for f, _ in mine]
        records = [r for _, r in mine]
        preprocessing: dict[int, tuple[Future[tuple[np.ndarray, Frame]], dict[str, Any]]] = {}
        for (path, loaded), record in zip(readable, records, strict=True):
            batch.files.append(_BatchFile(path, record.id, loaded.fingerprint))
            if record.status in FINAL_STATUSES:
                continue  # decided before a restart: only the move is owed
            # Who and which breast, recorded with the decision whatever it is.
            source = loaded.data if loaded.data is not None else path
            ident = self.identity.identify(record.filename, source).as_columns()
            original = originals[record.id]
            if original is not None:
                batch.decided[record.id] = {
                    "status": ImageStatus.DUPLICATE, "duplicate_of": original, **ident}
                continue
            preprocessing[record.id] = (
                self.pool.submit(_preprocess, source, loaded.fingerprint, self.settings,
                                 self.dicom_policy),
                ident,
            )
        if preprocessing:
            # The tensors live only in this task: once it has scored them they are freed,
            # so at most the batches begun and not yet scored hold pixels.
            batch.scoring = self.scoring.submit(self._preprocessed_and_scored, preprocessing)
        return batch

    def finish(self, batch: Batch) -> list[FileResult]:
        """Wait for the batch's scores (preprocessing and ONNX Runtime, in their threads),
        commit its decisions in one transaction, then move its files and commit the moves in
        one transaction."""
        decided = batch.decided
        if batch.scoring is not None:
            decided.update(batch.scoring.result())
        if not batch.files:
            return []
        crash_point("after_preprocess")
        rows = self._commit_decisions(decided, [f.record_id for f in batch.files])
        crash_point("after_decision")
        return self._move_batch(batch.files, rows)

    def _preprocessed_and_scored(
        self, preprocessing: dict[int, tuple[Future[tuple[np.ndarray, Frame]], dict[str, Any]]]
    ) -> dict[int, dict[str, Any]]:
        """The scoring thread's task for one batch: wait for its preprocessing, score what
        decoded in one ONNX Runtime call, and return every file's decision (not committed:
        only the calling thread writes to the database)."""
        to_score: list[tuple[int, np.ndarray, Frame]] = []
        decided: dict[int, dict[str, Any]] = {}
        for rid, (future, ident) in preprocessing.items():
            try:
                to_score.append((rid, *future.result()))
            except ImageError as exc:
                decided[rid] = {"status": ImageStatus.QUARANTINED, "error": str(exc), **ident}
            except Exception as exc:  # a decoder bug must not stop the worker
                decided[rid] = {
                    "status": ImageStatus.QUARANTINED,
                    "error": f"preprocessing failed: {exc!r}",
                    **ident,
                }
        for rid, fields in self._score(to_score).items():
            decided[rid] = {**fields, **preprocessing[rid][1]}
        return decided

    def _read_ok(self, path: Path, loaded: _Loaded | OSError | None) -> bool:
        """Account for a read's outcome (in the calling thread): True when it has bytes."""
        if isinstance(loaded, _Loaded):
            self.read_failures.pop(path, None)
            return True
        if loaded is None:
            # Still being written after all: leave it for the next look, record nothing.
            log.info("changed while read file=%s (will retry)", display_name(path))
            return False
        if isinstance(loaded, (FileNotFoundError, IsADirectoryError)):
            log.info("vanished file=%s (gone before it was read)", display_name(path))
            self.read_failures.pop(path, None)
            return False
        n = self.read_failures.get(path, 0) + 1
        self.read_failures[path] = n
        if n >= self.config.max_attempts:
            self._quarantine_unreadable(path, loaded, n)
        else:
            log.warning(
                "unreadable file=%s attempt=%d error=%s (will retry)",
                display_name(path),
                n,
                loaded.strerror,
            )
        return False

    def _quarantine_unreadable(self, path: Path, exc: OSError, attempts: int) -> None:
        """A file that cannot even be read: record it without a hash, then move it aside."""
        self.read_failures.pop(path, None)
        with self.store.write() as s:
            row = ImageRecord(
                filename=relative_name(path, self.config.inbox),
                source_path=path_to_db(path),
                sha256=None,
                size_bytes=None,
                status=ImageStatus.RECEIVED,
                attempts=attempts,
                received_at=utcnow(),
                claimed_by=self.worker_id,
            )
            s.add(row)
            s.flush()
            events: list[dict[str, Any]] = []
            self._decide(
                row, events, ImageStatus.QUARANTINED,
                error=f"unreadable after {attempts} attempts: {exc.strerror}",
            )
            insert_events(s, events)
            rid = row.id
        self._move(path, rid)

    def _score(self, items: list[tuple[int, np.ndarray, Frame]]) -> dict[int, dict[str, Any]]:
        """Score in one ONNX Runtime call; if the batch fails, one by one to isolate the cause.
        With a model that has the attention output, each decision carries its `heatmap` row."""
        if not items:
            return {}
        try:
            scores, maps = self.scorer.score_and_attend([img for _, img, _ in items])
        except Exception as exc:
            if len(items) == 1:
                log.error("scoring failed id=%d error=%r", items[0][0], exc)
                return {}  # stays `received`: retried, then quarantined after max_attempts
            out: dict[int, dict[str, Any]] = {}
            for item in items:
                out.update(self._score([item]))
            return out
        now = utcnow()
        out = {
            rid: {
                "status": ImageStatus.SCORED,
                "score": float(score),
                "label": self.scorer.label_for(float(score)),
                "threshold": self.scorer.threshold,
                "model_version": self.scorer.version,
                "scored_at": now,
            }
            for (rid, _, _), score in zip(items, scores, strict=True)
        }
        if maps is not None:
            for (rid, _, frame), attention in zip(items, maps, strict=True):
                try:
                    heat = to_original_frame(attention, frame, self.settings)
                except Exception as exc:  # a map is an extra: it must never cost a score
                    log.warning("no heatmap id=%d error=%r", rid, exc)
                    continue
                out[rid]["heatmap"] = heatmap_row(rid, heat, attention.size,
                                                  self.scorer.version)
        return out

    def _decide(
        self, row: ImageRecord, events: list[dict[str, Any]], status: str, **fields: Any
    ) -> None:
        """Set a final status and the planned destination on a row of the caller's
        transaction, and add its event to `events` (see :meth:`_decision`)."""
        for key, value in self._decision(row, status, fields, events).items():
            setattr(row, key, value)

    def _decision(
        self, row: ImageRecord | Row[Any], status: str, fields: dict[str, Any],
        events: list[dict[str, Any]],
    ) -> dict[str, Any]:
        """The columns of `row` once decided as `status` with `fields` (every column in
        _DECIDED_COLUMNS: the row's own value unless the decision sets it), planned
        destination included; adds the decision's event to `events` and logs it."""
        values = {key: getattr(row, key) for key in _DECIDED_COLUMNS}
        values.update(fields, status=status)
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

    def _commit_decisions(
        self, decided: dict[int, dict[str, Any]], then_read: list[int] | None = None
    ) -> dict[int, Row[Any]] | None:
        """Commit a batch's decisions in one transaction: the rows read in one query,
        updated in one UPDATE executed per row, their events inserted in one INSERT (in the
        order they happened: each decision, then the exam event it caused), scored images
        joined to their exams (worker/results/exams.py). Returns the rows `then_read` as the move
        needs them (see :meth:`_move_batch`), read at the end of the same transaction
        instead of in one more; None when there was nothing to decide."""
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
                row, fields = rows[rid], dict(decided[rid])
                if row.status in FINAL_STATUSES or row.claimed_by != self.worker_id:
                    continue  # decided already, or taken over by another worker
                status = fields.pop("status")
                heatmap = fields.pop("heatmap", None)
                if status == ImageStatus.DUPLICATE:
                    original = self._original(s, rows, updates, fields["duplicate_of"])
                    if original is not None and original["status"] == ImageStatus.QUARANTINED:
                        status = ImageStatus.QUARANTINED
                        fields["error"] = (
                            f"duplicate of #{original['id']}, quarantined: {original['error']}"
                        )
                    elif original is not None and original["status"] == ImageStatus.SCORED:
                        fields.update(
                            {key: original[key] for key in (
                                "score", "label", "threshold", "model_version", "scored_at"
                            )}
                        )
                values = updates[rid] = self._decision(
                    row, status, fields, events.setdefault(rid, [])
                )
                if status == ImageStatus.SCORED and heatmap is not None:
                    heatmaps.append(heatmap)
                # A scored image joins its exam in the same commit as its score.
                if status == ImageStatus.SCORED and values["study_uid"] is not None:
                    joining.append(Joining(rid, values["study_uid"], values["patient_id"]))
            if updates:
                s.execute(
                    _UPDATE_IMAGE, [{"b_id": rid, **values} for rid, values in updates.items()]
                )
                insert_heatmaps(s, heatmaps)
                for rid, event in join_exams(s, joining, utcnow()).items():
                    events[rid].append(event)
                insert_events(s, [e for rid in updates for e in events[rid]])
            if then_read is None:
                return None
            return {r.id: r for r in s.execute(_FOR_MOVE, {"ids": then_read})}

    @staticmethod
    def _original(
        s: Session, rows: dict[int, Row[Any]], updates: dict[int, dict[str, Any]], rid: int
    ) -> dict[str, Any] | None:
        """A duplicate's original as committed by this transaction: decided just now (its
        new columns), or its row as read."""
        if rid in updates:
            return {"id": rid, **updates[rid]}
        row = rows.get(rid) or s.execute(_FOR_DECISION, {"ids": [rid]}).first()
        if row is None:
            return None
        return {"id": rid, **{key: getattr(row, key) for key in _DECIDED_COLUMNS}}

    # ---- step 3: move, then record the moves -----------------------------------------------

    def _move(self, path: Path, record_id: int, fingerprint: Fingerprint | None = None
              ) -> FileResult:
        return self._move_batch([_BatchFile(path, record_id, fingerprint)])[0]

    def _move_batch(
        self, files: list[_BatchFile], rows: dict[int, Row[Any]] | None = None
    ) -> list[FileResult]:
        """Move each decided file to its planned destination, then record all the moves in
        one transaction. A crash in between leaves the moves owed: reconcile() finds each
        file gone from the inbox and at its destination, and records it as moved. `rows`:
        the files' rows as committed (from :meth:`_commit_decisions`), or None to read them."""
        if rows is None:
            with self.store.read() as s:  # the columns needed, without ORM objects
                rows = {
                    r.id: r
                    for r in s.execute(_FOR_MOVE, {"ids": [f.record_id for f in files]})
                }
        results: list[FileResult] = []
        notes: dict[int, tuple[str, Path]] = {}
        for f in files:
            row = rows[f.record_id]
            results.append(FileResult(f.path, row.id, row.status, row.score, row.label, row.error))
            if row.status not in FINAL_STATUSES or row.final_path is None:
                continue
            if row.claimed_by != self.worker_id:
                continue  # taken over by another worker: its move, not ours
            dest = path_from_db(row.final_path)
            try:
                notes[row.id] = (self._place(f, row.sha256, dest), dest)
            except OSError as exc:
                # The decision is committed; the move is owed and retried by reconcile().
                level = log.error if exc.errno == errno.ENOSPC else log.warning
                level(
                    "move failed file=%s id=%d error=%s (will retry)",
                    row.filename,
                    row.id,
                    exc.strerror,
                )
        if not notes:
            return results
        moved_at = utcnow()
        with self.store.write() as s:
            # The rows locked (PostgreSQL) and read in one query: one already moved (by a
            # worker that took it over meanwhile) is left as it is.
            owed = [
                rid
                for rid, done in s.execute(_LOCK_FOR_MOVE, {"ids": list(notes)})
                if done is None
            ]
            moved = [rid for rid in owed if notes[rid][0] == "moved"]
            lost = [rid for rid in owed if notes[rid][0] != "moved"]
            if moved:
                s.execute(_UPDATE_IMAGE, [{"b_id": rid, "moved_at": moved_at} for rid in moved])
            if lost:  # nothing at the destination: no final path
                s.execute(
                    _UPDATE_IMAGE,
                    [{"b_id": rid, "moved_at": moved_at, "final_path": None} for rid in lost],
                )
            insert_events(s, [self._move_event(rid, *notes[rid]) for rid in owed])
        for rid, (note, _) in notes.items():
            if note != "moved":
                log.warning("%s file=%s id=%d (not moved)", note, rows[rid].filename, rid)
        return results

    @staticmethod
    def _move_event(rid: int, note: str, dest: Path) -> dict[str, Any]:
        if note == "moved":
            return event_row(EventKind.MOVED, display_name(dest), image_id=rid)
        return event_row(
            EventKind(note),
            "file changed in the inbox before it could be moved"
            if note == "replaced"
            else "file gone before it could be moved",
            image_id=rid,
        )

    def _place(self, f: _BatchFile, sha256: str | None, dest: Path) -> str:
        """Move one file; what happened: moved, replaced (left for the scan) or missing."""
        if (f.path.exists() and sha256 is not None and not self._unchanged(f, sha256)
                and f.path.exists()):
            # Replaced under us after it was read: the new content is a new file, which
            # the scan will find; the old content is gone, so there is nothing to move.
            # (Gone by now instead: moved by a worker that took over; see below.)
            return "replaced"
        if f.path.exists():
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(str(f.path), str(dest))
            crash_point("after_move")
            return "moved"
        return "moved" if dest.exists() else "missing"

    def _unchanged(self, f: _BatchFile, sha256: str) -> bool:
        """Whether the file still holds the content that was read and decided on. Its stat
        fingerprint (device, inode, size, mtime, ctime) unchanged since the read says so
        without reading it again; otherwise, or when no fingerprint is known (after a
        restart), the file is read and hashed again (counted in `rehashed`)."""
        if f.fingerprint is not None:
            try:
                if _fingerprint(os.stat(f.path)) == f.fingerprint:
                    return True
            except OSError:
                return False
        self.rehashed += 1
        try:
            return _stream_sha256(f.path)[0] == sha256
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
                        self._claimable(),
                    )
                    .with_for_update(skip_locked=True)
                )
            )
            # Another worker's file is taken over only if it is visible here (its inbox path
            # or its destination): with a local inbox per machine, another machine's owed
            # move is not this worker's to record as missing.
            owed = [r for r in owed if r.claimed_by in (None, self.worker_id) or _visible(r)]
            events: list[dict[str, Any]] = []
            for row in owed:
                self._claim(row, events)
            insert_events(s, events)
        if owed:
            self._move_batch([_BatchFile(path_from_db(r.source_path), r.id, None) for r in owed])
            log.info("reconciled moves=%d", len(owed))
        return len(owed)

    def close(self) -> None:
        # The scoring thread first: a task it has started waits for its batch's
        # preprocessing, which the decode threads must still be there to finish.
        self.scoring.shutdown(wait=True, cancel_futures=True)
        self.pool.shutdown(wait=True, cancel_futures=True)


def _visible(row: ImageRecord) -> bool:
    """Whether this machine sees the row's file, in the inbox or at its destination."""
    return path_from_db(row.source_path).exists() or (
        row.final_path is not None and path_from_db(row.final_path).exists()
    )


# ---- reading (in the pool's threads: no database, no shared state) ---------------------------

# What says a file is unchanged since it was read: device, inode, size, mtime, ctime (ns).
Fingerprint = tuple[int, int, int, int, int]


def _fingerprint(st: os.stat_result) -> Fingerprint:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


# Files up to this size are held in memory from their hashing to their decoding; larger ones
# (full-size mammograms, 15-50 MB) are hashed as they stream by and read again by the decode
# thread, so that memory is bounded by one full image per decoding thread, not by the batch.
KEEP_BYTES = 4 << 20
_CHUNK = 1 << 20


@dataclass(frozen=True)
class _Loaded:
    data: bytes | None  # None: over KEEP_BYTES, read again to be decoded
    sha256: str
    fingerprint: Fingerprint


def _load(path: Path) -> _Loaded | OSError | None:
    """Read and hash one file: its bytes (or only its hash, for a large file), or None when
    it changed while being read (still being written after all), or the OSError that
    stopped the read."""
    try:
        before = os.stat(path)
        if before.st_size <= KEEP_BYTES:
            data: bytes | None = path.read_bytes()
            digest, size = _sha256(data), len(data)
        else:
            data, (digest, size) = None, _stream_sha256(path)
        after = os.stat(path)
    except OSError as exc:
        return exc
    if _fingerprint(before) != _fingerprint(after) or size != after.st_size:
        return None
    return _Loaded(data, digest, _fingerprint(after))


def _stream_sha256(path: Path) -> tuple[str, int]:
    """(SHA-256, bytes read) of a file, a chunk at a time."""
    h, size = hashlib.sha256(), 0
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            h.update(chunk)
            size += len(chunk)
    return h.hexdigest(), size


def _preprocess(source: bytes | Path, fingerprint: Fingerprint, settings: PreprocessSettings,
                policy: DicomPolicy) -> tuple[np.ndarray, Frame]:
    """A decode thread's task: the model input (and its geometry, for the heatmap) from the
    bytes read at receipt, or, for a large file, from the file itself, which must still be
    what was hashed then."""
    if isinstance(source, bytes):
        return preprocess_with_frame(source, settings, policy)
    changed = ImageError("file changed after it was received; its new content is taken "
                         "as a new file")
    try:
        out = preprocess_with_frame(source, settings, policy)
        unchanged = _fingerprint(os.stat(source)) == fingerprint
    except OSError as exc:
        raise changed from exc
    if not unchanged:  # the pixels may be the new content's: not this record's to score
        raise changed
    return out


@dataclass
class _BatchFile:
    path: Path
    record_id: int
    fingerprint: Fingerprint | None  # at read time; None: unknown, hash again before moving


@dataclass
class Batch:
    """A batch between Pipeline.begin() and Pipeline.finish(): its receipt committed, its
    preprocessing (decode threads) and scoring (the scoring thread) under way."""

    files: list[_BatchFile] = field(default_factory=list)
    # Decided without scoring (duplicates); the scoring task returns the others' decisions.
    decided: dict[int, dict[str, Any]] = field(default_factory=dict)
    scoring: Future[dict[int, dict[str, Any]]] | None = None
    # Files another live worker has claimed (or moved): not this worker's to look at again
    # until its next rescan, by which time the claim is finished or its lease has run out.
    elsewhere: list[Path] = field(default_factory=list)

    @property
    def paths(self) -> list[Path]:
        return [f.path for f in self.files]


def decode_threads() -> int:
    """Threads that read, hash and preprocess: at least two, so that one batch's decoding
    keeps up with ONNX Runtime on the one before (decoding costs a fraction of inference
    for these models), at most four (ONNX Runtime needs the cores too)."""
    return max(2, min(4, os.cpu_count() or 1))


def ensure_folder(role: str, folder: Path, create_missing: bool) -> None:
    """A missing folder is a mistake (a typo must not become a new, empty inbox) unless the
    config asks for it to be created ([paths] create_missing)."""
    if folder.exists() and not folder.is_dir():
        raise NotADirectoryError(f"{role} is not a folder: {folder}")
    if not folder.exists():
        if not create_missing:
            raise MissingPathError(
                f"{role} folder not found: {folder} "
                "(create it, or set [paths] create_missing = true)"
            )
        folder.mkdir(parents=True)
        log.info("created %s folder=%s", role, folder)


def ensure_inbox(config: Config) -> None:
    """The inbox exists (or is created when the config allows) and can be read and written."""
    ensure_folder("inbox", config.inbox, config.create_missing)
    if not os.access(config.inbox, os.R_OK | os.X_OK | os.W_OK):
        raise PermissionError(f"inbox folder is not readable and writable: {config.inbox}")


def ensure_folders(config: Config) -> None:
    """Check the inbox and output folders (see :func:`ensure_folder`)."""
    ensure_inbox(config)
    for role, folder in (("processed", config.processed), ("quarantine", config.quarantine),
                         ("outbox", config.outbox)):
        ensure_folder(role, folder, config.create_missing)
