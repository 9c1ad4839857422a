"""The database schema's version, kept by Alembic (worker/migrations) from the first release
that has it.

Opening a database (`Store`) brings it to the code's schema, in one transaction (on
PostgreSQL under the schema lock, so workers starting together take turns):
- a new, empty database: the tables from the models, stamped at the newest revision;
- a database made before Alembic (tables, no `alembic_version`): the pre-Alembic step
  (`Store._upgrade`: missing tables and nullable columns added, nothing dropped), stamped at
  the baseline revision, then every later revision;
- a stamped database: the revisions it lacks;
- a database stamped by a newer release (a revision this code does not know): refused with
  one line, before anything is written.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

from alembic import command
from alembic.config import Config as AlembicConfig
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util.exc import CommandError
from sqlalchemy import inspect
from sqlalchemy.engine import Connection

from worker.store import Base

BASELINE = "0001"  # the schema of the release before Alembic, plus claimed_by
MIGRATIONS = Path(__file__).with_name("migrations")

log = logging.getLogger("mammo_screen")
logging.getLogger("alembic").setLevel(logging.WARNING)  # its INFO lines are ours to say


class SchemaTooNewError(RuntimeError):
    pass


def _config(conn: Connection) -> AlembicConfig:
    cfg = AlembicConfig()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.attributes["connection"] = conn
    return cfg


def head() -> str:
    heads = ScriptDirectory(str(MIGRATIONS)).get_heads()
    assert len(heads) == 1, heads  # one line of history
    return heads[0]


def current(conn: Connection) -> str | None:
    return MigrationContext.configure(conn).get_current_revision()


def is_current(conn: Connection) -> bool:
    """Whether the database is stamped at the code's newest revision (nothing to do)."""
    return inspect(conn).has_table("alembic_version") and current(conn) == head()


def bring_up_to_date(conn: Connection, pre_alembic: Callable[[Connection], None]) -> None:
    """See the module's docstring; `pre_alembic` is the step for a database without a stamp."""
    cfg = _config(conn)
    script = ScriptDirectory.from_config(cfg)
    newest = head()
    rev = current(conn)
    if rev is None:
        existing = inspect(conn).has_table("images")
        Base.metadata.create_all(conn)
        if existing:
            pre_alembic(conn)
            command.stamp(cfg, BASELINE)
            command.upgrade(cfg, "head")
            log.info("database schema upgraded from before migrations to revision=%s", newest)
        else:
            command.stamp(cfg, "head")
        return
    try:
        script.get_revision(rev)
    except CommandError:
        raise SchemaTooNewError(
            f"the database's schema (revision {rev}) is newer than this mammo-screen knows "
            f"(up to {newest}): upgrade mammo-screen, or use the database of this version"
        ) from None
    if rev != newest:
        command.upgrade(cfg, "head")
        log.info("database schema upgraded from revision=%s to revision=%s", rev, newest)
