"""Score a batch of settled inbox files and record each one's fate exactly once.

Order of work for a batch, each step durable before the next:
1. read bytes, hash them, and record (or find, after a crash) the file's row: `received`;
2. preprocess and score the new ones, then commit every outcome with its planned destination;
3. move each file, then commit `moved_at`.
A crash between any two steps leaves a row that `reconcile()` finishes on the next start.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from sqlalchemy import select

from worker.config import Config
from worker.preprocess import ImageError, PreprocessSettings, preprocess_bytes
from worker.scorer import Scorer
from worker.store import (
    DUPLICATE,
    FINAL_STATUSES,
    QUARANTINED,
    RECEIVED,
    SCORED,
    ImageRecord,
    Store,
    utcnow,
)

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
        return path.relative_to(inbox).as_posix()
    except ValueError:
        return path.name


def _unique_destination(folder: Path, rel: str, record_id: int) -> Path:
    dest = folder / rel
    if not dest.exists():
        return dest
    return dest.with_name(f"{dest.stem}.{record_id}{dest.suffix}")


class Pipeline:
    def __init__(self, config: Config, store: Store, scorer: Scorer) -> None:
        self.config = config
        self.store = store
        self.scorer = scorer
        pre = scorer.metadata.preprocess
        # The model decides the preprocessing; the config may only tighten the size limit.
        self.settings = PreprocessSettings(
            size=pre.size,
            polarity=pre.polarity,
            pad_square=pre.pad_square,
            corner_fraction=pre.corner_fraction,
            max_pixels=min(pre.max_pixels, config.max_pixels),
            version=pre.version,
        )

    # ---- step 1: record receipt ------------------------------------------------------------

    def _receive(self, path: Path, data: bytes) -> ImageRecord:
        """Find the file's unfinished row (a restart) or insert a new `received` one."""
        digest = hashlib.sha256(data).hexdigest()
        source = str(path)
        with self.store.write() as s:
            row = s.scalars(
                select(ImageRecord).where(
                    ImageRecord.source_path == source,
                    ImageRecord.sha256 == digest,
                    ImageRecord.moved_at.is_(None),
                )
            ).first()
            if row is None:
                row = ImageRecord(
                    filename=relative_name(path, self.config.inbox),
                    source_path=source,
                    sha256=digest,
                    size_bytes=len(data),
                    status=RECEIVED,
                    received_at=utcnow(),
                    attempts=0,
                )
                s.add(row)
            if row.status == RECEIVED:
                row.attempts += 1
            s.flush()
            s.expunge(row)
            return row

    def _find_original(self, record: ImageRecord) -> ImageRecord | None:
        """The earliest other row with the same content that was scored or is being scored."""
        with self.store.read() as s:
            return s.scalars(
                select(ImageRecord)
                .where(
                    ImageRecord.sha256 == record.sha256,
                    ImageRecord.id != record.id,
                    ImageRecord.status.in_((SCORED, RECEIVED, QUARANTINED)),
                    ImageRecord.id < record.id,
                )
                .order_by(ImageRecord.id)
            ).first()

    # ---- the batch -------------------------------------------------------------------------

    def process(self, paths: list[Path]) -> list[FileResult]:
        received: list[tuple[Path, ImageRecord, bytes]] = []
        results: list[FileResult] = []
        for path in paths:
            try:
                data = path.read_bytes()
            except FileNotFoundError:
                log.info("vanished file=%s (gone before it was read)", path)
                continue
            except IsADirectoryError:
                continue
            except OSError as exc:
                log.warning("unreadable file=%s error=%s (will retry)", path, exc)
                continue
            record = self._receive(path, data)
            received.append((path, record, data))

        to_score: list[tuple[Path, ImageRecord, np.ndarray]] = []
        decided: dict[int, dict[str, object]] = {}
        for path, record, data in received:
            if record.status in FINAL_STATUSES:
                continue  # already decided before a restart: only the move is owed
            original = self._find_original(record)
            if original is not None:
                decided[record.id] = {"status": DUPLICATE, "duplicate_of": original.id}
                continue
            try:
                to_score.append((path, record, preprocess_bytes(data, self.settings)))
            except ImageError as exc:
                decided[record.id] = {"status": QUARANTINED, "error": str(exc)}
            except Exception as exc:  # a decoder bug must not stop the worker
                decided[record.id] = {
                    "status": QUARANTINED,
                    "error": f"preprocessing failed: {exc!r}",
                }

        if to_score:
            scores = self.scorer.score_batch([img for _, _, img in to_score])
            now = utcnow()
            for (_, record, _), score in zip(to_score, scores, strict=True):
                decided[record.id] = {
                    "status": SCORED,
                    "score": float(score),
                    "label": self.scorer.label_for(float(score)),
                    "threshold": self.scorer.threshold,
                    "model_version": self.scorer.version,
                    "scored_at": now,
                }

        self._commit_decisions(decided)
        for path, record, _ in received:
            results.append(self._move(path, record.id))
        return results

    def _commit_decisions(self, decided: dict[int, dict[str, object]]) -> None:
        if not decided:
            return
        with self.store.write() as s:
            rows = {
                r.id: r for r in s.scalars(select(ImageRecord).where(ImageRecord.id.in_(decided)))
            }
            # Originals first, so that a duplicate in the same batch can copy their result.
            for rid in sorted(decided):
                row, fields = rows[rid], decided[rid]
                for key, value in fields.items():
                    setattr(row, key, value)
                if row.status == DUPLICATE:
                    original = rows.get(row.duplicate_of) or s.get(ImageRecord, row.duplicate_of)
                    if original is not None and original.status == QUARANTINED:
                        row.status = QUARANTINED
                        row.error = f"duplicate of #{original.id}, quarantined: {original.error}"
                    elif original is not None:
                        row.score, row.label = original.score, original.label
                        row.threshold, row.model_version = (
                            original.threshold,
                            original.model_version,
                        )
                        row.scored_at = original.scored_at
                folder = (
                    self.config.quarantine if row.status == QUARANTINED else self.config.processed
                )
                row.final_path = str(_unique_destination(folder, row.filename, row.id))
                log_fn = log.warning if row.status == QUARANTINED else log.info
                log_fn(
                    "%s file=%s id=%d score=%s label=%s%s",
                    row.status,
                    row.filename,
                    row.id,
                    "-" if row.score is None else f"{row.score:.4f}",
                    row.label or "-",
                    f" reason={row.error}" if row.error else "",
                )

    # ---- step 3: move, then record the move ------------------------------------------------

    def _move(self, path: Path, record_id: int) -> FileResult:
        with self.store.read() as s:
            row = s.get(ImageRecord, record_id)
            assert row is not None
        if row.status not in FINAL_STATUSES or row.final_path is None:
            return FileResult(path, row.id, row.status, error=row.error)
        dest = Path(row.final_path)
        try:
            dest.parent.mkdir(parents=True, exist_ok=True)
            if path.exists():
                shutil.move(str(path), str(dest))
            elif not dest.exists():
                log.warning("missing file=%s id=%d (gone before it could be moved)", path, row.id)
        except OSError as exc:
            # The decision is committed; the move is retried by the next reconcile.
            log.error("move failed file=%s id=%d error=%s", path, row.id, exc)
            return FileResult(path, row.id, row.status, row.score, row.label, row.error)
        with self.store.write() as s:
            fresh = s.get(ImageRecord, record_id)
            assert fresh is not None
            fresh.moved_at = utcnow()
        return FileResult(path, row.id, row.status, row.score, row.label, row.error)

    def reconcile(self) -> int:
        """Finish the moves that a crash left owed. Returns how many rows it finished."""
        with self.store.read() as s:
            owed = list(
                s.scalars(
                    select(ImageRecord).where(
                        ImageRecord.moved_at.is_(None),
                        ImageRecord.status.in_(FINAL_STATUSES),
                    )
                )
            )
        for row in owed:
            self._move(Path(row.source_path), row.id)
        if owed:
            log.info("reconciled moves=%d", len(owed))
        return len(owed)


def ensure_folders(config: Config) -> None:
    """Create missing folders; an inbox that exists but cannot be read is a user mistake."""
    if config.inbox.exists() and not config.inbox.is_dir():
        raise NotADirectoryError(f"inbox is not a folder: {config.inbox}")
    if not config.inbox.exists():
        config.inbox.mkdir(parents=True)
        log.info("created inbox folder=%s", config.inbox)
    if not os.access(config.inbox, os.R_OK | os.X_OK):
        raise PermissionError(f"inbox folder is not readable: {config.inbox}")
    for folder in (config.processed, config.quarantine):
        folder.mkdir(parents=True, exist_ok=True)
