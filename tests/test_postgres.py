"""PostgreSQL: every command against a real server (tests/pg.py), the same schema as SQLite, and
several workers on one inbox, killed at random, with every file still recorded exactly once."""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from sqlalchemy import create_engine, inspect, text
from sqlalchemy.exc import ProgrammingError

from tests.conftest import REPO, screen_env
from tests.test_faults import _screen, assert_exactly_once, drop_files
from worker.intake.lock import InboxBusyError, InboxLock


@pytest.fixture
def pg_workdir(workdir: Path, pg_url: str) -> Path:
    """The workdir's config pointed at a fresh PostgreSQL database, with a short lease (a
    killed worker's claims are taken over 10 s after its last beat)."""
    cfg = workdir / "config.toml"
    text_ = cfg.read_text().replace("url = 'sqlite:///screen.db'", f"url = '{pg_url}'")
    cfg.write_text(text_ + "heartbeat_seconds = 0.5\nheartbeat_stale_seconds = 10\n")
    return workdir


def _rows(url: str, sql: str) -> list[tuple]:
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            return [tuple(r) for r in conn.execute(text(sql))]
    finally:
        engine.dispose()


def test_every_command_against_postgres(pg_workdir: Path, pg_url: str) -> None:
    names = drop_files(pg_workdir / "inbox", 10, seed=3)
    done = _screen(pg_workdir, "process", "--timeout", "20")
    assert done.returncode == 0, done.stderr
    assert_exactly_once(pg_workdir, names, url=pg_url)
    assert not (pg_workdir / "screen.db").exists()  # nothing went to SQLite
    for args in (("results", "--format", "csv"), ("report",), ("status", "--format", "json")):
        out = _screen(pg_workdir, *args)
        assert out.returncode == 0, (args, out.stderr)
    results = _screen(pg_workdir, "results", "--format", "csv").stdout
    assert all(name in results for name in names)
    status = _screen(pg_workdir, "status", "--format", "json").stdout
    assert "postgresql+psycopg" in status
    truth = pg_workdir / "truth.csv"
    truth.write_text("filename,label\nimg0000.png,malignant\n")
    imported = _screen(pg_workdir, "outcomes", "import", str(truth))
    assert imported.returncode == 0, imported.stderr
    assert _rows(pg_url, "SELECT label FROM outcomes") == [("malignant",)]


def test_unreachable_postgres_is_one_line(workdir: Path, tmp_path: Path) -> None:
    cfg = workdir / "config.toml"
    url = f"postgresql+psycopg://someone:secret@/nowhere?host={tmp_path}"
    cfg.write_text(cfg.read_text().replace("url = 'sqlite:///screen.db'", f"url = '{url}'"))
    out = _screen(workdir, "status")
    assert out.returncode == 1
    assert "cannot open database" in out.stderr and "Traceback" not in out.stderr
    assert "secret" not in out.stderr  # the password is never shown


def test_schema_is_the_same_on_sqlite_and_postgres(tmp_path: Path, pg_url: str) -> None:
    from worker.records.store import Store

    def shape(url: str) -> dict[str, set[str]]:
        store = Store(url)
        try:
            insp = inspect(store.engine)
            return {t: {c["name"] for c in insp.get_columns(t)} | {
                f"index:{i['name']}" for i in insp.get_indexes(t)
                # PostgreSQL also lists a UNIQUE constraint's own index: the constraint counts.
                if not i.get("duplicates_constraint")}
                for t in insp.get_table_names()}
        finally:
            store.dispose()

    sqlite = shape(f"sqlite:///{tmp_path / 'a.db'}")
    postgres = shape(pg_url)
    assert sqlite == postgres
    assert "claimed_by" in sqlite["images"] and "workers" in sqlite


def test_sqlite_keeps_one_worker_per_inbox_and_says_why(tmp_path: Path) -> None:
    with InboxLock(tmp_path), pytest.raises(InboxBusyError) as busy:
        InboxLock(tmp_path).acquire()
    assert "PostgreSQL" in str(busy.value)


def _start(workdir: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "worker", "--config",
                             str(workdir / "config.toml"), "watch"],
                            cwd=REPO, env=screen_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)


def _busy_pids(url: str) -> set[int]:
    """The pids of the workers holding unfinished claims now (none before the schema exists)."""
    try:
        return {pid for (pid,) in _rows(
            url, "SELECT w.pid FROM workers w JOIN images i ON i.claimed_by = w.id "
                 "WHERE i.moved_at IS NULL AND w.stopped_at IS NULL")}
    except ProgrammingError:
        return set()


