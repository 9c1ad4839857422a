"""Fault injection: crashes at every step, SIGKILL at random moments, bad input, two workers,
readers during writes. Every file dropped must end with exactly one row, moved, nothing lost.

The quick versions run in CI; `pytest -m slow` runs the long ones (more kills, more files).
"""

from __future__ import annotations

import os
import random
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from tests.conftest import REPO, run_with_faults, screen_env, write_mammo_like
from worker.faults import POINTS
from worker.intake.lock import LOCK_NAME


def _screen(workdir: Path, *args: str, crash_at: str | None = None,
            timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return run_with_faults(workdir / "config.toml", *args, crash_at=crash_at, timeout=timeout)


def drop_files(inbox: Path, n: int, seed: int = 0, prefix: str = "img") -> list[str]:
    """n small images (a few repeated contents, so duplicates happen) and a few bad files."""
    rng = random.Random(seed)
    names = []
    for i in range(n):
        name = f"{prefix}{i:04d}.png"
        # About half the contents repeat within a drop (duplicates); drops differ by seed.
        write_mammo_like(inbox / name, size=(64, 48),
                         seed=seed * 100_000 + rng.randrange(max(n // 2, 1)))
        names.append(name)
    for i, data in enumerate([b"", b"not an image", b"\xff\xd8\xff\xe0 truncated"]):
        name = f"{prefix}bad{i}.jpg"
        (inbox / name).write_bytes(data)
        names.append(name)
    return names


def assert_exactly_once(workdir: Path, names: list[str], url: str | None = None
                        ) -> dict[str, int]:
    """Every file one row, final, moved; the inbox empty; the files on disk exactly the rows'
    destinations. `url`: the database, when it is not the workdir's screen.db (PostgreSQL)."""
    query = "SELECT filename, status, moved_at, final_path FROM images"
    if url is None:
        with sqlite3.connect(workdir / "screen.db") as con:
            rows = con.execute(query).fetchall()
    else:
        from sqlalchemy import create_engine, text

        engine = create_engine(url)
        with engine.connect() as conn:
            rows = [tuple(r) for r in conn.execute(text(query))]
        engine.dispose()
    by_name: dict[str, int] = {}
    for filename, *_ in rows:
        by_name[filename] = by_name.get(filename, 0) + 1
    assert sorted(by_name) == sorted(names), "a file is missing or unexpected"
    assert all(v == 1 for v in by_name.values()), {k: v for k, v in by_name.items() if v > 1}
    assert all(status in ("scored", "duplicate", "quarantined") for _, status, _, _ in rows)
    assert all(moved for _, _, moved, _ in rows), "a move is still owed"
    left = [p.name for p in (workdir / "inbox").iterdir() if p.name != LOCK_NAME]
    assert left == [], f"left in the inbox: {left}"
    on_disk = {str(p) for d in ("processed", "quarantine") for p in (workdir / d).rglob("*")
               if p.is_file()}
    assert on_disk == {fp for *_, fp in rows}, "files on disk and rows disagree"
    counts: dict[str, int] = {}
    for _, status, _, _ in rows:
        counts[status] = counts.get(status, 0) + 1
    return counts


@pytest.mark.parametrize("point", POINTS)
def test_crash_at_each_step_then_restart(workdir: Path, point: str) -> None:
    names = drop_files(workdir / "inbox", 12)
    # Die the 2nd time the step is reached: mid-batch for per-file steps, the second batch
    # (of 8) for per-batch steps, so work is both done and undone at the crash.
    first = _screen(workdir, "process", "--timeout", "20", crash_at=f"{point}:2")
    assert first.returncode == 137, first.stderr
    second = _screen(workdir, "process", "--timeout", "20")
    assert second.returncode == 0, second.stderr
    counts = assert_exactly_once(workdir, names)
    assert counts["quarantined"] == 3
    assert counts["scored"] + counts.get("duplicate", 0) == 12


def _kill_loop(workdir: Path, names_batches: int, kills: int, files_per_batch: int,
               seed: int) -> tuple[list[str], int]:
    """Start `screen watch`, drop files, SIGKILL it at random moments, restart; repeat."""
    rng = random.Random(seed)
    names: list[str] = []
    survived = 0
    for k in range(kills):
        if k < names_batches:
            names += drop_files(workdir / "inbox", files_per_batch, seed=seed + k,
                                prefix=f"k{k}_")
        proc = subprocess.Popen([sys.executable, "-m", "worker", "--config",
                                 str(workdir / "config.toml"), "watch"],
                                cwd=REPO, env=screen_env(), stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(1.0, 3.5))  # start-up is ~1-2 s: kill before, during, after
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        survived += 1
    final = _screen(workdir, "process", "--timeout", "30", timeout=300)
    assert final.returncode == 0, final.stderr
    return names, survived


def test_random_sigkill_quick(workdir: Path) -> None:
    names, kills = _kill_loop(workdir, names_batches=3, kills=4, files_per_batch=25, seed=7)
    counts = assert_exactly_once(workdir, names)
    assert kills == 4 and sum(counts.values()) == len(names)


@pytest.mark.slow
def test_random_sigkill_long(workdir: Path) -> None:
    names, kills = _kill_loop(workdir, names_batches=15, kills=30, files_per_batch=40, seed=11)
    counts = assert_exactly_once(workdir, names)
    print(f"\nkills survived: {kills}, files: {len(names)}, outcome: {counts}")


def test_poison_file_that_kills_the_worker_is_quarantined(workdir: Path) -> None:
    """A file that crashes the worker on every attempt ends quarantined after max_attempts."""
    names = drop_files(workdir / "inbox", 1)
    for _ in range(3):  # max_attempts = 3 (default)
        assert _screen(workdir, "process", crash_at="after_preprocess:1").returncode == 137
    assert _screen(workdir, "process").returncode == 0
    assert_exactly_once(workdir, names)
    with sqlite3.connect(workdir / "screen.db") as con:
        errors = [e for (e,) in con.execute("SELECT error FROM images WHERE status='quarantined'")]
        history = con.execute("SELECT count(*) FROM events WHERE kind='retry'").fetchone()[0]
    # The crash came before any decision was committed, so all four files hit the limit.
    assert len(errors) == 4 and all("gave up after 3 attempts" in (e or "") for e in errors)
    assert history == 4 * 3  # attempts 2, 3 and 4 of each file


def test_second_worker_on_the_same_inbox_refuses(workdir: Path) -> None:
    proc = subprocess.Popen([sys.executable, "-m", "worker", "--config",
                             str(workdir / "config.toml"), "watch"],
                            cwd=REPO, env=screen_env(), stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while not (workdir / "inbox" / LOCK_NAME).exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(0.5)
        second = _screen(workdir, "process")
        assert second.returncode == 1
        assert "another worker" in second.stderr and "Traceback" not in second.stderr
    finally:
        proc.terminate()
        proc.wait(20)
    assert _screen(workdir, "process").returncode == 0  # the lock died with the first


def test_readers_never_see_database_locked(workdir: Path) -> None:
    """`screen report` and `screen results` in a tight loop while the worker writes."""
    from worker.cli import cli
    from worker.config import load_config
    from worker.records.connect import open_store

    names = drop_files(workdir / "inbox", 150)
    # Readers never create a database; this one exists, as after the worker's first start.
    open_store(load_config(workdir / "config.toml"), create=True).dispose()
    errors: list[str] = []
    stop = threading.Event()

    def read_loop() -> None:
        runner = CliRunner()
        while not stop.is_set():
            for args in (["report", "--format", "json"], ["results", "--format", "csv"]):
                r = runner.invoke(cli, ["--config", str(workdir / "config.toml"), *args])
                if r.exit_code != 0:
                    errors.append(r.output + repr(r.exception))

    reader = threading.Thread(target=read_loop)
    reader.start()
    try:
        proc = _screen(workdir, "process", "--batch-size", "4", "--timeout", "30", timeout=300)
    finally:
        stop.set()
        reader.join(60)
    assert proc.returncode == 0, proc.stderr
    assert "locked" not in proc.stderr
    assert errors == []
    assert_exactly_once(workdir, names)


def test_bad_input_catalogue(workdir: Path, tmp_path: Path) -> None:
    """Every kind of bad input is quarantined with a reason, and the worker carries on."""
    import io
    import struct
    import zlib

    from PIL import Image

    inbox = workdir / "inbox"
    good = write_mammo_like(tmp_path / "g.png", size=(120, 100)).read_bytes()
    good_jpg = write_mammo_like(tmp_path / "g.jpg", size=(120, 100)).read_bytes()

    def png_header(w: int, h: int) -> bytes:
        chunk = b"IHDR" + struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)
        return (b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + chunk
                + struct.pack(">I", zlib.crc32(chunk)))

    bomb = io.BytesIO()  # 12000 x 12000 zeros: ~140 KB that would decode to 144 MB
    Image.new("L", (12000, 12000)).save(bomb, format="PNG")
    bad = {
        "empty.png": (b"", "empty file"),
        "truncated.jpg": (good_jpg[: len(good_jpg) // 2], "truncated"),
        "truncated.png": (good[: len(good) // 2], "corrupt or truncated"),
        "random.jpg": (np.random.default_rng(0).bytes(5000), "not a supported image"),
        "notes.txt": (b"patient notes\n", "not a supported image"),
        "huge.png": (png_header(30000, 30000), "too large"),
        "bomb.png": (bomb.getvalue(), "too large"),
    }
    for name, (data, _) in bad.items():
        (inbox / name).write_bytes(data)
    goods = {}
    rgb = Image.fromarray(np.stack([np.full((50, 40), v, np.uint8) for v in (10, 80, 200)], -1))
    for mode, fmt, name in (("CMYK", "JPEG", "cmyk.jpg"), ("P", "PNG", "palette.png")):
        buf = io.BytesIO()
        rgb.convert(mode).save(buf, format=fmt)
        goods[name] = buf.getvalue()
    goods["sixteen.png"] = write_mammo_like(tmp_path / "s.png", dtype=np.uint16).read_bytes()
    goods["name with spaces é.png"] = good
    goods["folder/inner.png"] = write_mammo_like(tmp_path / "i.png", seed=5).read_bytes()
    for name, data in goods.items():
        (inbox / name).parent.mkdir(exist_ok=True)
        (inbox / name).write_bytes(data)
    raw_name = os.fsencode(inbox) + b"/latin1-\xe9.png"  # not valid UTF-8
    with open(raw_name, "wb") as fh:
        fh.write(write_mammo_like(tmp_path / "l.png", seed=9).read_bytes())
    outside = write_mammo_like(tmp_path / "outside.png")
    (inbox / "link.png").symlink_to(outside)

    proc = _screen(workdir, "process", "--timeout", "20")
    assert proc.returncode == 0, proc.stderr
    with sqlite3.connect(workdir / "screen.db") as con:
        rows = dict(con.execute("SELECT filename, coalesce(error, status) FROM images"))
    for name, (_, reason) in bad.items():
        assert reason in rows[name], (name, rows[name])
    for name in goods:
        assert rows[name] == "scored", (name, rows[name])
    assert rows["latin1-\\xe9.png"] == "scored"
    assert "link.png" not in rows and outside.exists()
    assert (workdir / "processed" / "folder" / "inner.png").exists()
    assert os.path.exists(os.fsencode(workdir / "processed") + b"/latin1-\xe9.png")


def _peak_rss_mb(workdir: Path) -> tuple[int, float]:
    """Run `screen process` in a fresh wrapper; its return code and the worker's peak RSS."""
    wrapper = ("import resource, subprocess, sys; "
               "r = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, "
               "stderr=subprocess.DEVNULL); "
               "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); "
               "sys.exit(r.returncode)")
    proc = subprocess.run([sys.executable, "-c", wrapper, sys.executable, "-m", "worker",
                           "--config", str(workdir / "config.toml"), "process", "--batch-size",
                           "16"], cwd=REPO, env=screen_env(), capture_output=True, text=True,
                          timeout=1800)
    return proc.returncode, int(proc.stdout.strip().splitlines()[-1]) / 1024


def _burst(workdir: Path, n: int, prefix: str, first: int = 0) -> tuple[list[str], float]:
    inbox = workdir / "inbox"
    src = write_mammo_like(workdir / "src.png", size=(200, 160)).read_bytes()
    names = []
    for i in range(n):
        # Distinct content per file (one byte appended after IEND is ignored by decoders),
        # so every file is scored rather than recognised as a duplicate.
        name = f"{prefix}{i:05d}.png"
        (inbox / name).write_bytes(src + (first + i).to_bytes(4, "big"))
        names.append(name)
    rc, rss = _peak_rss_mb(workdir)
    assert rc == 0
    return names, rss


def test_burst_quick(workdir: Path) -> None:
    names, _ = _burst(workdir, 300, "b")
    counts = assert_exactly_once(workdir, names)
    assert counts == {"scored": 300}


@pytest.mark.slow
def test_burst_2000_memory_does_not_grow_with_backlog(workdir: Path) -> None:
    small, rss_small = _burst(workdir, 250, "s")
    big, rss_big = _burst(workdir, 2000, "b", first=250)
    counts = assert_exactly_once(workdir, small + big)
    print(f"\nburst: 250 files peak RSS {rss_small:.0f} MB, 2000 files {rss_big:.0f} MB")
    assert counts == {"scored": 2250}
    assert rss_big < 1.25 * rss_small
