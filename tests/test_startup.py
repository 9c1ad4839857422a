"""Start-up cost: `screen process` and `screen watch` import only what they use (issue 11's
cold start). pydicom waits for the first DICOM file and Alembic for a migration to run; the
CLI itself (`screen --help`) waits for neither ONNX Runtime nor SQLAlchemy. A module-level
import that brings one back fails here rather than slowing every start."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO, write_mammo_like
from tests.dicom_files import dicom_bytes, mammo_like

LAZY = ("pydicom", "alembic")

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
    """`screen --help` (and every command's parsing) loads only the CLI and the config."""
    proc = subprocess.run(
        [sys.executable, "-c", "import json, sys, worker.cli; print(json.dumps("
         "[m for m in ('onnxruntime', 'sqlalchemy', 'pydicom', 'alembic') if m in sys.modules]))"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == []
    help_text = subprocess.run([sys.executable, "-m", "worker", "--help"], cwd=REPO,
                               capture_output=True, text=True, timeout=120)
    assert help_text.returncode == 0 and "process" in help_text.stdout



# `screen ARGS` with a hook that notes, when SQLAlchemy's import begins, whether the model has
# begun loading (its thread running, or ONNX Runtime already imported by it).
_MODEL_FIRST = """
import json, runpy, sys, threading
seen = {}
class Hook:
    def find_spec(self, name, path=None, target=None):
        if name == "sqlalchemy" and not seen:
            seen["model_loading"] = "onnxruntime" in sys.modules or any(
                t.name.startswith("model-load") for t in threading.enumerate())
        return None
sys.meta_path.insert(0, Hook())
sys.argv = ["screen", *sys.argv[1:]]
try:
    runpy.run_module("worker", run_name="__main__")
except SystemExit as exit:
    code = exit.code
print(json.dumps({"code": code, **seen}))
"""


def test_the_model_loads_while_the_database_layer_imports(workdir: Path) -> None:
    """`screen process` starts loading its model (ONNX Runtime's import and session: ~0.15 s)
    in a thread before it imports SQLAlchemy (~0.35 s), so the two overlap at start-up."""
    write_mammo_like(workdir / "inbox" / "a.png", seed=1)
    proc = subprocess.run(
        [sys.executable, "-c", _MODEL_FIRST, "--config", str(workdir / "config.toml"),
         "process", "--timeout", "10"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["code"] in (0, None), proc.stderr
    assert out["model_loading"] is True
    assert (workdir / "processed" / "a.png").exists()
