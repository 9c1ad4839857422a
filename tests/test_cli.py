"""The CLI: user mistakes as one line and a non-zero exit (every command's help: test_docs.py)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, make_mean_model, run_screen


def _screen(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    return run_screen(*args, cwd=cwd, timeout=120)


def test_cli_does_not_import_tensorflow() -> None:
    code = (
        "import sys, worker.cli, worker.app, worker.processing.pipeline; "
        "print(any(m.split('.')[0] in ('tensorflow', 'keras', 'tf2onnx') for m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert out.stdout.strip() == "False", out.stderr


_MODEL = "[model]\npath = 'm.onnx'\n"
_FOLDERS_HERE = "[paths]\ninbox = '.'\nprocessed = '.'\nquarantine = '.'\noutbox = '.'\n"
_C = "--config c.toml "


@pytest.mark.parametrize(
    "setup, args, message",
    [  # c.toml, the command line (split at spaces), what its one line says
        ("", "--config nope.toml report", "config file not found"),
        ("[worker]\nbatch_size = -1\n", _C + "status", "worker.batch_size"),
        ("[wrker]\n", _C + "results", "unknown config section"),
        ("[model]\npath = 'missing.onnx'\n", _C + "process", "model file not found"),
        ("[model]\npath = 'plain.onnx'\n", _C + "process", "no mammo-screen metadata"),
        ("[model]\npath = 'garbage.onnx'\n", _C + "process", "cannot load model"),
        (_MODEL + "sha256 = 'abc'\n", _C + "process", "config expects abc"),
        (_MODEL + "[paths]\ninbox = 'afile'\n", _C + "process", "inbox is not a folder"),
        # A typo in a path is an error naming it, never a new empty folder or database.
        (_MODEL, _C + "process --inbox inbx", "inbox folder not found"),
        (_MODEL, _C + "watch --inbox no/inbox", "inbox folder not found"),
        (_MODEL + "[paths]\ninbox = '.'\n", _C + "process", "processed folder not found"),
        (_MODEL + _FOLDERS_HERE + "[database]\nurl = 'sqlite:///no/s.db'\n", _C + "process",
         "database folder not found"),
        ("", _C + "report --database sqlite:///typo/s.db", "database not found"),
        ("", _C + "results --database sqlite:///typo.db", "database not found"),
        ("[database]\nurl = 'sqlite:///typo.db'\n", _C + "status", "database not found"),
        ("", _C + "outcomes import afile", "database not found"),
        ("", _C + "results --database sqlite:///garbage.onnx", "file is not a database"),
        (_MODEL + _FOLDERS_HERE, _C + "process --database sqlite:///afile/s.db",
         "database folder is not a folder"),
    ],
)
def test_user_mistakes_are_one_clear_line(
    tmp_path: Path, setup: str, args: str, message: str
) -> None:
    (tmp_path / "c.toml").write_text(setup)
    make_mean_model(tmp_path / "m.onnx")
    (tmp_path / "garbage.onnx").write_bytes(b"not a model")
    (tmp_path / "afile").write_text("x")
    import onnx

    plain = onnx.load(str(tmp_path / "m.onnx"))
    del plain.metadata_props[:]
    onnx.save(plain, str(tmp_path / "plain.onnx"))
    before = sorted(tmp_path.rglob("*"))
    proc = _screen(*args.split(), cwd=tmp_path)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr and "[Errno" not in proc.stderr
    lines = [ln for ln in proc.stderr.strip().splitlines() if not ln[:4].isdigit()]  # drop logs
    assert len(lines) == 1, proc.stderr
    assert message in lines[0]
    assert sorted(tmp_path.rglob("*")) == before, "a refused command created files or folders"


def test_create_missing_makes_the_folders_and_database(tmp_path: Path) -> None:
    make_mean_model(tmp_path / "m.onnx")
    (tmp_path / "c.toml").write_text(
        "[model]\npath = 'm.onnx'\n[paths]\ninbox = 'a/inbox'\nprocessed = 'a/done'\n"
        "quarantine = 'a/bad'\ncreate_missing = true\n[database]\nurl = 'sqlite:///db/s.db'\n"
    )
    proc = _screen("--config", "c.toml", "process", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    for made in ("a/inbox", "a/done", "a/bad", "db/s.db"):
        assert (tmp_path / made).exists(), made


def test_os_errors_name_the_path_without_errno(workdir: Path) -> None:
    assert _screen("process", "--timeout", "5", cwd=workdir).returncode == 0
    proc = _screen("results", "-o", "no/such/out.csv", cwd=workdir)
    assert proc.returncode == 1
    assert proc.stderr.strip() == "Error: No such file or directory: no/such/out.csv"


# Makes the [train] extra's modules unimportable in this process, as in an install without it.
_BLOCK_TRAIN_EXTRA = """
import sys
from importlib.abc import MetaPathFinder

class Block(MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("tensorflow", "keras", "tf2onnx"):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None

sys.meta_path.insert(0, Block())
sys.argv[0] = "screen"
from worker.cli import main
main()
"""


def test_train_and_export_without_the_extra_say_how_to_install_it(tmp_path: Path) -> None:
    from tests.conftest import write_mammo_like

    for label in ("benign", "malignant"):
        for i in range(3):
            write_mammo_like(tmp_path / "pool" / label / f"{label}{i}.png", seed=i)
    (tmp_path / "best.keras").write_bytes(b"")
    (tmp_path / "metrics.json").write_text(
        '{"threshold": 0.5, "preprocess": {}, "validation": {}}'
    )
    for command, args in (
        ("train", [str(tmp_path / "pool"), "--out", str(tmp_path / "run")]),
        ("export", [str(tmp_path / "best.keras"), "--out", str(tmp_path / "m.onnx"),
                    "--parity-images", "0"]),
    ):
        proc = subprocess.run(
            [sys.executable, "-c", _BLOCK_TRAIN_EXTRA, command, *args],
            cwd=REPO, capture_output=True, text=True, timeout=120,
        )
        assert proc.returncode == 1, proc.stderr
        assert "Traceback" not in proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1, proc.stderr
        assert f"`screen {command}` needs the [train] extra" in lines[0]
        assert "pip install 'mammo-screen[train]'" in lines[0]


def test_unreadable_inbox_is_refused(tmp_path: Path) -> None:
    import os

    if os.geteuid() == 0:
        pytest.skip("root can read any folder")
    inbox = tmp_path / "in"
    inbox.mkdir(mode=0)
    make_mean_model(tmp_path / "m.onnx")
    (tmp_path / "c.toml").write_text("[model]\npath = 'm.onnx'\n[paths]\ninbox = 'in'\n")
    proc = _screen("--config", "c.toml", "process", cwd=tmp_path)
    inbox.chmod(0o700)
    assert proc.returncode != 0 and "not readable" in proc.stderr
