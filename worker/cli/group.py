"""The `screen` group and what its commands share: the config with the options that override
single keys, one line and exit status 1 for an operator's mistake, the common options.

Nothing here imports NumPy, SQLAlchemy, pydicom or ONNX Runtime: `screen --help` and every
command's parsing load only the CLI and the config; each command imports what it runs.
"""

from __future__ import annotations

import datetime as dt
import functools
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import click

from worker.cli.plugins import EntryPointGroup
from worker.config import (
    DEFAULT_CONFIG_NAME,
    ENV_CONFIG,
    KEYS,
    Config,
    ConfigError,
    MissingPathError,
    load_config,
)
from worker.intake.lock import InboxBusyError
from worker.scoring.model_file import ModelLoadError

_USER_ERRORS = (
    ConfigError,
    ModelLoadError,
    InboxBusyError,
    FileNotFoundError,
    PermissionError,
    NotADirectoryError,
    IsADirectoryError,
    FileExistsError,
)


def _describe(exc: Exception) -> str:
    # "No such file or directory: out/x.csv" rather than "[Errno 2] No such file or ...: '...'".
    if isinstance(exc, OSError) and exc.errno is not None and exc.strerror:
        return f"{exc.strerror}: {exc.filename}" if exc.filename else exc.strerror
    return str(exc)


def _no_config_note(exc: Exception) -> str:
    """A path from the built-in defaults is missing because no config file was found: say so,
    and where it was looked for, rather than only naming a path under the current folder."""
    ctx = click.get_current_context(silent=True)
    looked = ctx.obj.get("no_config_in") if ctx is not None and ctx.obj else None
    if looked is None or not isinstance(exc, MissingPathError | ModelLoadError):
        return ""
    return (f"no config file found (no --config, no ${ENV_CONFIG}, no {DEFAULT_CONFIG_NAME} "
            f"in {looked}), so the built-in defaults were used: ")


def user_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn an operator's mistake into one line and exit status 1, not a traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except _USER_ERRORS as exc:
            raise click.ClickException(_no_config_note(exc) + _describe(exc)) from None

    return wrapper


class KeyOption(click.Option):
    """An option that overrides one config key ("section.name"); its help says which."""

    def __init__(self, param_decls: Sequence[str], *, key: str, example: str = "",
                 **attrs: Any) -> None:
        known = KEYS[key]  # a key that does not exist fails at import
        attrs.setdefault("help", f"Overrides [{known.section}] {known.name}{example}.")
        super().__init__(param_decls, **attrs)
        self.key = key


def key_option(*param_decls: str, key: str, example: str = "",
               **attrs: Any) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    return click.option(*param_decls, cls=KeyOption, key=key, example=example, **attrs)


def config_for(ctx: click.Context) -> Config:
    """The config (from --config, else the default file) with the command's given key options
    applied."""
    overrides = {p.key: ctx.params.get(p.name) for p in ctx.command.params
                 if isinstance(p, KeyOption) and p.name is not None}
    config = load_config(ctx.obj.get("config"), overrides)
    if config.source is None:
        ctx.obj["no_config_in"] = Path.cwd()
    return config


def parse_since(value: str | None, param_hint: str = "--since") -> dt.datetime | None:
    if value is None:
        return None
    try:
        parsed = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise click.BadParameter(
            f"not an ISO date or time: {value!r}", param_hint=param_hint
        ) from None
    if parsed.tzinfo is not None:
        parsed = parsed.astimezone(dt.UTC).replace(tzinfo=None)
    return parsed


def worker_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Options that override single config keys for the commands that run the worker."""
    path = click.Path(path_type=Path)
    for option in reversed(
        [
            key_option("--inbox", key="paths.inbox", type=path),
            key_option("--processed", key="paths.processed", type=path),
            key_option("--quarantine", key="paths.quarantine", type=path),
            key_option("--database", key="database.url", example=", e.g. sqlite:///screen.db"),
            key_option("--model", key="model.path", type=path),
            key_option("--batch-size", key="worker.batch_size", type=click.IntRange(min=1)),
        ]
    ):
        fn = option(fn)
    return fn


since_option = click.option("--since", help="Only images received at or after this ISO time (UTC).")


def store_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    return key_option("--database", key="database.url")(fn)


@click.group(cls=EntryPointGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--config",
    "config_path",
    type=click.Path(path_type=Path),
    help="Config file (default: $MAMMO_SCREEN_CONFIG, else ./config.toml, else built-in defaults).",
)
@click.option(
    "--log-level", default="INFO", type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"]),
    show_default=True, help="Least severe log lines written to stderr.",
)
@click.version_option(package_name="mammo-screen")
@click.pass_context
def cli(ctx: click.Context, config_path: Path | None, log_level: str) -> None:
    """mammo-screen: score mammograms dropped into an inbox folder and record every result.

    A research tool, not a medical device.

    \b
    Example:
      screen watch                     # run the worker on the default config
      screen results --format csv      # what was scored
      screen report                    # counts and, with outcomes, confusion figures
    """
    from worker.logs import setup_logging

    setup_logging(log_level)
    ctx.ensure_object(dict)
    ctx.obj["config"] = config_path
