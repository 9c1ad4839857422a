"""Worker throughput and memory: run with `python bench/bench_worker.py [--files N]`.

Prints figures, asserts nothing (these machines are shared and noisy; quote medians and
ratios from one run). Measures, with the shipped model:
  * preprocessing time per image (decode + polarity + resize), median over the sample;
  * ONNX Runtime time per image at batch sizes 1, 4, 16, 32 (median of repeats);
  * end to end: `screen process` over a burst of N files (default 2000), files/s, and the
    worker's peak RSS, against a burst of N/4 (RSS should not grow with the backlog).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from worker.config import SCHEMA  # noqa: E402
from worker.preprocess import preprocess_bytes  # noqa: E402
from worker.scorer import Scorer  # noqa: E402

DATA = Path(os.environ.get("MAMMO_DATA", REPO.parent / "shared" / "data" / "mammo-3383"))
MODEL = REPO / "models" / "mammo-lite0-probe-256.onnx"


def _median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def bench_components(images: list[Path], model: Path) -> dict[str, float]:
    scorer = Scorer(model)
    settings = scorer.metadata.preprocess
    blobs = [p.read_bytes() for p in images]
    pre = [_median_time(lambda b=b: preprocess_bytes(b, settings), 3) for b in blobs[:32]]
    arrays = [preprocess_bytes(b, settings) for b in blobs[:32]]
    out = {"preprocess_ms_per_image": 1000 * statistics.median(pre)}
    scorer.score_batch(arrays[:1])  # warm-up
    for bs in (1, 4, 16, 32):
        t = _median_time(lambda bs=bs: scorer.score_batch(arrays[:bs]), 7)
        out[f"onnx_ms_per_image_batch{bs}"] = 1000 * t / bs
    return out


def bench_burst(images: list[Path], n: int, model: Path, batch_size: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        inbox = root / "inbox"
        inbox.mkdir()
        for i in range(n):
            shutil.copyfile(images[i % len(images)], inbox / f"f{i:05d}.jpg")
        (root / "config.toml").write_text(
            f"[model]\npath = '{model}'\n[paths]\ninbox = 'inbox'\nprocessed = 'out'\n"
            "quarantine = 'q'\n[database]\nurl = 'sqlite:///s.db'\n"
            f"[worker]\nsettle_seconds = 0.2\nbatch_size = {batch_size}\n"
        )
        t = time.perf_counter()
        # A fresh wrapper per burst, so RUSAGE_CHILDREN's peak is this worker's alone.
        wrapper = (
            "import resource, subprocess, sys; "
            "r = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL); "
            "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr); "
            "sys.exit(r.returncode)"
        )
        proc = subprocess.run(
            [sys.executable, "-c", wrapper, sys.executable, "-m", "worker", "--log-level",
             "WARNING", "--config", str(root / "config.toml"), "process"],
            cwd=REPO, capture_output=True, text=True,
        )
        wall = time.perf_counter() - t
        if proc.returncode != 0:
            raise SystemExit(proc.stderr)
        peak_kb = int(proc.stderr.strip().splitlines()[-1])
        left = len(list(inbox.glob("*.jpg")))
        return {"files": n, "seconds": wall, "files_per_s": n / wall,
                "peak_rss_mb": peak_kb / 1024, "left_in_inbox": left}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--files", type=int, default=2000)
    parser.add_argument("--model", type=Path, default=MODEL)
    parser.add_argument("--batch-size", type=int, default=SCHEMA["worker"]["batch_size"][1],
                        help="the worker's batch size [default: the config default]")
    args = parser.parse_args()
    images = sorted((DATA / "images").rglob("*.jpg"))[:200]
    if not images:
        raise SystemExit(f"no images under {DATA}")
    print(json.dumps({"components": bench_components(images, args.model)}, indent=2))
    small = bench_burst(images, max(args.files // 4, 16), args.model, args.batch_size)
    big = bench_burst(images, args.files, args.model, args.batch_size)
    print(json.dumps({"burst_small": small, "burst": big,
                      "rss_ratio_big_over_small": big["peak_rss_mb"] / small["peak_rss_mb"]},
                     indent=2))


if __name__ == "__main__":
    main()
