"""Paired cold start of two checkouts: `python bench/bench_cold_start.py TREE_A TREE_B`.

For an A/B of a start-up change (one checkout before it, one after, e.g. from
`git worktree add`): each run copies N dev-pool files into a fresh inbox, waits a second,
starts `screen process` from the checkout and polls the database for the first score;
cold start is that score's time less the start, everything counted. The two checkouts
alternate (A B, B A, ...), so a slow spell of a shared machine falls on both. Prints each
checkout's median and runs; asserts nothing.
"""

from __future__ import annotations

import argparse
import random
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# The same pool, files and worker settings as bench_worker.py's cold start.
from bench_worker import DATA, db_time, drop_files, workdir

MODEL = Path("models") / "mammo-lite0-top-384.onnx"


def cold_start(tree: Path, images: list[Path], files: int, settle: float) -> float:
    """Seconds from starting `screen process` in `tree` to its first committed score."""
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        config = workdir(root, tree / MODEL, settle=settle)
        drop_files(images, files, root / "inbox")
        time.sleep(1.0)  # the files at rest, and the copies' writes off the disk
        start = time.time()
        proc = subprocess.Popen(
            [sys.executable, "-m", "worker", "--log-level", "WARNING", "--config",
             str(config), "process"],
            cwd=tree, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        )
        first = None
        while first is None:
            time.sleep(0.2)
            if proc.poll() is not None and proc.returncode != 0:
                raise SystemExit(f"{tree}: screen process failed: {proc.stderr.read()}")
            try:
                with sqlite3.connect(root / "s.db") as con:
                    (first,) = con.execute("SELECT MIN(scored_at) FROM images").fetchone()
            except sqlite3.Error:  # not created yet
                pass
        proc.terminate()
        proc.wait()
        return db_time(first) - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("trees", nargs=2, type=Path, help="two checkouts: before, after")
    parser.add_argument("--runs", type=int, default=6, help="runs of each (default 6)")
    parser.add_argument("--files", type=int, default=1000, help="files in the inbox")
    parser.add_argument("--settle", type=float, default=0.2, help="settle_seconds")
    args = parser.parse_args()
    images = sorted((DATA / "images").rglob("*.jpg"))
    if not images:
        raise SystemExit(f"no images under {DATA}")
    random.Random(0).shuffle(images)  # the files bench_worker.py drops, in its order
    trees = [t.resolve() for t in args.trees]
    times: dict[Path, list[float]] = {t: [] for t in trees}
    for i in range(args.runs):
        for tree in trees if i % 2 == 0 else trees[::-1]:
            times[tree].append(cold_start(tree, images, args.files, args.settle))
    print(f"cold start, {args.files} files at rest, settle_seconds {args.settle}, "
          f"process start to first score (median, then each run):")
    for tree, values in times.items():
        runs = " ".join(f"{v:.2f}" for v in values)
        print(f"  {tree}: {statistics.median(values):.3f} s  ({runs})")


if __name__ == "__main__":
    main()
