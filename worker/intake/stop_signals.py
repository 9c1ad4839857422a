"""SIGTERM and SIGINT ask a running worker or receiver to stop after what it is doing."""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Any

log = logging.getLogger("mammo_screen")


@contextmanager
def stopping_on_signals(
    stop: Callable[[], None], doing: str = "finishing the current batch"
) -> Iterator[None]:
    """While the block runs, SIGTERM or SIGINT calls ``stop`` (main thread only: elsewhere
    Python cannot set handlers); the handlers it replaced are back after the block."""
    previous: dict[int, Any] = {}
    if threading.current_thread() is threading.main_thread():
        def handler(signum: int, _frame: FrameType | None) -> None:
            log.info("signal %s received: %s", signal.Signals(signum).name, doing)
            stop()

        for sig in (signal.SIGTERM, signal.SIGINT):
            previous[sig] = signal.signal(sig, handler)
    try:
        yield
    finally:
        for sig, replaced in previous.items():
            signal.signal(sig, replaced)
