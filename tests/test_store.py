"""The store: SQLite settings and the exactly-once guard, on a real database file."""

from __future__ import annotations

import datetime as dt
import sqlite3
from pathlib import Path

import pytest
from sqlalchemy.exc import IntegrityError

from worker.records.models import ImageRecord
from worker.records.paths import display_name, path_from_db, path_to_db
from worker.records.store import ImageStatus, Store


def _row(**kw: object) -> ImageRecord:
    base = dict(filename="a.png", source_path="/in/a.png", sha256="ab" * 32, size_bytes=3,
                status=ImageStatus.RECEIVED, attempts=0)
    return ImageRecord(**{**base, **kw})


def test_wal_and_busy_timeout(tmp_path: Path) -> None:
    store = Store(f"sqlite:///{tmp_path / 's.db'}", busy_timeout_seconds=7)
    with store.engine.connect() as con:
        assert con.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert con.exec_driver_sql("PRAGMA busy_timeout").scalar() == 7000
        assert con.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1


@pytest.fixture(params=["sqlite", "postgresql"])
def any_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A new database on SQLite, then on PostgreSQL (skipped without a server)."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 's.db'}"
    return str(request.getfixturevalue("pg_url"))


def test_one_open_row_per_path_and_content(any_url: str) -> None:
    """The exactly-once index, partial on both databases (on PostgreSQL its predicate is
    added as the table is created: worker.records.models `_open_file_index_on_postgresql`)."""
    store = Store(any_url)
    with store.write() as s:
        s.add(_row())
    with pytest.raises(IntegrityError), store.write() as s:
        s.add(_row())  # the same file, still unfinished: refused
    with store.write() as s:
        first = s.get(ImageRecord, 1)
        assert first is not None
        first.status, first.moved_at = ImageStatus.SCORED, dt.datetime(2026, 1, 1)
    with store.write() as s:
        s.add(_row())  # dropped again after the first was finished and moved: a new row
    assert len(store.all_images()) == 2
    store.dispose()


def test_write_rolls_back_on_error(tmp_path: Path) -> None:
    store = Store(f"sqlite:///{tmp_path / 's.db'}")
    with pytest.raises(RuntimeError), store.write() as s:
        s.add(_row())
        s.flush()
        raise RuntimeError("boom")
    with sqlite3.connect(tmp_path / "s.db") as con:
        assert con.execute("SELECT count(*) FROM images").fetchone()[0] == 0


def test_paths_round_trip_even_when_not_utf8() -> None:
    import os

    for raw in (b"/in/plain.png", b"/in/caf\xc3\xa9.png", b"/in/latin1-\xe9.png"):
        p = Path(os.fsdecode(raw))
        text = path_to_db(p)
        text.encode("utf-8")  # storable in SQLite
        assert path_from_db(text) == p
    assert display_name(Path(os.fsdecode(b"/in/latin1-\xe9.png"))) == "/in/latin1-\\xe9.png"
