"""Main-thread CPU per file: `python bench/bench_bookkeeping.py [--files N]`.

The worker's calling thread receives, decides and moves while ONNX Runtime scores in its own
thread, so its CPU per file bounds `screen process` (issue 11). This copies N dev-pool files
into a temp inbox (with a file-name pattern, so that scored images join exams, and a few
copies, so that duplicates are decided too), processes them in-process with the shipped
model, and prints the calling thread's CPU time (`time.thread_time`, which other jobs
on the machine do not inflate) per file: in total, and in each bookkeeping step. Figures
only; nothing is asserted.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from worker.app import open_worker  # noqa: E402
from worker.config import load_config  # noqa: E402
from worker.logs import setup_logging  # noqa: E402
from worker.processing.pipeline import Pipeline  # noqa: E402

DATA = Path(os.environ.get("MAMMO_DATA", REPO.parent / "shared" / "data" / "mammo-3383"))
MODEL = REPO / "models" / "mammo-lite0-top-384.onnx"
STEPS = ("begin", "finish", "_receive_batch", "_commit_decisions", "_move_batch")


def _timed(cpu: dict[str, float], name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        t = time.thread_time()
        try:
            return fn(*args, **kwargs)
        finally:
            cpu[name] += time.thread_time() - t

    return wrapper


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--files", type=int, default=300)
    ap.add_argument("--batch", type=int, default=4)
    args = ap.parse_args()
    images = sorted((DATA / "images").glob("*/*.jpg"))[: args.files]
    if not images:
        sys.exit(f"no dev-pool images under {DATA} (set MAMMO_DATA)")
    with tempfile.TemporaryDirectory() as tmp, open(os.devnull, "w") as sink:
        root = Path(tmp)
        for folder in ("inbox", "processed", "quarantine", "outbox"):
            (root / folder).mkdir()
        for i, src in enumerate(images):
            # Ten images per study; every 25th file is a copy of the one before (a duplicate).
            shutil.copyfile(src, root / "inbox" / f"S{i // 10:04d}_{i:05d}.jpg")
            if i % 25 == 24:
                shutil.copyfile(src, root / "inbox" / f"S{i // 10:04d}_{i:05d}_copy.jpg")
        (root / "config.toml").write_text(
            "[paths]\ninbox = 'inbox'\nprocessed = 'processed'\nquarantine = 'quarantine'\n"
            "outbox = 'outbox'\n[database]\nurl = 'sqlite:///screen.db'\n"
            f"[model]\npath = '{MODEL.as_posix()}'\n"
            f"[worker]\nsettle_seconds = 0.05\nbatch_size = {args.batch}\n"
            "[identity]\nfilename_pattern = '^(?P<study_uid>S[0-9]+)_'\n"
        )
        # The worker's INFO lines, formatted as `screen process` does, written nowhere.
        setup_logging("INFO")
        logging.getLogger("mammo_screen").handlers[0].setStream(sink)
        worker = open_worker(load_config(root / "config.toml"), polling=True)
        cpu = dict.fromkeys(STEPS, 0.0)
        pipeline: Pipeline = worker.pipeline
        for name in STEPS:
            setattr(pipeline, name, _timed(cpu, name, getattr(pipeline, name)))
        try:
            results = worker.watcher.run_once(timeout=5.0)
        finally:
            worker.close()
    n = len(results)
    print(f"files: {n} (batch {args.batch})")
    print(f"main-thread CPU ms per file (begin + finish): "
          f"{1000 * (cpu['begin'] + cpu['finish']) / n:.2f}")
    for name in STEPS:
        print(f"  {name:<18} {1000 * cpu[name] / n:.2f}")


if __name__ == "__main__":
    main()