def _several_workers_with_kills(workdir: Path, url: str, rounds: int, files_per_round: int,
                                seed: int) -> tuple[list[str], int]:
    """Three `screen watch` on one inbox; files dropped in rounds; after each round one worker,
    at random, is SIGKILLed at a random moment and restarted; `screen report` and `screen
    status` read while they write. Then the survivors finish the inbox (taking over the
    claims of the killed ones once their lease runs out) and are stopped."""
    rng = random.Random(seed)
    inbox = workdir / "inbox"
    procs = [_start(workdir) for _ in range(3)]
    names: list[str] = []
    kills = 0
    try:
        for r in range(rounds):
            names += drop_files(inbox, files_per_round, seed=seed + r, prefix=f"r{r}_")
            # Rather a worker holding claims at this moment (so that takeovers happen): look
            # for one from a random moment on, for a while (tiny files go fast).
            time.sleep(rng.uniform(0.0, 1.0))
            look_until = time.monotonic() + 5.0
            busy = _busy_pids(url)
            while not busy and time.monotonic() < look_until:
                time.sleep(0.02)
                busy = _busy_pids(url)
            holding = [i for i, p in enumerate(procs) if p.pid in busy]
            victim = rng.choice(holding) if holding else rng.randrange(len(procs))
            procs[victim].send_signal(signal.SIGKILL)
            procs[victim].wait(10)
            kills += 1
            procs[victim] = _start(workdir)
            for args in (("report",), ("status", "--format", "json")):
                out = _screen(workdir, *args)
                assert out.returncode == 0, (args, out.stderr)
        # Not a timed assertion: a bound on the wait, then the state is checked whatever it is.
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            left = [p for p in inbox.iterdir() if not p.name.startswith(".")]
            owed = _rows(url, "SELECT count(*) FROM images WHERE moved_at IS NULL")[0][0]
            if not left and not owed:
                break
            time.sleep(1.0)
    finally:
        for p in procs:
            p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(60)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(10)
    return names, kills


def _assert_scored_once(url: str) -> None:
    """Each content scored once: the copies (across workers too) are duplicates."""
    scored = _rows(url, "SELECT sha256, count(*) FROM images WHERE status = 'scored' "
                        "GROUP BY sha256 HAVING count(*) > 1")
    assert scored == [], f"content scored more than once: {scored}"
    dups = _rows(url, "SELECT count(*) FROM images WHERE status = 'duplicate'")[0][0]
    assert dups > 0  # drop_files repeats contents, so some copies met an original


def test_three_workers_one_inbox_random_sigkills(pg_workdir: Path, pg_url: str) -> None:
    names, kills = _several_workers_with_kills(pg_workdir, pg_url, rounds=6,
                                               files_per_round=47, seed=21)
    assert len(names) == 300 and kills == 6
    counts = assert_exactly_once(pg_workdir, names, url=pg_url)
    assert sum(counts.values()) == len(names)
    _assert_scored_once(pg_url)
    workers = _rows(pg_url, "SELECT count(DISTINCT claimed_by) FROM images")[0][0]
    assert workers >= 2  # the work was shared, not done by one worker alone
    taken = _rows(pg_url, "SELECT count(*) FROM events WHERE kind = 'taken_over'")[0][0]
    print(f"\nkills: {kills}, files: {len(names)}, outcome: {counts}, taken over: {taken}")


@pytest.mark.slow
def test_three_workers_one_inbox_1000_files(pg_workdir: Path, pg_url: str) -> None:
    names, kills = _several_workers_with_kills(pg_workdir, pg_url, rounds=20,
                                               files_per_round=47, seed=5)
    assert len(names) == 1000
    counts = assert_exactly_once(pg_workdir, names, url=pg_url)
    _assert_scored_once(pg_url)
    taken = _rows(pg_url, "SELECT count(*) FROM events WHERE kind = 'taken_over'")[0][0]
    print(f"\nkills: {kills}, files: {len(names)}, outcome: {counts}, taken over: {taken}")


