"""Score a batch of settled inbox files and record each one's fate exactly once.

Order of work for a batch, each step durable before the next:
1. read bytes and hash them (in threads), then record (or find, after a crash) every file's
   row in one transaction: `received` (:mod:`worker.processing.receipt`);
2. preprocess the new ones (in threads), score them (:mod:`worker.processing.scores`), then
   commit every outcome with its planned destination in one transaction
   (:mod:`worker.processing.decision`);
3. move each file, then commit the batch's `moved_at` in one transaction
   (:mod:`worker.processing.placement`).
A crash between any two steps leaves rows that the next run finishes: `reconcile()` owes the
moves, and the inbox scan finds the rest. Every step is also written to the `events` table.

Several workers on one inbox (PostgreSQL): the receipt claims each file's row for this worker;
only the claimer decides and moves a file (:mod:`worker.processing.claims`). Receipts and
decisions of all workers take turns on an advisory lock, so a copy always finds its original,
whoever handles each.

Batches overlap, as stages in their own threads: `begin` reads and hashes a batch (decode
threads), commits its receipt and hands its files to the decode threads for preprocessing and
then to the scoring thread (one by default, so ONNX Runtime sees one batch at a time, in
`begin` order; `[model] streams` runs several);
`finish` waits for its scores, commits its decisions and its moves. A caller (the watcher)
begins the next batch before it finishes this one, so that ONNX Runtime scores batch N while
the calling thread commits and moves batch N-1 and receives batch N+1. Only the calling
thread touches the database: decisions are committed in batch order, so a duplicate always
finds its original decided, and a crash anywhere leaves what the steps above say. A file is
read once (:mod:`worker.processing.reading`).
"""

from __future__ import annotations

import dataclasses
import logging
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import Row

from worker.config import Config
from worker.faults import crash_point
from worker.imaging.dicom import DicomPolicy
from worker.imaging.identity import IdentityReader
from worker.processing.claims import Claims
from worker.processing.decision import Decider, Decision
from worker.processing.placement import BatchFile, FileResult, Placer
from worker.processing.reading import (
    Fingerprint,
    Loaded,
    decode_threads,
    load_file,
    preprocess_loaded,
    sha256_of,
)
from worker.processing.receipt import ReadFile, Receipt
from worker.processing.scores import BatchScorer, Preprocessing
from worker.records.models import ImageRecord
from worker.records.paths import display_name
from worker.records.store import FINAL_STATUSES, ImageStatus, Store
from worker.scoring.scorer import Scorer

__all__ = ["Batch", "FileResult", "Pipeline"]

log = logging.getLogger("mammo_screen")


@dataclass
class Batch:
    """A batch between Pipeline.begin() and Pipeline.finish(): its receipt committed, its
    preprocessing (decode threads) and scoring (the scoring thread) under way."""

    files: list[BatchFile] = field(default_factory=list)
    # Decided without scoring (duplicates); the scoring task returns the others' decisions.
    decided: dict[int, Decision] = field(default_factory=dict)
    scoring: Future[dict[int, Decision]] | None = None
    # Files another live worker has claimed (or moved): not this worker's to look at again
    # until its next rescan, by which time the claim is finished or its lease has run out.
    elsewhere: list[Path] = field(default_factory=list)

    @property
    def paths(self) -> list[Path]:
        return [f.path for f in self.files]


class Pipeline:
    """The parts of a batch's way, composed: receipt, scoring, decision, placement."""

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
        self.claims = Claims(config)
        self.decider = Decider(config, store, self.claims)
        self.receipt = Receipt(config, store, self.claims, self.decider)
        self.placer = Placer(store, self.claims)
        self.batch_scorer = BatchScorer(scorer, self.settings)
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

    @property
    def worker_id(self) -> int | None:
        """This worker's id in `workers` (set once its heartbeat has started): the owner of
        its claims when several workers share the inbox (PostgreSQL)."""
        return self.claims.worker_id

    @worker_id.setter
    def worker_id(self, worker_id: int | None) -> None:
        self.claims.worker_id = worker_id

    @property
    def rehashed(self) -> int:
        """Files read and hashed a second time before their move (see Placer)."""
        return self.placer.rehashed

    # ---- the steps, each in its part (called through here, so that they can be timed) ----

    def _receive(self, path: Path, data: bytes) -> ImageRecord:
        """One file's receipt (see :meth:`_receive_batch`)."""
        record = self._receive_batch([(path, sha256_of(data), len(data))])[0][0]
        assert record is not None
        return record

    def _receive_batch(
        self, files: list[ReadFile]
    ) -> tuple[list[ImageRecord | None], dict[int, int | None]]:
        """See :meth:`worker.processing.receipt.Receipt.receive_batch`."""
        return self.receipt.receive_batch(files)

    def _commit_decisions(
        self, decided: dict[int, Decision], then_read: list[int] | None = None
    ) -> dict[int, Row[Any]] | None:
        """See :meth:`worker.processing.decision.Decider.commit`."""
        return self.decider.commit(decided, then_read)

    def _move_batch(
        self, files: list[BatchFile], rows: dict[int, Row[Any]] | None = None
    ) -> list[FileResult]:
        """See :meth:`worker.processing.placement.Placer.move_batch`."""
        return self.placer.move_batch(files, rows)

    def _move(self, path: Path, record_id: int, fingerprint: Fingerprint | None = None
              ) -> FileResult:
        return self._move_batch([BatchFile(path, record_id, fingerprint)])[0]

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
        loads = list(self.pool.map(load_file, paths))
        readable: list[tuple[Path, Loaded]] = []
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
        preprocessing: Preprocessing = {}
        for (path, loaded), record in mine:
            batch.files.append(BatchFile(path, record.id, loaded.fingerprint))
            if record.status in FINAL_STATUSES:
                continue  # decided before a restart: only the move is owed
            # Who and which breast, recorded with the decision whatever it is.
            source = loaded.data if loaded.data is not None else path
            ident = self.identity.identify(record.filename, source)
            original = originals[record.id]
            if original is not None:
                batch.decided[record.id] = Decision(
                    ImageStatus.DUPLICATE, duplicate_of=original, identity=ident)
                continue
            preprocessing[record.id] = (
                self.pool.submit(preprocess_loaded, source, loaded.fingerprint, self.settings,
                                 self.dicom_policy),
                ident,
            )
        if preprocessing:
            # The tensors live only in this task: once it has scored them they are freed,
            # so at most the batches begun and not yet scored hold pixels.
            batch.scoring = self.scoring.submit(
                self.batch_scorer.preprocessed_and_scored, preprocessing)
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

    def _read_ok(self, path: Path, loaded: Loaded | OSError | None) -> bool:
        """Account for a read's outcome (in the calling thread): True when it has bytes."""
        if isinstance(loaded, Loaded):
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
            # Recorded without a hash, then moved aside.
            self.read_failures.pop(path, None)
            self._move(path, self.receipt.receive_unreadable(path, loaded, n))
        else:
            log.warning(
                "unreadable file=%s attempt=%d error=%s (will retry)",
                display_name(path),
                n,
                loaded.strerror,
            )
        return False

    def reconcile(self) -> int:
        """Finish the moves that a crash or a full disk left owed (see
        :meth:`worker.processing.placement.Placer.reconcile`). Returns how many."""
        return self.placer.reconcile()

    def close(self) -> None:
        # The scoring thread first: a task it has started waits for its batch's
        # preprocessing, which the decode threads must still be there to finish.
        self.scoring.shutdown(wait=True, cancel_futures=True)
        self.pool.shutdown(wait=True, cancel_futures=True)
