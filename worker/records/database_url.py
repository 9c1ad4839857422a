"""The [database] url: its SQLite file, how it is shown (password hidden), and the mistakes an
operator makes in it, each said in one line naming the URL.

Standard library only at import: the CLI checks a `--database` before it imports SQLAlchemy;
:func:`check_url` imports SQLAlchemy when it runs.
"""

from __future__ import annotations

import re
from pathlib import Path

from worker.config import Config, ConfigError, MissingPathError

_FORMS = ("sqlite:///relative/path.db, sqlite:////absolute/path.db or "
          "postgresql+psycopg://user:password@host/name")
# user:password@ in a URL SQLAlchemy cannot parse: hidden all the same.
_PASSWORD = re.compile(r"(//[^:/@]*:)[^@/]*@")


def sqlite_file(url: str) -> Path | None:
    """The database file of a file-backed SQLite URL; None for in-memory or other databases."""
    prefix = "sqlite:///"
    if not url.startswith(prefix):
        return None
    name = url[len(prefix) :].split("?", 1)[0]
    return None if name in ("", ":memory:") else Path(name)


def shown_url(url: str) -> str:
    """The database URL without its password, for messages and `screen status`."""
    from sqlalchemy import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # not a URL SQLAlchemy understands: check_url says so
        return _PASSWORD.sub(r"\1***@", url)


def check_url(url: str) -> None:
    """Refuse a URL SQLAlchemy cannot parse, or whose database kind it does not know, with one
    line (SQLAlchemy's own errors are a traceback's last line, without the URL)."""
    from sqlalchemy import make_url
    from sqlalchemy.exc import ArgumentError, NoSuchModuleError

    shown = shown_url(url)
    try:
        parsed = make_url(url)
    except ArgumentError:
        raise ConfigError(f"database URL {shown} is not a database URL: write {_FORMS}") from None
    try:
        parsed.get_dialect()
    except NoSuchModuleError:
        name = parsed.drivername
        hint = ("PostgreSQL is postgresql+psycopg://" if name.startswith("postgres")
                else f"write {_FORMS}")
        raise ConfigError(f"database URL {shown}: unknown database kind {name!r} ({hint})"
                          ) from None


def named_database_exists(config: Config) -> None:
    """For a worker given --database: the worker creates its configured database on its first
    start, but not one named on the command line, where a typo must not become a new, empty
    database (unless [paths] create_missing)."""
    path = sqlite_file(config.database_url)
    if path is not None and path.parent.exists() and not path.parent.is_dir():
        raise NotADirectoryError(f"database folder is not a folder: {path.parent}")
    if path is not None and not path.exists() and not config.create_missing:
        raise MissingPathError(
            f"database not found: {path} (--database names an existing database: the worker "
            "creates only the configured one, or any with [paths] create_missing = true)"
        )


def missing_database(path: Path) -> str:
    return (f"database not found: {path} (check [database] url or --database; "
            "`screen watch` or `screen process` creates the configured one)")
