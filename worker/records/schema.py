"""The database schema's version, kept by Alembic (worker/records/migrations) from the first release
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

Alembic is imported only when there is a migration to run or a stamp to check: the usual
start-up, on a database already at the newest revision, is one query (`is_current`), and a
new database is stamped by writing Alembic's version table directly.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy import Column, MetaData, PrimaryKeyConstraint, String, Table, inspect, text
from sqlalchemy.engine import Connection

from worker.records.models import Base

if TYPE_CHECKING:
    from alembic.config import Config as AlembicConfig

BASELINE = "0001"  # the schema of the release before Alembic, plus claimed_by
MIGRATIONS = Path(__file__).with_name("migrations")

log = logging.getLogger("mammo_screen")
logging.getLogger("alembic").setLevel(logging.WARNING)  # its INFO lines are ours to say


class SchemaTooNewError(RuntimeError):
    pass


def _config(conn: Connection) -> AlembicConfig:
    from alembic.config import Config as AlembicConfig

    cfg = AlembicConfig()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.attributes["connection"] = conn
    return cfg


def head() -> str:
    from alembic.script import ScriptDirectory

    heads = ScriptDirectory(str(MIGRATIONS)).get_heads()
    assert len(heads) == 1, heads  # one line of history
    return heads[0]


def _assignment(name: str) -> re.Pattern[str]:
    """`name = "0002"`, or with a type annotation as newer Alembic templates write it."""
    return re.compile(rf"""^{name}(?:\s*:[^=\n]*)?\s*=\s*["'](\w+)["']""", re.MULTILINE)


_REVISION, _DOWN_REVISION = _assignment("revision"), _assignment("down_revision")


def newest_revision(versions: Path = MIGRATIONS / "versions") -> str | None:
    """The head revision, from the scripts' `revision` / `down_revision` lines, without
    importing Alembic (whose import costs a tenth of a second at every start). None when
    a script does not say its revision in that form, or there is not exactly one head:
    then Alembic decides. A test checks that this agrees with Alembic's :func:`head`."""
    revisions: set[str] = set()
    parents: set[str] = set()
    for script in versions.glob("*.py"):
        if script.name == "__init__.py":
            continue
        source = script.read_text(encoding="utf-8")
        if (rev := _REVISION.search(source)) is None:
            return None  # a form this reader does not know: not a guess, Alembic's answer
        revisions.add(rev[1])
        if (down := _DOWN_REVISION.search(source)) is not None:
            parents.add(down[1])
    heads = revisions - parents
    return heads.pop() if len(heads) == 1 else None


def current(conn: Connection) -> str | None:
    from alembic.runtime.migration import MigrationContext

    return MigrationContext.configure(conn).get_current_revision()


def is_current(conn: Connection) -> bool:
    """Whether the database is stamped at the code's newest revision (nothing to do)."""
    if not inspect(conn).has_table("alembic_version"):
        return False
    stamped = conn.execute(text("SELECT version_num FROM alembic_version")).scalars().all()
    newest = newest_revision()
    return newest is not None and stamped == [newest]


# Alembic's version table as its `stamp` makes it (alembic.ddl.impl.version_table_impl),
# to stamp a new database without importing Alembic; a test checks that they agree.
_VERSION_TABLE = Table(
    "alembic_version",
    MetaData(),
    Column("version_num", String(32), nullable=False),
    PrimaryKeyConstraint("version_num", name="alembic_version_pkc"),
)


def bring_up_to_date(conn: Connection, pre_alembic: Callable[[Connection], None]) -> None:
    """See the module's docstring; `pre_alembic` is the step for a database without a stamp."""
    newest_here = newest_revision()
    tables = inspect(conn)
    if (newest_here is not None and not tables.has_table("alembic_version")
            and not tables.has_table("images")):
        # A new database (a worker's first start): what `stamp head` would leave.
        Base.metadata.create_all(conn)
        _VERSION_TABLE.create(conn)
        conn.execute(_VERSION_TABLE.insert().values(version_num=newest_here))
        return
    from alembic import command
    from alembic.script import ScriptDirectory
    from alembic.util.exc import CommandError

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
