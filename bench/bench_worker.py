"""Worker throughput, latency and memory: `python bench/bench_worker.py [--files N]`.

Prints one table of figures and ratios from one run; asserts nothing (these machines are
shared and noisy: rerun on a quiet machine before quoting). With the shipped model (and its
int8 quantisation, made here unless --int8 names one), over dev-pool images:
  * bare ONNX Runtime over preprocessed tensors, batch 1 and the worker's images per call,
    images/s;
  * preprocessing alone (decode, polarity, resize, intensity), ms per image on one core;
  * the machine's limit (issue 11): inference at the bare rate with decoding spread over
    all cores, 1 / (t_infer + t_pre / cores);
  * `screen process` over N files dropped at once: files/s and the ratio to that limit, and
    the worker's peak RSS;
  * `screen watch`: a burst (files/s) and a trickle (latency from settled to committed,
    p50 and p95, from the database's times: settled = the file's mtime + settle_seconds,
    committed = `moved_at`, the end of the file's life);
  * cold start: process start to the first score committed (from the database), the files
    dropped just before: everything counted, the settle wait too where start-up does not
    cover it (the worker's first look at the inbox starts that wait with the process);
  * a plain Keras `predict` loop over the same files (with --keras FILE and keras installed).
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import random
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from worker.config import SCHEMA  # noqa: E402
from worker.imaging.preprocess import preprocess_bytes, preprocess_file  # noqa: E402
from worker.scoring.scorer import Scorer, call_size, threads_per_stream  # noqa: E402

DATA = Path(os.environ.get("MAMMO_DATA", REPO.parent / "shared" / "data" / "mammo-3383"))
MODEL = REPO / "models" / "mammo-lite0-top-384.onnx"
SETTLE = 0.2

Rows = list[tuple[str, str, str]]  # (figure, value, note)


def _median_time(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def bare_onnx(model: Path, images: list[Path], batch: int, streams: int = 1
              ) -> tuple[float, float]:
    """(images/s at batch 1, images/s at `batch`) over already-preprocessed tensors, in a
    plain ONNX Runtime session with its default options: with the cores to itself, its
    threads spinning between calls make it the fastest, so the limit is not flattered by
    the worker's own options (which suit a process that also decodes). With `streams`,
    that many threads call the session at once, each with its share of the cores (as the
    worker's `[model] streams` does), and the rate is theirs together."""
    import onnxruntime as ort

    settings = Scorer(model).metadata.preprocess
    options = ort.SessionOptions()
    if streams > 1:
        options.intra_op_num_threads = threads_per_stream(streams)
    session = ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    arrays = [preprocess_file(p, settings) for p in images[:32]]

    def run(chunk: list) -> None:
        session.run(None, {name: np.stack(chunk).astype(np.float32, copy=False)})

    def calls(bs: int) -> None:
        for i in range(0, 32 - bs + 1, bs):
            run(arrays[i : i + bs])

    def side_by_side(bs: int) -> None:
        threads = [threading.Thread(target=calls, args=(bs,)) for _ in range(streams)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

    run(arrays[:batch])  # warm-up
    out = []
    for bs in sorted({1, batch}):  # batch 1 measured once when the worker calls with 1
        t = _median_time(lambda bs=bs: side_by_side(bs), 5)
        out.append(streams * (32 // bs) * bs / t)
    return out[0], out[-1]


def preprocess_ms(model: Path, images: list[Path]) -> float:
    settings = Scorer(model).metadata.preprocess
    blobs = [p.read_bytes() for p in images[:64]]
    return 1000 * statistics.median(
        _median_time(lambda b=b: preprocess_bytes(b, settings), 3) for b in blobs
    )


def workdir(root: Path, model: Path, batch_size: int = SCHEMA["worker"]["batch_size"][1],
            per_call: int = SCHEMA["model"]["images_per_call"][1],
            streams: int = SCHEMA["model"]["streams"][1], settle: float = SETTLE) -> Path:
    """A worker's folders and config.toml under `root` (the worker's defaults unless given)."""
    for d in ("inbox", "out", "q", "outbox"):
        (root / d).mkdir(parents=True, exist_ok=True)
    (root / "config.toml").write_text(
        f"[model]\npath = '{model}'\nimages_per_call = {per_call}\nstreams = {streams}\n"
        "[paths]\ninbox = 'inbox'\nprocessed = 'out'\n"
        "quarantine = 'q'\noutbox = 'outbox'\n[database]\nurl = 'sqlite:///s.db'\n"
        f"[worker]\nsettle_seconds = {settle}\nbatch_size = {batch_size}\n"
    )
    return root / "config.toml"


def drop_files(images: list[Path], n: int, inbox: Path, prefix: str = "f") -> None:
    for i in range(n):
        source = images[i % len(images)]
        shutil.copyfile(source, inbox / f"{prefix}{i:05d}{source.suffix}")


def _db_times(db: Path, sql: str) -> list[tuple]:
    with sqlite3.connect(db) as con:
        return con.execute(sql).fetchall()


def db_time(text: str) -> float:
    """The database's naive-UTC time as epoch seconds."""
    return dt.datetime.fromisoformat(text).replace(tzinfo=dt.UTC).timestamp()


def screen_process(images: list[Path], n: int, model: Path, batch_size: int,
                   per_call: int, streams: int) -> dict[str, float]:
    """`screen process` over n files dropped at once: files/s (from the first file settled to
    the last committed, so start-up and the settle wait are not counted), peak RSS, and the
    cold start (process start to first score)."""
    with tempfile.TemporaryDirectory() as tmp:
        config = workdir(Path(tmp), model, batch_size, per_call, streams)
        drop_files(images, n, Path(tmp) / "inbox")
        # A fresh wrapper per run, so RUSAGE_CHILDREN's peak is this worker's alone. It notes
        # when it starts the worker: its own interpreter's start is not the worker's.
        wrapper = (
            "import resource, subprocess, sys, time; "
            "print(time.time(), file=sys.stderr, flush=True); "
            "r = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL); "
            "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr); "
            "sys.exit(r.returncode)"
        )
        proc = subprocess.run(
            [sys.executable, "-c", wrapper, sys.executable, "-m", "worker", "--log-level",
             "WARNING", "--config", str(config), "process"],
            cwd=REPO, capture_output=True, text=True,
        )
        if proc.returncode != 0:
            raise SystemExit(proc.stderr)
        (first_received, first_scored, last_moved, done) = _db_times(
            Path(tmp) / "s.db",
            "SELECT MIN(received_at), MIN(scored_at), MAX(moved_at), COUNT(moved_at) "
            "FROM images",
        )[0]
        span = db_time(last_moved) - db_time(first_received)
        lines = proc.stderr.strip().splitlines()
        return {"files": done, "files_per_s": done / span,
                "peak_rss_mb": int(lines[-1]) / 1024,
                "cold_start_s": db_time(first_scored) - float(lines[0])}


def screen_watch(images: list[Path], burst: int, trickle: int, rate: float, model: Path,
                 batch_size: int, per_call: int, streams: int) -> dict[str, float]:
    """`screen watch`: a burst of files (files/s), then a trickle at `rate` files/s
    (latency from settled to committed, p50 and p95)."""
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        config = workdir(root, model, batch_size, per_call, streams)
        db = root / "s.db"
        proc = subprocess.Popen(
            [sys.executable, "-m", "worker", "--log-level", "INFO", "--config", str(config),
             "watch"],
            cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        )
        try:
            assert proc.stderr is not None
            for line in proc.stderr:  # ready once it says it is watching
                if "watching inbox" in line:
                    break
            threading_drain(proc)

            def wait_for(total: int, limit: float) -> None:
                deadline = time.time() + limit
                while time.time() < deadline:
                    if db.exists() and _db_times(
                        db, "SELECT COUNT(moved_at) FROM images")[0][0] >= total:
                        return
                    time.sleep(0.2)
                raise SystemExit(f"screen watch did not finish {total} files in {limit:.0f}s")

            drop_files(images, burst, root / "inbox", "b")
            wait_for(burst, 60 + burst)
            first, last = _db_times(db, "SELECT MIN(received_at), MAX(moved_at) FROM images")[0]
            burst_rate = burst / (db_time(last) - db_time(first))
            for i in range(trickle):
                shutil.copyfile(images[i % len(images)], root / "inbox" / f"t{i:05d}.jpg")
                time.sleep(1 / rate)
            wait_for(burst + trickle, 60 + trickle)
            rows = _db_times(db, "SELECT filename, moved_at FROM images WHERE filename "
                                 "LIKE 't%' ORDER BY id")
        finally:
            proc.terminate()
            proc.wait(30)
        # The file's mtime (moved with it) says when it was last written.
        latencies = sorted(
            db_time(moved) - ((root / "out" / name).stat().st_mtime + SETTLE)
            for name, moved in rows
        )
        return {"burst_files_per_s": burst_rate,
                "latency_p50_s": statistics.median(latencies),
                "latency_p95_s": latencies[int(0.95 * (len(latencies) - 1))]}


def threading_drain(proc: subprocess.Popen[str]) -> None:
    """Keep reading the worker's log so its pipe never fills and blocks it."""
    import threading

    def drain() -> None:
        assert proc.stderr is not None
        for _ in proc.stderr:
            pass

    threading.Thread(target=drain, daemon=True).start()


def keras_loop(keras_file: Path, model: Path, images: list[Path], n: int) -> float | str:
    """What a user would write instead: for each file, preprocess it and `model.predict`."""
    try:
        from trainer.layers import load_trained
    except ImportError:
        return "skipped: keras is not installed"
    try:
        net = load_trained(keras_file)
    except Exception as exc:  # noqa: BLE001
        return f"skipped: cannot load {keras_file}: {str(exc).splitlines()[0]}"
    settings = Scorer(model).metadata.preprocess
    paths = [images[i % len(images)] for i in range(n)]
    net.predict(preprocess_file(paths[0], settings)[None], verbose=0)  # warm-up
    t = time.perf_counter()
    for p in paths:
        net.predict(preprocess_file(p, settings)[None], verbose=0)
    return n / (time.perf_counter() - t)


def make_int8(model: Path, out: Path) -> Path:
    from export.quantise import quantise_from_run

    # Made to be measured, whether or not it would pass the accuracy checks.
    report = quantise_from_run(model, out, DATA / "labels.csv", None, 64, 200, 0,
                               max_auc_drop=1.0, max_rate_change=1.0)
    print(report.describe(), file=sys.stderr)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=int, default=1000, help="files for `screen process`")
    parser.add_argument("--model", type=Path, default=MODEL)
    parser.add_argument("--int8", type=Path, default=None,
                        help="the int8 model [default: quantise --model into a temp folder]")
    parser.add_argument("--keras", type=Path, default=None,
                        help="the .keras model the ONNX one was exported from (Keras row)")
    parser.add_argument("--keras-files", type=int, default=200)
    parser.add_argument("--trickle", type=int, default=100,
                        help="files dropped at 10/s into `screen watch` for the latency")
    parser.add_argument("--batch-size", type=int, default=SCHEMA["worker"]["batch_size"][1],
                        help="the worker's batch size [default: the config default]")
    parser.add_argument("--images-per-call", type=int,
                        default=SCHEMA["model"]["images_per_call"][1],
                        help="[model] images_per_call (0: a whole batch per call) "
                             "[default: the config default]")
    parser.add_argument("--streams", type=int, default=SCHEMA["model"]["streams"][1],
                        help="[model] streams; the bare rate (and so the limit) is measured "
                             "with as many calls at once [default: the config default]")
    parser.add_argument("--process", choices=("both", "float", "int8"), default="both",
                        help="which models `screen process` runs (A/B runs: one, to save time)")
    parser.add_argument("--no-watch", action="store_true",
                        help="leave out `screen watch` (A/B runs of `screen process`)")
    args = parser.parse_args()
    images = sorted((DATA / "images").rglob("*.jpg"))
    if not images:
        raise SystemExit(f"no images under {DATA}")
    random.Random(0).shuffle(images)
    images = images[: max(args.files, 64)]  # distinct contents: no duplicates in a drop
    cores = os.cpu_count() or 1
    bs, per_call = args.batch_size, args.images_per_call
    call = call_size(bs, per_call)  # images per ONNX Runtime call in the worker
    rows: Rows = []
    with tempfile.TemporaryDirectory() as tmp:
        int8 = args.int8 or make_int8(args.model, Path(tmp) / "int8.onnx")
        pre_ms = preprocess_ms(args.model, images)
        rows.append(("preprocessing alone", f"{pre_ms:.2f} ms/image", "one core, median"))
        limits, batch1 = {}, {}
        for name, model in (("float", args.model), ("int8", int8)):
            # At the worker's images per ONNX Runtime call (its batches split into calls).
            b1, bc = bare_onnx(model, images, call, args.streams)
            batch1[name] = b1
            limits[name] = 1 / (1 / bc + pre_ms / 1000 / cores)
            at_once = f", {args.streams} calls at once" if args.streams > 1 else ""
            rows.append((f"bare ONNX Runtime, {name}, batch 1{at_once}", f"{b1:.1f} images/s",
                         ""))
            if call > 1:
                rows.append((f"bare ONNX Runtime, {name}, batch {call}{at_once}",
                             f"{bc:.1f} images/s", ""))
            rows.append((f"machine's limit, {name}", f"{limits[name]:.1f} files/s",
                         f"1/(t_infer + t_pre/{cores} cores)"))
        if "int8" in limits:
            rows.append(("int8 / float, batch 1", f"{batch1['int8'] / batch1['float']:.2f}x",
                         "target >= 2x"))
        process = {}
        for name, model in (("float", args.model), ("int8", int8)):
            if args.process not in ("both", name):
                continue
            r = screen_process(images, args.files, model, bs, per_call, args.streams)
            process[name] = r
            rows.append((f"screen process, {name}, {r['files']} files (first received->last moved)",
                         f"{r['files_per_s']:.1f} files/s",
                         f"{r['files_per_s'] / limits[name]:.2f} of the limit (target 0.9)"))
        for name, r in process.items():
            rows.append((f"cold start ({name})", f"{r['cold_start_s']:.2f} s",
                         f"process start to first score, settle_seconds {SETTLE} included; "
                         "target <= 1 s"))
        for name, r in process.items():
            rows.append((f"peak RSS, screen process, batch {bs}, {call} per call ({name})",
                         f"{r['peak_rss_mb']:.0f} MB", "target <= 250 MB"))
        if not args.no_watch:
            w = screen_watch(images, max(args.files // 2, 50), args.trickle, 10.0, args.model,
                             bs, per_call, args.streams)
            rows.append(("screen watch, float, burst", f"{w['burst_files_per_s']:.1f} files/s",
                         f"{w['burst_files_per_s'] / limits['float']:.2f} of the limit"))
            rows.append(("screen watch, float, trickle 10/s, settled->committed p50",
                         f"{w['latency_p50_s']:.2f} s", ""))
            rows.append(("screen watch, float, trickle 10/s, settled->committed p95",
                         f"{w['latency_p95_s']:.2f} s",
                         "target: arrival->committed <= settle + 0.5 s, i.e. this <= 0.5 s"))
        if args.keras is None or "float" not in process:
            rows.append(("plain Keras predict loop", "-",
                         "skipped: pass --keras FILE.keras (and run `screen process` float)"))
        else:
            k = keras_loop(args.keras, args.model, images, args.keras_files)
            if isinstance(k, str):
                rows.append(("plain Keras predict loop", "-", k))
            else:
                rows.append((f"plain Keras predict loop, {args.keras_files} files",
                             f"{k:.1f} files/s",
                             f"screen process float is {process['float']['files_per_s'] / k:.1f}x"
                             " (target >= 3x)"))
    width = max(len(r[0]) for r in rows)
    vwidth = max(len(r[1]) for r in rows)
    print(f"{'figure':<{width}}  {'value':>{vwidth}}  note")
    for figure, value, note in rows:
        print(f"{figure:<{width}}  {value:>{vwidth}}  {note}")


if __name__ == "__main__":
    main()
