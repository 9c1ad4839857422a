"""SIGTERM and SIGINT stop a running worker or receiver only while it runs: the handlers they
replaced are back afterwards (a test process, or a caller embedding the API, keeps its own)."""

from __future__ import annotations

import os
import signal
import threading

from worker.intake.stop_signals import stopping_on_signals


def test_a_real_sigterm_stops_the_block_and_the_old_handlers_come_back() -> None:
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    stopped = threading.Event()
    with stopping_on_signals(stopped.set):
        os.kill(os.getpid(), signal.SIGTERM)
        assert stopped.wait(5)
        assert signal.getsignal(signal.SIGINT) is not before[signal.SIGINT]
    assert {sig: signal.getsignal(sig) for sig in before} == before


def test_outside_the_main_thread_nothing_is_replaced() -> None:
    before = signal.getsignal(signal.SIGTERM)
    seen = []

    def run() -> None:
        with stopping_on_signals(lambda: None):
            seen.append(signal.getsignal(signal.SIGTERM))

    thread = threading.Thread(target=run)
    thread.start()
    thread.join(5)
    assert seen == [before]
