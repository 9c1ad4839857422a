"""Start-up cost: `screen process` and `screen watch` import only what they use (issue 11's
cold start). pydicom waits for the first DICOM file and Alembic for a migration to run; the
CLI itself (`screen --help`) waits for neither ONNX Runtime nor SQLAlchemy. A module-level
import that brings one back fails here rather than slowing every start."""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import REPO, write_mammo_like
from tests.dicom_files import dicom_bytes, mammo_like
from worker.config import Config

# SQLAlchemy's PostgreSQL dialect: only for a PostgreSQL database (worker.records.models).
LAZY = ("pydicom", "alembic", "sqlalchemy.dialects.postgresql")

# `screen ARGS` in this process, then the lazy modules it imported, as JSON on stdout.
_RUN_AND_LIST = """
import json, runpy, sys
sys.argv = ["screen", *sys.argv[1:]]
try:
    runpy.run_module("worker", run_name="__main__")
except SystemExit as exit:
    code = exit.code
print(json.dumps({"code": code, "imported": [m for m in %r if m in sys.modules]}))
"""


def _imported_by(workdir: Path, *args: str) -> list[str]:
    proc = subprocess.run(
        [sys.executable, "-c", _RUN_AND_LIST % (LAZY,), "--config",
         str(workdir / "config.toml"), *args],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["code"] in (0, None), proc.stderr
    return out["imported"]


def test_process_imports_neither_pydicom_nor_alembic(workdir: Path) -> None:
    write_mammo_like(workdir / "inbox" / "a.png", seed=1)
    assert _imported_by(workdir, "process", "--timeout", "10") == []  # a new database
    write_mammo_like(workdir / "inbox" / "b.png", seed=2)
    assert _imported_by(workdir, "process", "--timeout", "10") == []  # a current one
    assert sorted(p.name for p in (workdir / "processed").iterdir()) == ["a.png", "b.png"]


def test_pydicom_comes_with_the_first_dicom_file(workdir: Path) -> None:
    """The check above can fail: the same run with a DICOM file in the inbox imports it."""
    (workdir / "inbox" / "a.dcm").write_bytes(dicom_bytes(mammo_like()))
    assert _imported_by(workdir, "process", "--timeout", "10") == ["pydicom"]
    assert (workdir / "processed" / "a.dcm").exists()


def test_the_cli_alone_imports_neither_onnx_runtime_nor_sqlalchemy() -> None:
    """`screen --help` (and every command's parsing) loads only the CLI and the config: a
    starting worker looks at its inbox before NumPy and OpenCV are imported too."""
    proc = subprocess.run(
        [sys.executable, "-c", "import json, sys, worker.cli; print(json.dumps("
         "[m for m in ('onnxruntime', 'sqlalchemy', 'pydicom', 'alembic', 'numpy', 'cv2') "
         "if m in sys.modules]))"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == []
    help_text = subprocess.run([sys.executable, "-m", "worker", "--help"], cwd=REPO,
                               capture_output=True, text=True, timeout=120)
    assert help_text.returncode == 0 and "process" in help_text.stdout



# `screen ARGS` with a hook that notes, when SQLAlchemy's import begins, whether the model has
# begun loading (its thread running, or ONNX Runtime already imported by it), and, when the
# inbox is first looked at, whether SQLAlchemy had been imported.
_START_ORDER = """
import json, runpy, sys, threading
import worker.intake.inbox
seen = {}
class Hook:
    def find_spec(self, name, path=None, target=None):
        if name == "sqlalchemy" and "model_loading" not in seen:
            seen["model_loading"] = "onnxruntime" in sys.modules or any(
                t.name.startswith("model-load") for t in threading.enumerate())
        return None
sys.meta_path.insert(0, Hook())
look = worker.intake.inbox.look_at_inbox
def noted_look(config):
    seen.setdefault("inbox_looked_at_before_sqlalchemy", "sqlalchemy" not in sys.modules)
    return look(config)
worker.intake.inbox.look_at_inbox = noted_look
sys.argv = ["screen", *sys.argv[1:]]
try:
    runpy.run_module("worker", run_name="__main__")
except SystemExit as exit:
    code = exit.code
print(json.dumps({"code": code, **seen}))
"""


def test_the_inbox_look_and_the_model_start_before_the_database_layer(workdir: Path) -> None:
    """`screen process` takes its first look at the inbox (the settle wait starts) and starts
    loading its model (ONNX Runtime's import and session: ~0.3 s) in threads before it imports
    SQLAlchemy (~0.35 s), so that all three overlap at start-up."""
    write_mammo_like(workdir / "inbox" / "a.png", seed=1)
    proc = subprocess.run(
        [sys.executable, "-c", _START_ORDER, "--config", str(workdir / "config.toml"),
         "process", "--timeout", "10"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["code"] in (0, None), proc.stderr
    assert out["model_loading"] is True
    assert out["inbox_looked_at_before_sqlalchemy"] is True
    assert (workdir / "processed" / "a.png").exists()


def test_process_hands_on_the_files_its_first_look_saw_settle(workdir: Path) -> None:
    """The worker uses the start-up look's tracker: a file it saw, still since for
    settle_seconds, is taken without a second wait (here 30 s, against a 3 s timeout)."""
    from worker.app import run_process
    from worker.config import load_config
    from worker.intake.inbox import SettleTracker
    from worker.records.store import ImageStatus

    text = (workdir / "config.toml").read_text()
    slow = text.replace("settle_seconds = 0.2", "settle_seconds = 30")
    (workdir / "config.toml").write_text(slow)
    config = load_config(workdir / "config.toml")
    write_mammo_like(config.inbox / "a.png", seed=1)
    now = [0.0]
    tracker = SettleTracker(config.settle_seconds, clock=lambda: now[0])
    tracker.observe(config.inbox / "a.png")
    now[0] = 31.0
    looked: Future[SettleTracker] = Future()
    looked.set_result(tracker)
    outcome = run_process(config, timeout=3, looked=looked)
    assert [(r.path.name, r.status) for r in outcome.files] == [("a.png", ImageStatus.SCORED)]


def test_the_first_look_only_reads(workdir: Path, caplog: pytest.LogCaptureFixture) -> None:
    """It finds what the worker's own scan would; a missing inbox gives an empty tracker and
    no message (the worker's folder check says it, in one line), and nothing is created."""
    from worker.config import load_config
    from worker.intake.inbox import look_at_inbox

    config = load_config(workdir / "config.toml")
    write_mammo_like(config.inbox / "a.png", seed=1)
    (config.inbox / "sub").mkdir()
    write_mammo_like(config.inbox / "sub" / "c.png", seed=2)
    (config.inbox / ".hidden.png").write_bytes(b"x")
    (config.inbox / "b.png.part").write_bytes(b"x")
    pending = look_at_inbox(config).result().pending()
    assert sorted(p.relative_to(config.inbox).as_posix() for p in pending) == ["a.png", "sub/c.png"]
    shutil.rmtree(config.inbox)
    with caplog.at_level(logging.DEBUG, logger="mammo_screen"):
        assert len(look_at_inbox(config).result()) == 0
    assert not caplog.records and not config.inbox.exists()


def test_a_model_loaded_at_start_up_comes_warmed_up(config: Config) -> None:
    """The warm-up call runs in the loading thread, during start-up; the pipeline's own
    warm-up is then free. Once per call size: a new size is warmed up once."""
    from worker.scoring.scorer import Scorer, load_scorer

    calls: list[int] = []

    class CountingSession:
        def __init__(self, session: Any) -> None:
            self.session = session

        def __getattr__(self, name: str) -> Any:
            return getattr(self.session, name)

        def run(self, *args: Any, **kwargs: Any) -> Any:
            calls.append(1)
            return self.session.run(*args, **kwargs)

    scorer = load_scorer(config).result()
    scorer.session = CountingSession(scorer.session)
    scorer.warm_up(config.batch_size)
    assert calls == []
    whole = Scorer(config.model_path, images_per_call=0)
    whole.session = CountingSession(whole.session)
    whole.warm_up(4)
    whole.warm_up(4)
    assert len(calls) == 1
