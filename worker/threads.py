"""One call in a thread of its own: start-up work that overlaps the rest of start-up."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

T = TypeVar("T")


def run_in_thread(name: str, fn: Callable[..., T], *args: Any) -> Future[T]:
    """Start ``fn(*args)`` in a thread named ``name``; its future returns or raises what the
    call does. The thread ends with the call (nothing waits for it at exit but the call)."""
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)
    try:
        return pool.submit(fn, *args)
    finally:
        pool.shutdown(wait=False)
