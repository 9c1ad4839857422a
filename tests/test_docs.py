"""Nothing undocumented: every command and option has help text (the CLI reference is
generated from it), every config key has a comment in config.toml (the configuration reference
is generated from it), every page is in the site's navigation, and the README stays short.
`mkdocs build --strict` (in .ci/run) then fails on a broken link, anchor or page."""

from __future__ import annotations

import importlib.util
import tomllib
from pathlib import Path
from types import ModuleType

import click

from tests.conftest import REPO
from worker.cli import cli
from worker.config import SCHEMA

README_MAX_LINES = 300


def _hooks() -> ModuleType:
    spec = importlib.util.spec_from_file_location("docs_hooks", REPO / "docs" / "hooks.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _all_commands(group: click.Group, prefix: str) -> list[tuple[str, click.Command]]:
    """Every command under `group`, those from entry points loaded as help loads them."""
    ctx = click.Context(group)
    found = []
    for name in group.list_commands(ctx):
        command = group.get_command(ctx, name)
        assert command is not None, name
        found.append((f"{prefix} {name}", command))
        if isinstance(command, click.Group):
            found += _all_commands(command, f"{prefix} {name}")
    return found


def undocumented_cli(group: click.Group) -> list[str]:
    """What in the CLI has no help text, one line each saying where to add it."""
    missing = []
    for path, command in [("screen", group), *_all_commands(group, "screen")]:
        where = f"`{path}` ({command.callback.__module__ if command.callback else '?'})"
        if not command.help or len(command.help.strip()) <= 20:
            missing.append(f"{where}: the command has no help; give its function a docstring")
        for param in command.params:
            if isinstance(param, click.Option) and not param.hidden and not param.help:
                missing.append(f"{where}: option {'/'.join(param.opts)} has no help=")
            elif isinstance(param, click.Argument):
                metavar = param.make_metavar(click.Context(command)).strip("[]. ")
                if metavar not in (command.help or ""):
                    missing.append(f"{where}: argument {metavar} is not named in the "
                                   "command's docstring; say what it is there")
    return missing


def test_every_command_option_and_argument_is_documented() -> None:
    names = {path for path, _ in _all_commands(cli, "screen")}
    assert {"screen watch", "screen process", "screen results", "screen outcomes import",
            "screen report", "screen status", "screen train", "screen export"} <= names
    missing = undocumented_cli(cli)
    assert not missing, "undocumented in the CLI (docs/cli.md is generated from the help):\n" + (
        "\n".join(missing))


def test_the_cli_check_finds_an_option_without_help() -> None:
    @click.command()
    @click.argument("src")
    @click.option("--quiet", is_flag=True)
    def tool(src: str, quiet: bool) -> None:
        """Does something useful to a file, at length."""

    group = click.Group("g", commands={"tool": tool}, help="Commands for this test only.")
    assert undocumented_cli(group) == [
        f"`screen tool` ({__name__}): argument SRC is not named in the command's docstring; "
        "say what it is there",
        f"`screen tool` ({__name__}): option --quiet has no help=",
    ]


def undocumented_keys(hooks: ModuleType, config_toml: Path) -> list[str]:
    commented = hooks.commented_keys(config_toml)
    missing = []
    for section, keys in SCHEMA.items():
        for key, (_, default) in keys.items():
            if not commented.get(f"{section}.{key}"):
                missing.append(
                    f"[{section}] {key}: add `{key} = {hooks._toml(default)}` under [{section}] "
                    f"in config.toml with a comment line above it saying what it does"
                )
    known = {f"{s}.{k}" for s, keys in SCHEMA.items() for k in keys}
    missing += [f"{name}: in config.toml but not in worker/config.py's SCHEMA"
                for name in sorted(set(commented) - known)]
    return missing


def test_every_config_key_is_documented() -> None:
    missing = undocumented_keys(_hooks(), REPO / "config.toml")
    assert not missing, (
        "config keys without documentation (docs/configuration.md is generated from "
        "SCHEMA and config.toml's comments):\n" + "\n".join(missing))


def test_the_config_check_finds_a_key_without_its_comment(tmp_path: Path) -> None:
    text = (REPO / "config.toml").read_text()
    comment = "# How long a writer or reader waits for a lock before giving up.\n"
    assert comment in text
    (tmp_path / "config.toml").write_text(text.replace(comment, ""))
    assert undocumented_keys(_hooks(), tmp_path / "config.toml") == [
        "[database] busy_timeout_seconds: add `busy_timeout_seconds = 30.0` under [database] in "
        "config.toml with a comment line above it saying what it does"
    ]


def test_the_configuration_reference_lists_every_key_with_its_comment() -> None:
    hooks = _hooks()
    assert hooks.PLACEHOLDER in (REPO / "docs" / "configuration.md").read_text()
    page = hooks.config_reference()
    assert tomllib.loads((REPO / "config.toml").read_text())  # the file parses
    for section, keys in SCHEMA.items():
        assert f"## [{section}]" in page
        for key in keys:
            assert f"- **`{key}`** (" in page, f"[{section}] {key} missing from the reference"
    assert "(int; default `11112`): " in page
    assert "Calling AE titles allowed to send" in page


def _nav_pages(entries: list[object]) -> set[str]:
    pages: set[str] = set()
    for entry in entries:
        values = entry.values() if isinstance(entry, dict) else [entry]
        for value in values:
            pages |= _nav_pages(value) if isinstance(value, list) else {str(value)}
    return pages


def test_every_page_is_in_the_navigation_and_the_cli_reference_is_generated() -> None:
    import yaml

    site = yaml.safe_load((REPO / "mkdocs.yml").read_text())
    pages = {p.name for p in (REPO / "docs").glob("*.md")} | {"model-card.md"}  # generated
    assert _nav_pages(site["nav"]) == pages
    assert "docs/hooks.py" in site["hooks"]
    cli_page = (REPO / "docs" / "cli.md").read_text()
    assert "::: mkdocs-click" in cli_page and ":module: worker.cli" in cli_page
    assert ":command: cli" in cli_page


def test_the_install_page_has_the_readme_commands() -> None:
    def first_block(text: str) -> str:
        return text.split("```bash\n", 1)[1].split("```", 1)[0]

    readme = (REPO / "README.md").read_text()
    assert first_block(readme) == first_block((REPO / "docs" / "installing.md").read_text())


def test_the_readme_is_short() -> None:
    lines = len((REPO / "README.md").read_text().splitlines())
    assert lines <= README_MAX_LINES, (
        f"README.md has {lines} lines (at most {README_MAX_LINES}): move reference material to "
        "a page under docs/ (in mkdocs.yml's nav) and measurements to bench/README.md")
