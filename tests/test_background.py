"""Running in the background: the supervisord config (machines without systemd) against a real
supervisord, and the systemd quick start of docs/installing.md against deploy/run-user.sh."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sqlalchemy.exc import OperationalError

from tests.conftest import REPO, write_mammo_like
from worker.app import status as get_status
from worker.config import ConfigError, load_config
from worker.records.connect import open_store
from worker.results.listing import result_rows

SUPERVISORD_CONF = REPO / "deploy" / "supervisord.conf"


def _wait_for(what: str, check: Callable[[], Any], limit: float = 120.0) -> Any:
    """Poll until check() is truthy; the limit only stops a broken test from hanging."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        try:
            found = check()
        except (ConfigError, OperationalError):  # no database yet, or it is being made
            found = None
        if found:
            return found
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def _generated_conf(workdir: Path, socket_dir: Path) -> Path:
    """The shipped config, pointed at the test's folder and this Python (no .venv there)."""
    text = SUPERVISORD_CONF.read_text()
    for old, new in (
        ("%(here)s/../.venv/bin/screen", f"{sys.executable} -m worker"),
        ("%(here)s/../data/supervisor.sock", str(socket_dir / "s.sock")),  # paths <108 bytes
        ("%(here)s/..", str(workdir)),
    ):
        assert old in text, f"deploy/supervisord.conf no longer contains {old}"
        text = text.replace(old, new)
    conf = workdir / "supervisord.conf"
    conf.write_text(text)
    return conf


def _drop(inbox: Path, name: str, seed: int) -> None:
    tmp = write_mammo_like(inbox / f".{name}", seed=seed)  # dot-files are ignored until renamed
    tmp.rename(inbox / name)


def test_supervisord_keeps_the_worker_running(workdir: Path) -> None:
    with (workdir / "config.toml").open("a") as fh:
        # The receiver that supervisord.conf also starts takes any free port (not 11112).
        fh.write("heartbeat_seconds = 0.2\n[receive]\nport = 0\n")
    (workdir / "data").mkdir()
    socket_dir = Path(tempfile.mkdtemp(prefix="sv"))
    conf = _generated_conf(workdir, socket_dir)
    config = load_config(workdir / "config.toml")
    env = {**os.environ, "PYTHONPATH": str(REPO)}

    def live() -> list[dict[str, Any]]:
        return [w for w in get_status(config)["workers"] if w["state"] == "live"]

    def scored(name: str) -> bool:
        store = open_store(config)
        try:
            return any(r["filename"] == name and r["status"] == "scored"
                       for r in result_rows(store))
        finally:
            store.dispose()

    supervisord = subprocess.Popen(
        [sys.executable, "-m", "supervisor.supervisord", "-n", "-c", str(conf)],
        cwd=workdir, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        (first,) = _wait_for("the worker under supervisord", live)
        first_pid = first["pid"]

        def ctl_status() -> str:
            return subprocess.run(
                [sys.executable, "-m", "supervisor.supervisorctl", "-c", str(conf), "status"],
                cwd=workdir, env=env, capture_output=True, text=True, timeout=60,
            ).stdout

        # supervisorctl, with the same file, sees the worker RUNNING once startsecs have passed.
        _wait_for(
            "supervisorctl to report RUNNING",
            lambda: re.search(rf"mammo-screen\s+RUNNING\s+pid {first_pid}\b", ctl_status()),
        )
        _drop(config.inbox, "one.png", seed=1)
        _wait_for("one.png scored", lambda: scored("one.png"))

        os.kill(first_pid, signal.SIGKILL)
        (second,) = _wait_for(
            "the worker restarted", lambda: [w for w in live() if w["pid"] != first_pid]
        )
        _drop(config.inbox, "two.png", seed=2)
        _wait_for("two.png scored by the restarted worker", lambda: scored("two.png"))
        assert second["model_version"] == first["model_version"] == "test-mean-1"

        supervisord.send_signal(signal.SIGTERM)  # stops the worker with SIGTERM, then itself
        assert supervisord.wait(timeout=150) == 0
        assert get_status(config)["workers"] == [], "the worker did not stop cleanly"
        assert "watching inbox" in (workdir / "data" / "mammo-screen.log").read_text()
    finally:
        if supervisord.poll() is None:
            supervisord.kill()
            supervisord.wait()
        for w in get_status(config)["workers"]:  # never leave a worker behind
            if w["state"] == "live":
                with contextlib.suppress(ProcessLookupError):
                    os.kill(w["pid"], signal.SIGKILL)
        shutil.rmtree(socket_dir, ignore_errors=True)


def _command(text: str) -> str:
    """The `systemd-run ...` command in a shell text, continuation lines joined."""
    joined = re.sub(r"\\\n\s*", " ", text)
    match = re.search(r"^\s*(?:exec\s+)?(systemd-run .*)$", joined, re.MULTILINE)
    assert match, "no systemd-run command found"
    return " ".join(match.group(1).split())


def test_readme_quick_start_is_deploy_run_user_sh() -> None:
    readme = (REPO / "docs" / "installing.md").read_text()
    section = readme[readme.index("## Running in the background"):]
    script = (REPO / "deploy" / "run-user.sh").read_text()
    assert _command(section) == _command(script)
    assert "loginctl enable-linger" in section
    assert "deploy/supervisord.conf" in section
