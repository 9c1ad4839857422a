"""The worker's folders checked, or created when the config allows, before it starts: the
inbox (by the worker and the DICOM receiver), the processed, quarantine and outbox folders."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from worker.config import Config, MissingPathError

log = logging.getLogger("mammo_screen")


def ensure_folder(role: str, folder: Path, create_missing: bool) -> None:
    """A missing folder is a mistake (a typo must not become a new, empty inbox) unless the
    config asks for it to be created ([paths] create_missing)."""
    if folder.exists() and not folder.is_dir():
        raise NotADirectoryError(f"{role} is not a folder: {folder}")
    if not folder.exists():
        if not create_missing:
            raise MissingPathError(
                f"{role} folder not found: {folder} "
                "(create it, or set [paths] create_missing = true)"
            )
        folder.mkdir(parents=True)
        log.info("created %s folder=%s", role, folder)


def ensure_inbox(config: Config) -> None:
    """The inbox exists (or is created when the config allows) and can be read and written."""
    ensure_folder("inbox", config.inbox, config.create_missing)
    if not os.access(config.inbox, os.R_OK | os.X_OK | os.W_OK):
        raise PermissionError(f"inbox folder is not readable and writable: {config.inbox}")


def ensure_folders(config: Config) -> None:
    """Check the inbox and output folders (see :func:`ensure_folder`)."""
    ensure_inbox(config)
    for role, folder in (("processed", config.processed), ("quarantine", config.quarantine),
                         ("outbox", config.outbox)):
        ensure_folder(role, folder, config.create_missing)
