"""`screen`: the command line, a thin click layer over the Python API (worker.app and the
wings). One module per job:

- :mod:`worker.cli.group`: the `screen` group and what its commands share (the config with the
  options that override single keys, one line and exit status 1 for an operator's mistake).
- :mod:`worker.cli.run_commands`: running the worker (`process`, `watch`, `receive`).
- :mod:`worker.cli.result_commands`: what was scored and what was true (`results`,
  `outcomes import`).
- :mod:`worker.cli.audit_commands`: the audit (`report`, `heatmap`, `calibrate`).
- :mod:`worker.cli.status_commands`: `status`.
- :mod:`worker.cli.plugins`: the commands of other packages (`train`, `panel`, `export`),
  found through the ``mammo_screen.commands`` entry points: the worker imports nothing from
  trainer/ or export/.
"""

from __future__ import annotations

import sys
from pathlib import Path

from worker.cli.audit_commands import calibrate, heatmap, report
from worker.cli.group import cli
from worker.cli.result_commands import outcomes, results
from worker.cli.run_commands import process, receive, watch
from worker.cli.status_commands import status

for _command in (watch, process, receive, results, outcomes, report, heatmap, status, calibrate):
    cli.add_command(_command)

__all__ = ["cli", "main"]


def main() -> None:
    cli(obj={}, prog_name=Path(sys.argv[0]).name if sys.argv else "screen")
