"""The worker's log lines: one per event on stderr.

Its own module, so that the CLI can set logging up without importing the database layer
(SQLAlchemy: about a third of a second), which `screen process` and `screen watch` import
while their model loads in a thread (`worker.scoring.scorer.load_scorer`).
"""

from __future__ import annotations

import logging
import sys
import warnings
from pathlib import Path
from typing import TextIO


def setup_logging(level: str = "INFO") -> None:
    """One line per event on stderr: journald keeps stderr and adds its own timestamps."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    root = logging.getLogger("mammo_screen")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False
    warnings.showwarning = _log_warning


def _source(filename: str) -> str:
    """`pydicom/valuerep.py` for a library's file, else the file's name."""
    parts = Path(filename).parts
    if "site-packages" in parts:
        return "/".join(parts[parts.index("site-packages") + 1 :])
    return Path(filename).name


def _log_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                 file: TextIO | None = None, line: str | None = None) -> None:
    """A library's warning (pydicom's on a malformed header, say) as one log line, instead of
    Python's two raw lines (the message, then the source line that raised it)."""
    text = " ".join(str(message).split())
    logging.getLogger("mammo_screen").warning(
        "warning category=%s source=%s:%d message=%s", category.__name__, _source(filename),
        lineno, text)
