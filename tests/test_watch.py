"""A real watchdog observer on a real inbox: files dropped while it runs get recorded."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.conftest import REPO, watching, write_mammo_like
from worker.app import open_worker
from worker.config import Config
from worker.intake.inbox import SettleTracker


def _wait_for_rows(db: str, n: int, timeout: float = 20.0) -> list[tuple]:
    deadline = time.monotonic() + timeout
    rows: list[tuple] = []
    while time.monotonic() < deadline:
        if Path(db).exists():
            with sqlite3.connect(db) as con:
                try:
                    rows = con.execute(
                        "SELECT filename, status, moved_at FROM images ORDER BY id"
                    ).fetchall()
                except sqlite3.OperationalError:
                    rows = []
            if len(rows) >= n and all(r[2] for r in rows):
                return rows
        time.sleep(0.1)
    return rows


@pytest.mark.parametrize("polling", [False, True])
def test_watcher_records_dropped_files(config: Config, polling: bool) -> None:
    write_mammo_like(config.inbox / "before.png")  # present at start: found by the scan
    worker = open_worker(config, polling=polling)
    with watching(worker) as thread:
        # copy-then-rename, the recommended way to drop a file
        tmp = write_mammo_like(config.inbox / "during.png.part", seed=2)
        tmp.rename(config.inbox / "during.png")
        write_mammo_like(config.inbox / "direct.png", seed=3)
        (config.inbox / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0garbage")
        db = config.database_url.removeprefix("sqlite:///")
        rows = _wait_for_rows(db, 4)
    assert not thread.is_alive()
    assert sorted((r[0], r[1]) for r in rows) == [
        ("before.png", "scored"),
        ("broken.jpg", "quarantined"),
        ("direct.png", "scored"),
        ("during.png", "scored"),
    ]


def test_hints_are_looked_at_once_per_pass(config: Config,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """Each file dropped sends several events, and its folder a "modified" one for each:
    one pass looks at each path once, so a burst of N files no longer costs N scans of the
    inbox (300 files: 7 of the main thread's 18 s went to them)."""
    import worker.intake.watcher as watcher_module

    for i in range(3):
        write_mammo_like(config.inbox / f"{i}.png", seed=i)
    scans: list[Path] = []
    real_scan = watcher_module.scan_inbox

    def counted_scan(folder: Path, recursive: bool):  # type: ignore[no-untyped-def]
        scans.append(folder)
        return real_scan(folder, recursive)

    monkeypatch.setattr(watcher_module, "scan_inbox", counted_scan)
    worker = open_worker(config)
    try:
        watcher = worker.watcher
        for i in range(3):  # created, modified, closed, and the folder's "modified" each time
            for _ in range(3):
                watcher.hints.put(config.inbox / f"{i}.png")
            watcher.hints.put(config.inbox)
        watcher._drain_hints()
        assert scans == [config.inbox]
        assert sorted(p.name for p in watcher.tracker.pending()) == ["0.png", "1.png", "2.png"]
    finally:
        worker.close()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="inotify is Linux's")
def test_watching_shortens_watchdogs_move_pairing_wait(config: Config) -> None:
    """watchdog holds every inotify event behind an unpaired "moved from" (each file the
    worker moves out of the inbox is one) while it waits for the "moved to": 0.5 s by default,
    which new files used to wait behind. A watch shortens it; this fails if a watchdog upgrade
    moves the knob (then the import in `_pair_moves_quickly` finds nothing to set)."""
    from watchdog.observers.inotify_move_event_grouper import InotifyMoveEventGrouper

    worker = open_worker(config)
    with watching(worker):
        assert InotifyMoveEventGrouper().delay <= 0.05


def test_a_folder_moved_in_is_found_without_a_rescan(config: Config, tmp_path: Path) -> None:
    """A study folder moved into the watched inbox is found when it appears, not at the next
    periodic rescan (here an hour away)."""
    import dataclasses

    study = tmp_path / "staging" / "study-1"
    write_mammo_like(study / "L_CC.png", seed=4)
    write_mammo_like(study / "R_CC.png", seed=5)
    worker = open_worker(dataclasses.replace(config, rescan_seconds=3600.0))
    with watching(worker):
        time.sleep(0.5)  # past the first pass's scan
        study.rename(config.inbox / "study-1")
        rows = _wait_for_rows(config.database_url.removeprefix("sqlite:///"), 2, timeout=15)
    assert sorted((r[0], r[1]) for r in rows) == [("study-1/L_CC.png", "scored"),
                                                  ("study-1/R_CC.png", "scored")]


