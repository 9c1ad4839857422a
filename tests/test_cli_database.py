"""Database URL mistakes, a mistyped --database and no config file: each one line naming what
is wrong (the password hidden), a non-zero exit, and nothing created."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.conftest import make_mean_model, run_screen

WORKER_SETUP = ("[model]\npath = 'm.onnx'\n[paths]\ninbox = 'in'\nprocessed = 'in'\n"
                "quarantine = 'in'\noutbox = 'in'\n[database]\nurl = 'sqlite:///screen.db'\n")


def _one_line_error(cwd: Path, *args: str, env: dict[str, str] | None = None) -> str:
    """Run `screen ARGS` in `cwd`; it must fail with one line and leave `cwd` as it was."""
    before = sorted(cwd.rglob("*"))
    proc = run_screen(*args, cwd=cwd, env=env, timeout=120)
    assert proc.returncode != 0, proc.stdout
    assert "Traceback" not in proc.stderr
    lines = [ln for ln in proc.stderr.strip().splitlines() if not ln[:4].isdigit()]  # no logs
    assert len(lines) == 1, proc.stderr
    assert sorted(cwd.rglob("*")) == before, "a refused command created files or folders"
    return lines[0]


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    (tmp_path / "c.toml").write_text(WORKER_SETUP)
    make_mean_model(tmp_path / "m.onnx")
    (tmp_path / "in").mkdir()
    (tmp_path / "empty.db").write_bytes(b"")
    return tmp_path


READERS = (["results"], ["report"], ["status"], ["outcomes", "import", "x.csv"])
WORKERS = (["process"], ["watch"])


@pytest.mark.parametrize("command", [*READERS, ["process"]], ids=lambda c: c[0])
@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("sqlite:/data/screen.db", "database URL sqlite:/data/screen.db is not a database URL"),
        ("sqllite:///s.db", "database URL sqllite:///s.db: unknown database kind 'sqllite'"),
        ("postgres://screen:secret@db/screen",
         "database URL postgres://screen:***@db/screen: unknown database kind 'postgres' "
         "(PostgreSQL is postgresql+psycopg://)"),
        ("postgres//screen:secret@db/screen",
         "database URL postgres//screen:***@db/screen is not a database URL"),
        ("sqlite:///empty.db", "not a mammo-screen database: "),
    ],
)
def test_database_url_mistakes_are_one_line(folder: Path, command: list[str], url: str,
                                            message: str) -> None:
    line = _one_line_error(folder, "--config", "c.toml", *command, "--database", url)
    assert line.startswith(f"Error: {message}"), line
    assert "secret" not in line


@pytest.mark.parametrize("command", READERS + WORKERS, ids=lambda c: c[0])
def test_a_mistyped_database_is_not_created(folder: Path, command: list[str]) -> None:
    """Even by the worker, which creates only the configured database."""
    line = _one_line_error(folder, "--config", "c.toml", *command, "--database",
                           "sqlite:///scren.db")
    assert line.startswith(f"Error: database not found: {folder / 'scren.db'}"), line


def test_the_worker_still_creates_its_configured_database(folder: Path) -> None:
    proc = run_screen("--config", "c.toml", "process", cwd=folder)
    assert proc.returncode == 0, proc.stderr
    assert (folder / "screen.db").is_file()
    proc = run_screen("--config", "c.toml", "status", "--database", "sqlite:///screen.db",
                      "--format", "json", cwd=folder)
    assert proc.returncode == 0 and '"database": "sqlite:///' in proc.stdout, proc.stderr


@pytest.mark.parametrize("command", [["status"], ["results"], ["process"]], ids=str)
def test_without_a_config_file_the_error_says_so(tmp_path: Path, command: list[str]) -> None:
    env = {k: v for k, v in os.environ.items() if k != "MAMMO_SCREEN_CONFIG"}
    line = _one_line_error(tmp_path, *command, env=env)
    assert line.startswith(
        f"Error: no config file found (no --config, no $MAMMO_SCREEN_CONFIG, no config.toml "
        f"in {tmp_path}), so the built-in defaults were used: "), line
