"""Worker heartbeats: `screen status` names the model each running worker serves, and tells a
killed worker (stale) from a running one, with real worker processes and a real database."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, select
from sqlalchemy.exc import OperationalError

from tests.conftest import REPO, make_mean_model, run_screen
from worker.app import status as get_status
from worker.config import ConfigError, load_config
from worker.records.connect import open_store
from worker.records.heartbeat import Heartbeat, running_workers
from worker.records.models import Base, ImageRecord, WorkerRecord
from worker.records.store import Store


def _screen(workdir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return run_screen(*args, config=workdir / "config.toml", timeout=120)


def _start_watch(workdir: Path, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "worker", "--config", str(workdir / "config.toml"), "watch", *args],
        cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )


def _wait_for(what: str, check: Callable[[], Any], proc: subprocess.Popen[str] | None = None,
              limit: float = 90.0) -> Any:
    """Poll until check() is truthy; the limit only stops a broken test from hanging."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"worker exited while waiting for {what}: {proc.stderr.read()}")
        try:
            found = check()
        except (ConfigError, OperationalError):  # the worker is still making its database
            found = None
        if found:
            return found
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def _workers(workdir: Path, state: str) -> list[dict[str, Any]]:
    info = get_status(load_config(workdir / "config.toml"))
    return [w for w in info["workers"] if w["state"] == state]


def test_status_names_the_served_model_and_finds_a_killed_worker_stale(workdir: Path) -> None:
    with (workdir / "config.toml").open("a") as fh:
        fh.write("heartbeat_seconds = 0.2\nheartbeat_stale_seconds = 1.5\n")
    other = make_mean_model(workdir / "other.onnx", version="other-model-7")

    proc = _start_watch(workdir, "--model", str(other))
    try:
        (live,) = _wait_for("a live worker", lambda: _workers(workdir, "live"), proc)
        assert live["pid"] == proc.pid
        assert live["model_path"] == str(other) and live["model_version"] == "other-model-7"
        out = _screen(workdir, "status", "--format", "json")
        info = json.loads(out.stdout)
        assert info["model"]["version"] == "test-mean-1"  # the config's, not what is served
        assert [w["model_version"] for w in info["workers"]] == ["other-model-7"]
        text = _screen(workdir, "status").stdout
        assert "workers: 1 live, 0 stale" in text and "other-model-7" in text
    finally:
        proc.kill()  # SIGKILL: no chance to mark itself stopped
        proc.wait()

    (stale,) = _wait_for("the killed worker to go stale", lambda: _workers(workdir, "stale"))
    assert stale["id"] == live["id"] and stale["model_version"] == "other-model-7"
    text = _screen(workdir, "status").stdout
    assert "workers: 0 live, 1 stale" in text and f"STALE worker {live['id']}" in text

    # A new worker on the same inbox holds the lock, so the killed one's row is closed.
    proc = _start_watch(workdir)
    try:
        (new,) = _wait_for("the new worker", lambda: _workers(workdir, "live"), proc)
        assert new["model_version"] == "test-mean-1"
        assert [w["id"] for w in get_status(load_config(workdir / "config.toml"))["workers"]] == [
            new["id"]
        ]
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    # A clean exit marks the worker stopped: it is neither live nor stale.
    assert get_status(load_config(workdir / "config.toml"))["workers"] == []
    assert "workers: none" in _screen(workdir, "status").stdout
    store = open_store(load_config(workdir / "config.toml"))
    try:
        with store.read() as s:
            reasons = {r.id: r.stop_reason for r in s.scalars(select(WorkerRecord))}
    finally:
        store.dispose()
    assert reasons[new["id"]] == "stopped"
    assert reasons[live["id"]] == f"gone (worker {new['id']} took the inbox)"


def test_a_beat_is_written_at_most_once_per_interval(workdir: Path) -> None:
    config = load_config(workdir / "config.toml")  # heartbeat_seconds 5 by default
    store = open_store(config, create=True)
    now = [100.0]
    beat = Heartbeat(store, config, "m.onnx", "v1", "watch", clock=lambda: now[0])

    def last_beat() -> Any:
        with store.read() as s:
            return s.scalar(select(WorkerRecord.last_beat_at))

    try:
        with beat.running():
            first = last_beat()
            for step in (0.5, 1.0, 4.9):
                now[0] = 100.0 + step
                beat.beat()
                assert last_beat() == first
            now[0] = 105.5
            beat.beat()
            assert last_beat() > first
            assert [w["state"] for w in running_workers(store, 30.0)] == ["live"]
        assert running_workers(store, 30.0) == []
    finally:
        store.dispose()


def test_a_database_from_the_previous_release_still_opens(tmp_path: Path) -> None:
    db = tmp_path / "old.db"
    engine = create_engine(f"sqlite:///{db}")
    old_tables = [Base.metadata.tables[n] for n in ("images", "events", "outcomes")]
    Base.metadata.create_all(engine, tables=old_tables)  # the schema before workers existed
    engine.dispose()
    with sqlite3.connect(db) as conn:
        conn.execute(
            "INSERT INTO images (filename, source_path, sha256, status, received_at, attempts) "
            "VALUES ('a.png', '/x/a.png', 'ab', 'scored', '2026-01-01 00:00:00', 1)"
        )
    make_mean_model(tmp_path / "m.onnx")
    (tmp_path / "c.toml").write_text(
        f"[model]\npath = 'm.onnx'\n[database]\nurl = 'sqlite:///{db.name}'\n"
    )
    proc = subprocess.run(
        [sys.executable, "-m", "worker", "--config", str(tmp_path / "c.toml"), "status",
         "--format", "json"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    assert info["counts"] == {"scored": 1} and info["workers"] == []
    store = Store(f"sqlite:///{db}")
    try:
        with store.read() as s:
            assert s.scalar(select(ImageRecord.filename)) == "a.png"
    finally:
        store.dispose()
    assert os.path.getsize(db) > 0
