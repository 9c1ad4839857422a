"""Paths as stored in the database: reversible even for names that are not valid UTF-8.

POSIX file names are bytes. Python hands undecodable bytes over as lone surrogates, which
SQLite refuses; such a path is stored as ``b64:`` plus the base64 of its bytes (a stored path
is otherwise absolute, so the prefix cannot be confused with a real one).
"""

from __future__ import annotations

import base64
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from worker.records.models import ImageRecord

_PREFIX = "b64:"
_UNSAFE = re.compile(r"[^0-9A-Za-z._-]")


def path_to_db(path: Path | str) -> str:
    raw = os.fsencode(path)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return _PREFIX + base64.b64encode(raw).decode("ascii")


def path_from_db(text: str) -> Path:
    if text.startswith(_PREFIX):
        return Path(os.fsdecode(base64.b64decode(text[len(_PREFIX) :])))
    return Path(text)


def display_name(path: Path | str) -> str:
    """Readable text for logs and the `filename` column: bad bytes shown as \\xNN."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def current_file(record: ImageRecord) -> Path:
    """Where an image's file is now: its planned destination once moved, else the inbox."""
    if record.moved_at is not None and record.final_path:
        return path_from_db(record.final_path)
    return path_from_db(record.source_path)


def safe_stem(text: str, fallback: str) -> str:
    """A file-name stem from a sender's text (a UID, a study UID): never a path, never a
    dot-file (the watcher ignores those), at most 64 characters; ``fallback`` when nothing is
    left."""
    return _UNSAFE.sub("_", text)[:64].lstrip(".") or fallback
