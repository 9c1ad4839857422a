"""The worker's log lines: one per event on stderr.

Its own module, so that the CLI can set logging up without importing the database layer
(SQLAlchemy: about a third of a second), which `screen process` and `screen watch` import
while their model loads in a thread (`worker.scorer.load_scorer`).
"""

from __future__ import annotations

import logging
import sys


def setup_logging(level: str = "INFO") -> None:
    """One line per event on stderr: journald keeps stderr and adds its own timestamps."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    root = logging.getLogger("mammo_screen")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False
