"""Opening the database a config names, with an operator's mistakes said in one line."""

from __future__ import annotations

from sqlalchemy.exc import DatabaseError

from worker.config import Config, ConfigError, MissingPathError
from worker.records.database_url import check_url, missing_database, shown_url, sqlite_file
from worker.records.schema import SchemaTooNewError
from worker.records.store import Store


def open_store(config: Config, create: bool = False) -> Store:
    """Open the database. Only the worker (`create=True`) may make a new SQLite file: a command
    that only reads, given a mistyped path, must say so instead of reporting an empty database.
    The file's folder is made only when [paths] create_missing asks for it."""
    check_url(config.database_url)
    path = sqlite_file(config.database_url)
    if path is not None and path.exists() and not path.is_file():
        raise ConfigError(f"database path is not a file: {path}")
    if path is not None and path.is_file() and path.stat().st_size == 0:
        # SQLite would take an empty file as a new database and give it the schema.
        raise ConfigError(f"not a mammo-screen database: {path} is an empty file")
    if path is not None and not path.exists():
        if not create:
            raise MissingPathError(missing_database(path))
        if path.parent.exists() and not path.parent.is_dir():
            raise NotADirectoryError(f"database folder is not a folder: {path.parent}")
        if not path.parent.exists():
            if not config.create_missing:
                raise MissingPathError(
                    f"database folder not found: {path.parent} "
                    "(create it, or set [paths] create_missing = true)"
                )
            path.parent.mkdir(parents=True)
    shown = shown_url(config.database_url)
    try:
        return Store(config.database_url, config.busy_timeout_seconds)
    except SchemaTooNewError as exc:
        raise ConfigError(f"cannot open database {shown}: {exc}") from None
    except ModuleNotFoundError as exc:  # a PostgreSQL URL without its driver
        raise ConfigError(
            f"cannot open database {shown}: {exc} (install the driver: "
            "pip install 'mammo-screen[postgres]')"
        ) from None
    except DatabaseError as exc:  # unreadable, not a database, or locked past the timeout
        reason = str(exc.orig) if exc.orig is not None else str(exc).splitlines()[0]
        reason = reason.strip().splitlines()[0] if reason.strip() else reason
        raise ConfigError(f"cannot open database {shown}: {reason}") from None
