"""SIGTERM and SIGINT ask a running worker or receiver to stop after what it is doing."""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable
from types import FrameType
from typing import Any

log = logging.getLogger("mammo_screen")


def install_stop_handlers(
    stop: Callable[[], None], doing: str = "finishing the current batch"
) -> dict[int, Any]:
    """Call ``stop`` on SIGTERM or SIGINT (main thread only); returns the handlers replaced."""
    previous: dict[int, Any] = {}
    if threading.current_thread() is not threading.main_thread():
        return previous

    def handler(signum: int, _frame: FrameType | None) -> None:
        log.info("signal %s received: %s", signal.Signals(signum).name, doing)
        stop()

    for sig in (signal.SIGTERM, signal.SIGINT):
        previous[sig] = signal.signal(sig, handler)
    return previous