def test_local_inbox_per_machine_only_the_database_shared(pg_workdir: Path, pg_url: str) -> None:
    """Layout 2: machine A and machine B, each its own inbox and folders, one database. A is
    killed after deciding its batch, before moving it; once its lease has run out, B (which
    cannot see A's files) must not take A's owed moves over and record them missing; B still
    recognises its copies of A's images as duplicates; A, restarted, finishes its own moves."""
    a = pg_workdir
    cfg = (a / "config.toml").read_text().replace("heartbeat_stale_seconds = 10",
                                                  "heartbeat_stale_seconds = 1")
    (a / "config.toml").write_text(cfg)
    b = a / "machine-b"
    for folder in ("inbox", "processed", "quarantine", "outbox"):
        (b / folder).mkdir(parents=True)
    (b / "config.toml").write_text(cfg.replace("path = 'models/", "path = '../models/"))
    names_a = drop_files(a / "inbox", 5, seed=9, prefix="a")
    crashed = _screen(a, "process", "--timeout", "20", crash_at="after_decision:1")
    assert crashed.returncode == 137, crashed.stderr
    owed = _rows(pg_url, "SELECT count(*) FROM images WHERE moved_at IS NULL")[0][0]
    assert owed == len(names_a)
    time.sleep(1.5)  # A's lease (1 s) runs out: B would be allowed to take over what it sees
    names_b = drop_files(b / "inbox", 5, seed=9, prefix="b")  # the same contents as A's
    # One machine plays both: while B runs, A's disk is out of B's sight (as on another machine).
    (a / "inbox").rename(a / "inbox-elsewhere")
    (a / "processed").rename(a / "processed-elsewhere")
    (a / "quarantine").rename(a / "quarantine-elsewhere")
    try:
        done_b = _screen(b, "process", "--timeout", "20")
    finally:
        for folder in ("inbox", "processed", "quarantine"):
            (a / f"{folder}-elsewhere").rename(a / folder)
    assert done_b.returncode == 0, done_b.stderr
    assert _rows(pg_url, "SELECT count(*) FROM images WHERE moved_at IS NULL")[0][0] == owed
    assert _rows(pg_url, "SELECT count(*) FROM events WHERE kind = 'missing'")[0][0] == 0
    b_rows = _rows(pg_url, "SELECT status FROM images WHERE filename LIKE 'b%'")
    assert len(b_rows) == len(names_b)
    assert sum(1 for (st,) in b_rows if st == "duplicate") >= 1  # copies of A's images
    assert sum(1 for (st,) in b_rows if st == "scored") == 0  # every content was A's first
    done_a = _screen(a, "process", "--timeout", "20")
    assert done_a.returncode == 0, done_a.stderr
    rows = _rows(pg_url, "SELECT filename, moved_at, final_path FROM images")
    assert sorted(r[0] for r in rows) == sorted(names_a + names_b)
    assert all(moved for _, moved, _ in rows)
    for machine in (a, b):
        assert list((machine / "inbox").iterdir()) == []
    on_disk = {str(p) for m in (a, b) for d in ("processed", "quarantine")
               for p in (m / d).rglob("*") if p.is_file()}
    assert on_disk == {fp for *_, fp in rows}


@pytest.mark.parametrize("point", ["after_receive", "after_decision"])
def test_a_dead_workers_claims_wait_for_its_lease_then_are_taken_over(
        pg_workdir: Path, pg_url: str, point: str) -> None:
    """Worker A is killed with its batch claimed (received, or decided and not moved). While
    A's lease runs, worker B leaves A's files alone; after it, B takes them over and finishes
    them: each file one row, moved once, its history saying who took it over."""
    cfg = pg_workdir / "config.toml"
    names = drop_files(pg_workdir / "inbox", 5, seed=4)
    crashed = _screen(pg_workdir, "process", "--timeout", "20", crash_at=f"{point}:1")
    assert crashed.returncode == 137, crashed.stderr
    claimed = _rows(pg_url, "SELECT count(*) FROM images WHERE moved_at IS NULL")[0][0]
    assert claimed == len(names)
    # The lease is 10 s: B, started at once, must leave A's claimed files where they are.
    waiting = _screen(pg_workdir, "process", "--timeout", "3")
    assert waiting.returncode == 0, waiting.stderr
    assert _rows(pg_url, "SELECT count(*) FROM images WHERE moved_at IS NULL")[0][0] == claimed
    assert _rows(pg_url, "SELECT count(*) FROM events WHERE kind = 'taken_over'")[0][0] == 0
    cfg.write_text(cfg.read_text().replace("heartbeat_stale_seconds = 10",
                                           "heartbeat_stale_seconds = 1"))
    time.sleep(1.5)  # A's last beat is now older than the 1 s lease
    done = _screen(pg_workdir, "process", "--timeout", "20")
    assert done.returncode == 0, done.stderr
    assert_exactly_once(pg_workdir, names, url=pg_url)
    taken = _rows(pg_url, "SELECT count(DISTINCT image_id) FROM events WHERE kind = 'taken_over'")
    assert taken[0][0] == claimed
    _assert_scored_once(pg_url)
