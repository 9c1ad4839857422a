"""Schema versions (Alembic): a database from the release before Alembic upgrades in place;
a new one is stamped at the newest revision; one from a newer release is refused in one line."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from sqlalchemy import inspect, text

from tests.conftest import REPO
from tests.test_faults import _screen
from worker.records.schema import MIGRATIONS, head, is_current, newest_revision
from worker.records.store import Store

BEFORE_ALEMBIC = REPO / "tests" / "fixtures" / "screen-db-before-alembic.sql"


def _revision(store: Store) -> str | None:
    with store.engine.connect() as conn:
        return conn.execute(text("SELECT version_num FROM alembic_version")).scalar()


def test_database_from_the_release_before_alembic_upgrades_in_place(workdir: Path) -> None:
    tmp_path = workdir
    db = tmp_path / "old.db"
    with sqlite3.connect(db) as con:
        con.executescript(BEFORE_ALEMBIC.read_text())
        before = con.execute("SELECT id, filename, status, sha256 FROM images ORDER BY id"
                             ).fetchall()
        assert "claimed_by" not in [r[1] for r in con.execute("PRAGMA table_info(images)")]
    store = Store(f"sqlite:///{db}")
    try:
        assert _revision(store) == head()
        assert "claimed_by" in {c["name"] for c in inspect(store.engine).get_columns("images")}
        after = [(r.id, r.filename, r.status, r.sha256) for r in store.all_images()]
        assert after == before and len(after) == 5
        assert store.counts_by_status() == {"scored": 3, "duplicate": 1, "quarantined": 1}
    finally:
        store.dispose()
    again = Store(f"sqlite:///{db}")  # a second open changes nothing
    try:
        assert _revision(again) == head() and len(again.all_images()) == 5
    finally:
        again.dispose()
    out = _screen(tmp_path, "results", "--database", f"sqlite:///{db}", "--format", "csv")
    assert out.returncode == 0, out.stderr
    assert "a0.png" in out.stdout


def test_new_database_is_stamped_at_the_newest_revision(tmp_path: Path) -> None:
    store = Store(f"sqlite:///{tmp_path / 'new.db'}")
    try:
        assert _revision(store) == head()
    finally:
        store.dispose()


def test_schema_newer_than_the_code_is_one_clear_line(workdir: Path) -> None:
    assert _screen(workdir, "process", "--timeout", "5").returncode == 0
    with sqlite3.connect(workdir / "screen.db") as con:
        con.execute("UPDATE alembic_version SET version_num = 'f00dfeed'")
    out = _screen(workdir, "status")
    assert out.returncode == 1
    lines = [ln for ln in out.stderr.strip().splitlines() if not ln[:4].isdigit()]
    assert len(lines) == 1 and "newer than this mammo-screen" in lines[0], out.stderr
    assert "f00dfeed" in lines[0] and "Traceback" not in out.stderr


def test_the_start_up_check_reads_the_newest_revision_as_alembic_does(tmp_path: Path) -> None:
    """`is_current` reads the head from the scripts without importing Alembic; it must agree
    with Alembic, including the annotated form newer templates write, and give up (None:
    Alembic decides) on a form it does not know rather than miss a revision."""
    assert newest_revision() == head()
    versions = tmp_path / "versions"
    versions.mkdir()
    for script in (MIGRATIONS / "versions").glob("*.py"):
        (versions / script.name).write_text(script.read_text())
    # A revision after the newest (named so that it cannot clash with a real one).
    (versions / "9998_next.py").write_text(
        f'revision: str = "9998"\ndown_revision: str | None = "{head()}"\n'
    )
    assert newest_revision(versions) == "9998"
    (versions / "9999_odd.py").write_text('revision = REVISIONS["three"]\n')
    assert newest_revision(versions) is None


def test_a_database_stamped_at_an_older_revision_is_not_current(tmp_path: Path) -> None:
    store = Store(f"sqlite:///{tmp_path / 'new.db'}")
    try:
        with store.engine.begin() as conn:
            assert is_current(conn)
            conn.execute(text("UPDATE alembic_version SET version_num = 'older'"))
            assert not is_current(conn)
    finally:
        store.dispose()


def test_a_new_database_is_stamped_as_alembic_stamps_it(tmp_path: Path) -> None:
    """A new database is stamped without Alembic (start-up time): the same tables, indexes
    and version row as the tables from the models plus Alembic's own `stamp head`."""
    from alembic import command
    from sqlalchemy import create_engine

    from worker.records.models import Base
    from worker.records.schema import _config

    Store(f"sqlite:///{tmp_path / 'fast.db'}").dispose()
    engine = create_engine(f"sqlite:///{tmp_path / 'alembic.db'}")
    with engine.begin() as conn:
        Base.metadata.create_all(conn)
        command.stamp(_config(conn), "head")
    engine.dispose()

    def layout(db: Path) -> tuple[list[tuple], list[tuple]]:
        with sqlite3.connect(db) as con:
            return (
                con.execute("SELECT type, name, sql FROM sqlite_master ORDER BY name").fetchall(),
                con.execute("SELECT * FROM alembic_version").fetchall(),
            )

    fast, alembic = layout(tmp_path / "fast.db"), layout(tmp_path / "alembic.db")
    assert fast == alembic and fast[1] == [(head(),)]
