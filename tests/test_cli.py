"""The CLI: every command documented, user mistakes as one line and a non-zero exit."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import click
import pytest

from tests.conftest import REPO, make_mean_model
from worker.cli import cli


def _commands(group: click.Group, prefix: str = "") -> list[tuple[str, click.Command]]:
    out = []
    for name, cmd in group.commands.items():
        out.append((prefix + name, cmd))
        if isinstance(cmd, click.Group):
            out += _commands(cmd, prefix + name + " ")
    return out


def test_every_command_has_help_text() -> None:
    names = [n for n, _ in _commands(cli)]
    for expected in (
        "watch",
        "process",
        "results",
        "outcomes import",
        "report",
        "status",
        "train",
        "export",
    ):
        assert expected in names
    for name, cmd in _commands(cli):
        assert cmd.help and len(cmd.help.strip()) > 20, f"`screen {name}` has no help"


def _screen(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "worker", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_cli_does_not_import_tensorflow() -> None:
    code = (
        "import sys, worker.cli, worker.app, worker.pipeline; "
        "print(any(m.split('.')[0] in ('tensorflow', 'keras', 'tf2onnx') for m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert out.stdout.strip() == "False", out.stderr


@pytest.mark.parametrize(
    "setup, args, message",
    [
        ("", ["--config", "nope.toml", "report"], "config file not found"),
        ("[worker]\nbatch_size = -1\n", ["--config", "c.toml", "status"], "worker.batch_size"),
        ("[wrker]\n", ["--config", "c.toml", "results"], "unknown config section"),
        (
            "[model]\npath = 'missing.onnx'\n",
            ["--config", "c.toml", "process"],
            "model file not found",
        ),
        (
            "[model]\npath = 'plain.onnx'\n",
            ["--config", "c.toml", "process"],
            "no mammo-screen metadata",
        ),
        (
            "[model]\npath = 'garbage.onnx'\n",
            ["--config", "c.toml", "process"],
            "cannot load model",
        ),
        (
            "[model]\npath = 'm.onnx'\nsha256 = 'abc'\n",
            ["--config", "c.toml", "process"],
            "config expects abc",
        ),
        (
            "[model]\npath = 'm.onnx'\n[paths]\ninbox = 'afile'\n",
            ["--config", "c.toml", "process"],
            "inbox is not a folder",
        ),
    ],
)
def test_user_mistakes_are_one_clear_line(
    tmp_path: Path, setup: str, args: list[str], message: str
) -> None:
    (tmp_path / "c.toml").write_text(setup)
    make_mean_model(tmp_path / "m.onnx")
    (tmp_path / "garbage.onnx").write_bytes(b"not a model")
    (tmp_path / "afile").write_text("x")
    import onnx

    plain = onnx.load(str(tmp_path / "m.onnx"))
    del plain.metadata_props[:]
    onnx.save(plain, str(tmp_path / "plain.onnx"))
    proc = _screen(*args, cwd=tmp_path)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    lines = [ln for ln in proc.stderr.strip().splitlines() if not ln[:4].isdigit()]  # drop logs
    assert len(lines) == 1, proc.stderr
    assert message in lines[0]


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