def test_slow_writer_is_not_read_early(config: Config) -> None:
    """A file written in pieces over longer than settle_seconds is read once, complete.

    Pauses between pieces (0.1 s) stay well under settle_seconds (1 s), as the default allows,
    so a loaded machine delaying the writer does not make the test flaky."""
    import dataclasses

    config = dataclasses.replace(config, settle_seconds=1.0)
    worker = open_worker(config)
    thread = threading.Thread(target=worker.watcher.watch)
    thread.start()
    try:
        data = write_mammo_like(config.inbox.parent / "src.png", size=(300, 300)).read_bytes()
        target = config.inbox / "slow.png"
        with target.open("wb") as fh:
            for i in range(0, len(data), len(data) // 12 + 1):
                fh.write(data[i : i + len(data) // 12 + 1])
                fh.flush()
                os.fsync(fh.fileno())
                time.sleep(0.1)
        rows = _wait_for_rows(config.database_url.removeprefix("sqlite:///"), 1)
    finally:
        worker.watcher.stop()
        thread.join(15)
        worker.close()
    assert rows and rows[0][:2] == ("slow.png", "scored")


def test_settle_tracker_waits_for_stillness(tmp_path: Path) -> None:
    now = [0.0]
    tracker = SettleTracker(1.0, clock=lambda: now[0])
    p = tmp_path / "f"
    p.write_bytes(b"a")
    tracker.observe(p)
    assert tracker.ready(10) == []
    now[0] = 0.6
    p.write_bytes(b"ab")  # grows: the clock restarts
    assert tracker.ready(10) == []
    now[0] = 1.5
    assert tracker.ready(10) == []
    now[0] = 1.7
    assert tracker.ready(10) == [p]
    p.unlink()
    assert tracker.ready(10) == [] and len(tracker) == 0


def test_next_due_is_the_time_until_the_first_file_can_have_settled(tmp_path: Path) -> None:
    now = [0.0]
    tracker = SettleTracker(1.0, clock=lambda: now[0])
    assert tracker.next_due() is None  # nothing waiting
    a, b = tmp_path / "a", tmp_path / "b"
    a.write_bytes(b"a")
    tracker.observe(a)
    now[0] = 0.4
    b.write_bytes(b"b")
    tracker.observe(b)
    assert tracker.next_due() == pytest.approx(0.6)
    now[0] = 1.2
    assert tracker.next_due() == 0.0
    assert tracker.ready(10) == [a]
    tracker.forget(a)
    assert tracker.next_due() == pytest.approx(0.2)


def test_an_idle_pass_waits_until_the_first_file_can_have_settled(config: Config) -> None:
    """Not a fixed poll: a file is looked at again just after its settle time is up."""
    worker = open_worker(config)  # settle_seconds 0.2
    try:
        watcher = worker.watcher
        assert watcher._idle_wait(0.25) == pytest.approx(0.1)  # none waiting: half the settle
        now = [0.0]
        watcher.tracker = SettleTracker(config.settle_seconds, clock=lambda: now[0])
        write_mammo_like(config.inbox / "a.png", seed=1)
        watcher.tracker.observe(config.inbox / "a.png")
        now[0] = 0.05
        assert watcher._idle_wait(0.25) == pytest.approx(0.1)
        now[0] = 0.16
        assert watcher._idle_wait(0.25) == pytest.approx(0.045)
        now[0] = 0.3  # settled, and not taken (a retry): the poll, not a spin
        assert watcher._idle_wait(0.25) == pytest.approx(0.1)
    finally:
        worker.close()


def test_sigterm_stops_the_watch_command_cleanly(workdir: Path) -> None:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "worker", "--config", str(workdir / "config.toml"), "watch"],
        cwd=REPO,
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        db = str(workdir / "screen.db")
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not Path(db).exists():
            assert proc.poll() is None, proc.communicate()[1]
            time.sleep(0.1)
        write_mammo_like(workdir / "inbox" / "x.png")
        rows = _wait_for_rows(db, 1)
        assert rows and rows[0][1] == "scored"
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert "SIGTERM" in err and "stopped" in err
    assert "Traceback" not in err
