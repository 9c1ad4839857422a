"""Crash points for fault-injection tests: the process dies at a named step, as under SIGKILL.

Set MAMMO_SCREEN_CRASH_AT=NAME (or NAME:N to die at the N-th time that step is reached).
Unset, which is always the case in service, a crash point is a dictionary lookup.
"""

from __future__ import annotations

import os

ENV = "MAMMO_SCREEN_CRASH_AT"
POINTS = (
    "after_receive",  # row committed as received, nothing scored
    "after_preprocess",  # preprocessed and scored (scoring thread), decisions not committed
    "after_decision",  # score/quarantine committed, file not moved
    "after_move",  # file moved, moved_at not committed
)
# Sending results to a PACS (worker/results/pacs_send.py; tests/test_pacs.py).
SEND_POINTS = (
    "after_result_built",  # a DICOM result's file written, not recorded as built
    "after_result_sent",  # the PACS accepted a result, not recorded as sent
)

_target, _, _nth = os.environ.get(ENV, "").partition(":")
_count = int(_nth) if _nth.isdigit() else 1
_hits: dict[str, int] = {}


def crash_point(name: str) -> None:
    if name != _target:
        return
    _hits[name] = _hits.get(name, 0) + 1
    if _hits[name] >= _count:
        os._exit(137)  # no cleanup, no flush: what SIGKILL would leave
