"""Find inbox files and decide when each is completely written.

A file is handed on only after its size and mtime have held still for `settle_seconds`
across two looks. Nothing here imports more than the standard library: a starting worker
takes its first look at the inbox (:func:`look_at_inbox`) before it has imported SQLAlchemy
or loaded its model, so that the settle wait runs during start-up instead of after it.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from worker.threads import run_in_thread

if TYPE_CHECKING:
    from worker.config import Config

log = logging.getLogger("mammo_screen")

# Names that copy tools and editors use while a file is still being written.
_TEMP_SUFFIXES = (".part", ".partial", ".tmp", ".temp", ".crdownload", ".download", ".filepart")


def is_ignored_name(name: str) -> bool:
    lower = name.lower()
    return name.startswith((".", "~$", "~")) or lower.endswith(_TEMP_SUFFIXES)


def scan_inbox(inbox: Path, recursive: bool = True) -> Iterator[Path]:
    """Regular files under the inbox, skipping temporary names and not following symlinks."""
    try:
        entries = list(os.scandir(inbox))
    except OSError as exc:
        log.error("cannot scan folder=%s error=%s", inbox, exc)
        return
    for entry in sorted(entries, key=lambda e: e.name):
        if is_ignored_name(entry.name):
            continue
        if entry.is_symlink():
            continue
        if entry.is_dir(follow_symlinks=False):
            if recursive:
                yield from scan_inbox(Path(entry.path), recursive)
        elif entry.is_file(follow_symlinks=False):
            yield Path(entry.path)


@dataclass
class _Seen:
    size: int
    mtime_ns: int
    changed_at: float  # monotonic time of the last observed change
    first_seen: float


class SettleTracker:
    """Decides when a file has stopped changing. Pure bookkeeping over stat results."""

    def __init__(self, settle_seconds: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.settle_seconds = settle_seconds
        self.clock = clock
        self._seen: dict[Path, _Seen] = {}

    def __len__(self) -> int:
        return len(self._seen)

    def __contains__(self, path: object) -> bool:
        return path in self._seen

    def observe(self, path: Path) -> None:
        try:
            st = os.stat(path, follow_symlinks=False)
        except OSError:
            self._seen.pop(path, None)
            return
        now = self.clock()
        prev = self._seen.get(path)
        if prev is None:
            self._seen[path] = _Seen(st.st_size, st.st_mtime_ns, now, now)
        elif (prev.size, prev.mtime_ns) != (st.st_size, st.st_mtime_ns):
            self._seen[path] = _Seen(st.st_size, st.st_mtime_ns, now, prev.first_seen)

    def add_new(self, paths: Iterable[Path]) -> int:
        """Observe each path not yet waiting here (a waiting one keeps its settle clock);
        returns how many were new."""
        n = 0
        for path in paths:
            if path not in self._seen:
                self.observe(path)
                n += 1
        return n

    def ready(self, limit: int) -> list[Path]:
        """Up to `limit` files unchanged for settle_seconds (re-checked with a fresh stat)."""
        out: list[Path] = []
        for path in list(self._seen):
            self.observe(path)
            seen = self._seen.get(path)
            if seen is None:
                continue
            if self.clock() - seen.changed_at >= self.settle_seconds:
                out.append(path)
                if len(out) >= limit:
                    break
        return out

    def next_due(self) -> float | None:
        """Seconds until the first waiting file can have settled (0: one has), or None when
        no file is waiting: how long a caller with nothing to do may sleep."""
        if not self._seen:
            return None
        first = min(seen.changed_at for seen in self._seen.values())
        return max(0.0, first + self.settle_seconds - self.clock())

    def stale(self, after_seconds: float) -> list[Path]:
        """Files seen for longer than `after_seconds` that have not yet settled."""
        now = self.clock()
        return [
            p
            for p, s in self._seen.items()
            if now - s.first_seen > after_seconds and now - s.changed_at < self.settle_seconds
        ]

    def forget(self, path: Path) -> None:
        self._seen.pop(path, None)

    def pending(self) -> list[Path]:
        return list(self._seen)


def look_at_inbox(config: Config) -> Future[SettleTracker]:
    """Take the first look at the inbox in a thread, now: the files found start their settle
    wait while the worker imports the rest and loads its model, instead of after. The
    tracker goes to the worker's InboxWatcher, whose own first scan then finds them already
    waiting. Only reads: an inbox that is missing or unreadable gives an empty
    tracker here, and its one-line error comes from the worker's folder checks."""
    return run_in_thread(
        "inbox-look", _first_look, config.inbox, config.recursive, config.settle_seconds
    )


def _first_look(inbox: Path, recursive: bool, settle_seconds: float) -> SettleTracker:
    tracker = SettleTracker(settle_seconds)
    if inbox.is_dir() and os.access(inbox, os.R_OK | os.X_OK):
        tracker.add_new(scan_inbox(inbox, recursive))
    return tracker
