"""Score a batch of settled inbox files and record each one's fate exactly once.

Order of work for a batch, each step durable before the next:
1. read bytes, hash them, and record (or find, after a crash) the file's row: `received`;
2. preprocess and score the new ones, then commit every outcome with its planned destination;
3. move each file, then commit `moved_at`.
A crash between any two steps leaves a row that the next run finishes: `reconcile()` owes the
moves, and the inbox scan finds the rest. Every step is also written to the `events` table.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy import select
from sqlalchemy.orm import Session

from worker.config import Config, MissingPathError
from worker.dicom import DicomPolicy
from worker.exams import join_exam
from worker.faults import crash_point
from worker.identity import IdentityReader
from worker.paths import display_name, path_from_db, path_to_db
from worker.preprocess import ImageError, preprocess_bytes
from worker.scorer import Scorer
from worker.store import (
    DUPLICATE,
    FINAL_STATUSES,
    QUARANTINED,
    RECEIVED,
    SCORED,
    Event,
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


def _event(s: Session, image_id: int | None, kind: str, detail: str | None = None) -> None:
    s.add(Event(image_id=image_id, kind=kind, detail=detail, at=utcnow()))


class Pipeline:
    def __init__(self, config: Config, store: Store, scorer: Scorer) -> None:
        self.config = config
        self.store = store
        self.scorer = scorer
        pre = scorer.metadata.preprocess
        # The model decides the preprocessing; the config may only tighten the size limit.
        self.settings = dataclasses.replace(pre, max_pixels=min(pre.max_pixels, config.max_pixels))
        self.dicom_policy = DicomPolicy(
            allowed_modalities=frozenset(config.dicom_allowed_modalities),
            allow_for_processing=config.dicom_allow_for_processing,
        )
        # Read failures of files that have no row yet: path -> count.
        self.read_failures: dict[Path, int] = {}
        self.identity = IdentityReader(config.filename_pattern, config.sidecar_csv)

    # ---- step 1: record receipt ------------------------------------------------------------

    def _receive(self, path: Path, data: bytes) -> ImageRecord:
        """Find the file's unfinished row (a restart) or insert a new `received` one.

        Each receipt of an undecided row counts an attempt: a file that crashes the worker
        every time (a decoder bug) is quarantined after max_attempts instead of looping.
        """
        digest = _sha256(data)
        source = path_to_db(path)
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
                s.flush()
                _event(s, row.id, "received", f"{len(data)} bytes")
            if row.status == RECEIVED:
                row.attempts += 1
                if row.attempts > 1:
                    _event(s, row.id, "retry", f"attempt {row.attempts}")
                if row.attempts > self.config.max_attempts:
                    self._decide(
                        s,
                        row,
                        QUARANTINED,
                        error=f"gave up after {row.attempts - 1} attempts "
                        f"(last: {row.error or 'worker stopped while handling it'})",
                    )
            s.flush()
            s.expunge(row)
            return row

    def _find_original(self, record: ImageRecord) -> ImageRecord | None:
        """The earliest other row with the same content (scored, pending or quarantined)."""
        with self.store.read() as s:
            return s.scalars(
                select(ImageRecord)
                .where(
                    ImageRecord.sha256 == record.sha256,
                    ImageRecord.status.in_((SCORED, RECEIVED, QUARANTINED)),
                    ImageRecord.id < record.id,
                )
                .order_by(ImageRecord.id)
            ).first()

    # ---- the batch -------------------------------------------------------------------------

    def process(self, paths: list[Path]) -> list[FileResult]:
        received: list[tuple[Path, ImageRecord, bytes]] = []
        for path in paths:
            data = self._read(path)
            if data is None:
                continue
            received.append((path, self._receive(path, data), data))
            crash_point("after_receive")

        to_score: list[tuple[ImageRecord, np.ndarray]] = []
        decided: dict[int, dict[str, Any]] = {}
        identities: dict[int, dict[str, Any]] = {}
        for _, record, data in received:
            if record.status in FINAL_STATUSES:
                continue  # decided before a restart: only the move is owed
            # Who and which breast, recorded with the decision whatever it is.
            ident = self.identity.identify(record.filename, data).as_columns()
            original = self._find_original(record)
            if original is not None:
                decided[record.id] = {"status": DUPLICATE, "duplicate_of": original.id, **ident}
                continue
            identities[record.id] = ident
            try:
                to_score.append((record, preprocess_bytes(data, self.settings, self.dicom_policy)))
            except ImageError as exc:
                decided[record.id] = {"status": QUARANTINED, "error": str(exc), **ident}
            except Exception as exc:  # a decoder bug must not stop the worker
                decided[record.id] = {
                    "status": QUARANTINED,
                    "error": f"preprocessing failed: {exc!r}",
                    **ident,
                }
        crash_point("after_preprocess")

        for rid, fields in self._score(to_score).items():
            decided[rid] = {**fields, **identities[rid]}
        self._commit_decisions(decided)
        crash_point("after_decision")
        return [self._move(path, record.id, data) for path, record, data in received]

    def _read(self, path: Path) -> bytes | None:
        try:
            before = os.stat(path)
            data = path.read_bytes()
            after = os.stat(path)
            if (before.st_size, before.st_mtime_ns) != (after.st_size, after.st_mtime_ns) or (
                len(data) != after.st_size
            ):
                # Still being written after all: leave it for the next look, record nothing.
                log.info("changed while read file=%s (will retry)", display_name(path))
                return None
        except (FileNotFoundError, IsADirectoryError):
            log.info("vanished file=%s (gone before it was read)", display_name(path))
            self.read_failures.pop(path, None)
            return None
        except OSError as exc:
            n = self.read_failures.get(path, 0) + 1
            self.read_failures[path] = n
            if n >= self.config.max_attempts:
                self._quarantine_unreadable(path, exc, n)
            else:
                log.warning(
                    "unreadable file=%s attempt=%d error=%s (will retry)",
                    display_name(path),
                    n,
                    exc.strerror,
                )
            return None
        self.read_failures.pop(path, None)
        return data

    def _quarantine_unreadable(self, path: Path, exc: OSError, attempts: int) -> None:
        """A file that cannot even be read: record it without a hash, then move it aside."""
        self.read_failures.pop(path, None)
        with self.store.write() as s:
            row = ImageRecord(
                filename=relative_name(path, self.config.inbox),
                source_path=path_to_db(path),
                sha256=None,
                size_bytes=None,
                status=RECEIVED,
                attempts=attempts,
                received_at=utcnow(),
            )
            s.add(row)
            s.flush()
            self._decide(
                s, row, QUARANTINED, error=f"unreadable after {attempts} attempts: {exc.strerror}"
            )
            rid = row.id
        self._move(path, rid, None)

    def _score(self, items: list[tuple[ImageRecord, np.ndarray]]) -> dict[int, dict[str, Any]]:
        """Score in one ONNX Runtime call; if the batch fails, one by one to isolate the cause."""
        if not items:
            return {}
        try:
            scores = list(self.scorer.score_batch([img for _, img in items]))
        except Exception as exc:
            if len(items) == 1:
                log.error("scoring failed file=%s error=%r", items[0][0].filename, exc)
                return {}  # stays `received`: retried, then quarantined after max_attempts
            out: dict[int, dict[str, Any]] = {}
            for item in items:
                out.update(self._score([item]))
            return out
        now = utcnow()
        return {
            record.id: {
                "status": SCORED,
                "score": float(score),
                "label": self.scorer.label_for(float(score)),
                "threshold": self.scorer.threshold,
                "model_version": self.scorer.version,
                "scored_at": now,
            }
            for (record, _), score in zip(items, scores, strict=True)
        }

    def _decide(self, s: Session, row: ImageRecord, status: str, **fields: Any) -> None:
        """Set a final status and the planned destination, inside the caller's transaction."""
        row.status = status
        for key, value in fields.items():
            setattr(row, key, value)
        folder = self.config.quarantine if status == QUARANTINED else self.config.processed
        rel = path_from_db(row.source_path)
        try:
            rel = rel.relative_to(self.config.inbox)
        except ValueError:
            rel = Path(rel.name)
        row.final_path = path_to_db(_unique_destination(folder, rel, row.id))
        detail = (
            row.error
            if status == QUARANTINED
            else (f"score={row.score:.4f} label={row.label}" if row.score is not None else None)
        )
        _event(s, row.id, status, detail)
        log_fn = log.warning if status == QUARANTINED else log.info
        log_fn(
            "%s file=%s id=%d score=%s label=%s%s",
            status,
            row.filename,
            row.id,
            "-" if row.score is None else f"{row.score:.4f}",
            row.label or "-",
            f" reason={row.error}" if row.error else "",
        )

    def _commit_decisions(self, decided: dict[int, dict[str, Any]]) -> None:
        if not decided:
            return
        with self.store.write() as s:
            rows = {
                r.id: r for r in s.scalars(select(ImageRecord).where(ImageRecord.id.in_(decided)))
            }
            # Originals first, so that a duplicate in the same batch can copy their result.
            for rid in sorted(decided):
                row, fields = rows[rid], dict(decided[rid])
                if row.status in FINAL_STATUSES:
                    continue
                status = fields.pop("status")
                if status == DUPLICATE:
                    original = rows.get(fields["duplicate_of"]) or s.get(
                        ImageRecord, fields["duplicate_of"]
                    )
                    if original is not None and original.status == QUARANTINED:
                        status = QUARANTINED
                        fields["error"] = (
                            f"duplicate of #{original.id}, quarantined: {original.error}"
                        )
                    elif original is not None and original.status == SCORED:
                        fields.update(
                            score=original.score,
                            label=original.label,
                            threshold=original.threshold,
                            model_version=original.model_version,
                            scored_at=original.scored_at,
                        )
                self._decide(s, row, status, **fields)
                # A scored image joins its exam in the same commit as its score.
                join_exam(s, row, utcnow())

    # ---- step 3: move, then record the move ------------------------------------------------

    def _move(self, path: Path, record_id: int, data: bytes | None) -> FileResult:
        with self.store.read() as s:
            row = s.get(ImageRecord, record_id)
            assert row is not None
        result = FileResult(path, row.id, row.status, row.score, row.label, row.error)
        if row.status not in FINAL_STATUSES or row.final_path is None:
            return result
        dest = path_from_db(row.final_path)
        note = "moved"
        try:
            if (
                path.exists()
                and row.sha256 is not None
                and not _same_content(path, row.sha256, data)
            ):
                # Replaced under us after it was read: the new content is a new file, which
                # the scan will find; the old content is gone, so there is nothing to move.
                note = "replaced"
            elif path.exists():
                dest.parent.mkdir(parents=True, exist_ok=True)
                shutil.move(str(path), str(dest))
                crash_point("after_move")
            elif not dest.exists():
                note = "missing"
        except OSError as exc:
            # The decision is committed; the move is owed and retried by reconcile().
            level = log.error if exc.errno == errno.ENOSPC else log.warning
            level(
                "move failed file=%s id=%d error=%s (will retry)",
                row.filename,
                row.id,
                exc.strerror,
            )
            return result
        with self.store.write() as s:
            fresh = s.get(ImageRecord, record_id)
            assert fresh is not None
            if fresh.moved_at is None:
                fresh.moved_at = utcnow()
                if note != "moved":
                    fresh.final_path = None
                    _event(
                        s,
                        fresh.id,
                        note,
                        "file changed in the inbox before it could be moved"
                        if note == "replaced"
                        else "file gone before it could be moved",
                    )
                else:
                    _event(s, fresh.id, "moved", display_name(dest))
        if note != "moved":
            log.warning("%s file=%s id=%d (not moved)", note, row.filename, row.id)
        return result

    def reconcile(self) -> int:
        """Finish the moves that a crash or a full disk left owed. Returns how many."""
        with self.store.read() as s:
            owed = list(
                s.scalars(
                    select(ImageRecord).where(
                        ImageRecord.moved_at.is_(None), ImageRecord.status.in_(FINAL_STATUSES)
                    )
                )
            )
        for row in owed:
            self._move(path_from_db(row.source_path), row.id, None)
        if owed:
            log.info("reconciled moves=%d", len(owed))
        return len(owed)


def _same_content(path: Path, sha256: str, data: bytes | None) -> bool:
    try:
        current = path.read_bytes()
    except OSError:
        return False
    if data is not None and len(current) == len(data):
        return current == data
    return _sha256(current) == sha256


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
