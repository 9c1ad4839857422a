"""One worker per inbox: an exclusive flock on a lock file inside the inbox.

A second `screen watch` or `screen process` on the same inbox refuses to start with a clear
message instead of racing the first for files. The kernel drops the lock when the process dies,
even under SIGKILL, so a crash never leaves a stale lock behind.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path
from types import TracebackType

LOCK_NAME = ".mammo-screen.lock"  # a dot-file: the inbox scan ignores it


class InboxBusyError(RuntimeError):
    pass


class InboxLock:
    def __init__(self, inbox: Path) -> None:
        self.path = inbox / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o660)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise InboxBusyError(
                f"another worker (pid {holder}) is already processing {self.path.parent}; "
                "stop it first, or give this one another inbox (with SQLite one worker owns "
                "an inbox; for several workers, use PostgreSQL: [database] url = "
                "\"postgresql+psycopg://...\")"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> InboxLock:
        self.acquire()
        return self

    def __exit__(
        self, *exc: tuple[type[BaseException] | None, BaseException | None, TracebackType | None]
    ) -> None:
        self.release()
