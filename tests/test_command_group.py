"""`screen`'s commands from trainer/ and export/ register themselves through the
``mammo_screen.commands`` entry points (tests/test_structure.py holds that worker/ imports
neither), and a command is loaded only when it runs or help lists it."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from importlib.metadata import EntryPoint
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from tests.conftest import REPO
from worker.cli.plugins import ENTRY_POINT_GROUP, EntryPointGroup


def test_the_entry_point_group_names_the_trainer_and_exporter_commands() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    group = project["entry-points"][ENTRY_POINT_GROUP]
    assert group == {"train": "trainer.commands:train", "panel": "trainer.commands:panel",
                     "features": "trainer.study_commands:features",
                     "baselines": "trainer.study_commands:baselines",
                     "export": "export.commands:export"}
    for name, value in group.items():
        command = EntryPoint(name, value, ENTRY_POINT_GROUP).load()
        assert isinstance(command, click.Command) and command.name == name


def test_every_declared_plugin_command_is_documented() -> None:
    """What pyproject.toml declares (the installed metadata may predate a new command until
    the next `pip install -e .`) passes the docs test's check."""
    from tests.test_docs import undocumented_cli

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    declared = [EntryPoint(name, value, ENTRY_POINT_GROUP)
                for name, value in project["entry-points"][ENTRY_POINT_GROUP].items()]

    @click.group(cls=EntryPointGroup, entry_points_source=lambda: declared)
    def group() -> None:
        """The declared plugin commands, for this test only."""

    assert group.list_commands(click.Context(group)) == sorted(e.name for e in declared)
    assert undocumented_cli(group) == []


def _group(*entry_points: EntryPoint) -> click.Group:
    @click.group(cls=EntryPointGroup, entry_points_source=lambda: entry_points)
    def group() -> None:
        """A group."""

    @group.command()
    def own() -> None:
        """The group's own command."""
        click.echo("own")

    return group


def _plugin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str, body: str) -> EntryPoint:
    (tmp_path / f"{name}.py").write_text("import click\n" + body)
    monkeypatch.syspath_prepend(str(tmp_path))
    return EntryPoint("hello", f"{name}:hello", ENTRY_POINT_GROUP)


def test_a_plugin_command_is_listed_and_loaded_only_when_used(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ep = _plugin(tmp_path, monkeypatch, "plug_hello", (
        "@click.command()\n@click.option('--who', default='you', help='Whom to greet.')\n"
        "def hello(who):\n    '''Say hello to someone by name.'''\n    click.echo('hello ' + who)\n"
    ))
    group = _group(ep)
    assert CliRunner().invoke(group, ["own"]).output == "own\n"
    assert "plug_hello" not in sys.modules  # not loaded for another command
    assert group.list_commands(click.Context(group)) == ["hello", "own"]
    assert "plug_hello" not in sys.modules  # listing names does not load it
    result = CliRunner().invoke(group, ["hello", "--who", "Ada"])
    assert (result.exit_code, result.output) == (0, "hello Ada\n")
    assert "Say hello" in CliRunner().invoke(group, ["--help"]).output


def test_a_plugin_without_its_extra_says_which_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """At import (the module needs tf2onnx at the top) and at run time (inside the command)."""
    monkeypatch.setitem(sys.modules, "tf2onnx", None)  # as if not installed
    at_import = _plugin(tmp_path, monkeypatch, "plug_top", "import tf2onnx\n")
    at_run = _plugin(tmp_path, monkeypatch, "plug_inner", (
        "@click.command()\ndef hello():\n    '''Needs tf2onnx when it runs.'''\n"
        "    import tf2onnx\n"
    ))
    # The stand-in for an unimportable command takes any arguments, to say the one line.
    for ep, args in ((at_import, ["--out", "x", "y"]), (at_run, [])):
        result = CliRunner().invoke(_group(ep), ["hello", *args])
        assert result.exit_code == 1, result.output
        assert result.output.strip().splitlines() == [
            "Error: `screen hello` needs the [train] extra (no module 'tf2onnx'): "
            "pip install 'mammo-screen[train]'"
        ]


def test_importing_the_cli_imports_no_plugin() -> None:
    proc = subprocess.run(
        [sys.executable, "-c", "import sys, worker.cli; "
         "print(sorted(m for m in sys.modules if m.split('.')[0] in ('trainer', 'export')))"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"
