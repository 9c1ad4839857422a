"""By hand, not part of the suite: throughput of 1, 2 and 3 `screen watch` workers on one inbox
and one PostgreSQL (a server started as in tests/pg.py), and the time to take over a killed
worker's claims. Prints one table. Run from the repository root:

    python bench/bench_multiworker.py --files 200

Each worker count: the workers are started and beat first; then the files (dev-pool JPEGs,
shipped model) are copied into the inbox and the clock runs until every row is moved. Takeover:
two workers, one SIGKILLed once it has claims; the time from the kill to the first and the last
`taken_over` event, and the lease (heartbeat_stale_seconds) and rescan period it depends on.
"""

from __future__ import annotations

import argparse
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from sqlalchemy import create_engine, text  # noqa: E402
from sqlalchemy.exc import ProgrammingError  # noqa: E402

from tests.conftest import DATA, REPO, SHIPPED_MODEL  # noqa: E402
from tests.pg import postgres_server  # noqa: E402

LEASE = 10.0
RESCAN = 1.0


def _setup(root: Path, url: str) -> Path:
    for folder in ("inbox", "processed", "quarantine", "outbox"):
        (root / folder).mkdir(parents=True)
    (root / "config.toml").write_text(
        "[paths]\ninbox = 'inbox'\nprocessed = 'processed'\nquarantine = 'quarantine'\n"
        f"outbox = 'outbox'\n[database]\nurl = '{url}'\n[model]\npath = '{SHIPPED_MODEL}'\n"
        f"[worker]\nsettle_seconds = 0.2\nrescan_seconds = {RESCAN}\nheartbeat_seconds = 0.5\n"
        f"heartbeat_stale_seconds = {LEASE}\n")
    return root / "config.toml"


def _start(cfg: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "worker", "--config", str(cfg), "watch"],
                            cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _scalar(url: str, sql: str) -> float:
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            return conn.execute(text(sql)).scalar() or 0
    except ProgrammingError:  # the first worker has not made the tables yet
        return 0
    finally:
        engine.dispose()


def _wait(url: str, sql: str, until: float, limit: float = 900.0) -> None:
    end = time.monotonic() + limit
    while _scalar(url, sql) < until:
        if time.monotonic() > end:
            raise RuntimeError(f"gave up waiting: {sql}")
        time.sleep(0.2)


def throughput(server, files: list[Path], workers: int) -> float:
    url = server.new_database()
    root = Path(tempfile.mkdtemp(prefix="mw-"))
    cfg = _setup(root, url)
    procs = [_start(cfg) for _ in range(workers)]
    try:
        _wait(url, "SELECT count(*) FROM workers WHERE stopped_at IS NULL", workers)
        t0 = time.monotonic()
        for f in files:
            shutil.copyfile(f, root / "inbox" / f.name)
        _wait(url, "SELECT count(*) FROM images WHERE moved_at IS NOT NULL", len(files))
        return len(files) / (time.monotonic() - t0)
    finally:
        for p in procs:
            p.send_signal(signal.SIGTERM)
        for p in procs:
            p.wait(60)
        shutil.rmtree(root, ignore_errors=True)


def takeover(server, files: list[Path]) -> tuple[float, float, int]:
    url = server.new_database()
    root = Path(tempfile.mkdtemp(prefix="mw-"))
    cfg = _setup(root, url)
    procs = [_start(cfg) for _ in range(2)]
    try:
        _wait(url, "SELECT count(*) FROM workers WHERE stopped_at IS NULL", 2)
        for f in files:
            shutil.copyfile(f, root / "inbox" / f.name)
        victim_id = 0.0
        while not victim_id:  # the first worker to hold an unfinished claim
            victim_id = _scalar(url, "SELECT min(claimed_by) FROM images WHERE moved_at IS NULL")
        pid = int(_scalar(url, f"SELECT pid FROM workers WHERE id = {int(victim_id)}"))
        killed_at = time.time()
        victim = next(p for p in procs if p.pid == pid)
        victim.send_signal(signal.SIGKILL)
        victim.wait(10)
        _wait(url, "SELECT count(*) FROM images WHERE moved_at IS NOT NULL", len(files))
        first = _scalar(url, "SELECT extract(epoch FROM min(at)) FROM events "
                             "WHERE kind = 'taken_over'")
        last = _scalar(url, "SELECT extract(epoch FROM max(at)) FROM events "
                            "WHERE kind = 'taken_over'")
        n = int(_scalar(url, "SELECT count(*) FROM events WHERE kind = 'taken_over'"))
        # Stored times are naive UTC: as epoch seconds they compare with time.time().
        return (float(first) - killed_at if n else float("nan"),
                float(last) - killed_at if n else float("nan"), n)
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                p.wait(60)
        shutil.rmtree(root, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--files", type=int, default=200)
    args = ap.parse_args()
    files = sorted((DATA / "images").rglob("*.jpg"))[: args.files]
    gen = postgres_server()
    server = next(gen)
    try:
        rows = [(f"{n} worker(s), {len(files)} files",
                 f"{throughput(server, files, n):.1f} files/s") for n in (1, 2, 3)]
        first, last, n = takeover(server, files)
        rows.append((f"takeover, lease {LEASE:.0f} s, rescan {RESCAN:.0f} s",
                     f"first {first:.1f} s, last {last:.1f} s after the kill ({n} files)"))
    finally:
        gen.close()
    for name, value in rows:
        print(f"| {name} | {value} |")


if __name__ == "__main__":
    main()
