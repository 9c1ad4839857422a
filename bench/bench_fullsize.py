"""Full-size DICOM as a site sends it: `python bench/bench_fullsize.py [--files N]`.

Makes N full-size files (3328 x 4096, 12 bits in 16, window 2048/4096, MG, FOR PRESENTATION)
from dev-pool images in each lossless syntax a site sends (uncompressed, RLE, JPEG Lossless
SV1 and JPEG-LS with DCMTK's encoders, JPEG 2000 with pylibjpeg-openjpeg; kept in --cache),
then, in one run, prints per syntax: `screen process` files/s, its share of the model's bare
ONNX Runtime rate, the worker's peak RSS, and each file's mean and largest score difference
from the same picture uncompressed and from its 640 px training form. The dev pool's own
JPEGs are run the same way for comparison. Asserts nothing: these machines are shared and
noisy; quote ratios from one run on a quiet machine (bench/README.md).
"""

from __future__ import annotations

import argparse
import csv
import statistics
import sys
import tempfile
import time
from pathlib import Path

import cv2
from bench_worker import DATA, MODEL, bare_onnx, screen_process  # also puts the repo on the path

from tests.dicom_files import FULL_SIZE_SYNTAXES, full_size_dicom  # noqa: E402, I001
from worker.imaging.preprocess import preprocess_file  # noqa: E402
from worker.scoring.scorer import Scorer  # noqa: E402


def dev_images(n: int) -> list[Path]:
    """n dev-pool images spread over the pool (every k-th row of labels.csv)."""
    with (DATA / "labels.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    step = max(1, len(rows) // n)
    return [DATA / r["filename"] for r in rows[::step][:n]]


def make_files(pictures: list[Path], cache: Path) -> dict[str, list[Path]]:
    """Each picture in every syntax under `cache` (made once, reused on later runs)."""
    out: dict[str, list[Path]] = {}
    for syntax in FULL_SIZE_SYNTAXES:
        folder = cache / syntax
        folder.mkdir(parents=True, exist_ok=True)
        out[syntax] = []
        for src in pictures:
            path = folder / f"{src.stem}.dcm"  # named by its picture: a cache across --files
            if not path.exists():
                grey = cv2.imread(str(src), cv2.IMREAD_GRAYSCALE)
                made = full_size_dicom(grey, syntax, folder, f"{src.stem}.tmp")
                made.rename(path)
            out[syntax].append(path)
        print(f"  {syntax}: {len(pictures)} files, "
              f"{statistics.mean(p.stat().st_size for p in out[syntax]) / 1e6:.1f} MB each",
              file=sys.stderr)
    return out


def score_gaps(scorer: Scorer, files: list[Path], reference: list[Path],
               scores: dict[Path, float]) -> tuple[float, float]:
    """(mean, largest) |score difference| between each file and its reference file. Each
    file is scored once in a run: `scores` keeps what has been scored."""
    settings = scorer.metadata.preprocess
    for path in (*files, *reference):
        if path not in scores:
            scores[path] = float(scorer.score_batch([preprocess_file(path, settings)])[0])
    gaps = [abs(scores[a] - scores[b]) for a, b in zip(files, reference, strict=True)]
    return statistics.mean(gaps), max(gaps)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--files", type=int, default=16, help="pictures per syntax (default 16)")
    ap.add_argument("--model", type=Path, default=MODEL)
    ap.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "mammo-fullsize",
                    help="where the generated files are kept between runs")
    ap.add_argument("--syntax", action="append", choices=FULL_SIZE_SYNTAXES,
                    help="only these syntaxes (repeatable; default all)")
    a = ap.parse_args()
    pictures = dev_images(a.files)
    print(f"making {a.files} full-size files per syntax in {a.cache}", file=sys.stderr)
    files = make_files(pictures, a.cache)
    scorer = Scorer(a.model)
    _, bare = bare_onnx(a.model, dev_images(32), 4)  # its loop takes 32 images
    print(f"\nbare ONNX Runtime on {a.model.name}: {bare:.1f} images/s (batch 4)\n")
    print(f"{'input':18s} {'files/s':>8s} {'share':>6s} {'peak RSS':>9s} "
          f"{'vs uncompressed':>16s} {'vs 640 px JPEG':>15s}")
    runs: list[tuple[str, list[Path]]] = [("dev-pool JPEG", pictures)]
    runs += [(s, files[s]) for s in (a.syntax or FULL_SIZE_SYNTAXES)]
    scores: dict[Path, float] = {}
    for name, paths in runs:
        t = time.perf_counter()
        r = screen_process(paths, len(paths), a.model, 4, 0, 1)
        same = score_gaps(scorer, paths, files["uncompressed"], scores) \
            if name != "dev-pool JPEG" else (0.0, 0.0)
        train = score_gaps(scorer, paths, pictures, scores)
        print(f"{name:18s} {r['files_per_s']:8.2f} {r['files_per_s'] / bare:6.3f} "
              f"{r['peak_rss_mb']:7.0f} MB {same[0]:7.4f} / {same[1]:.4f} "
              f"{train[0]:6.4f} / {train[1]:.4f}   ({time.perf_counter() - t:.0f} s)",
              flush=True)


if __name__ == "__main__":
    main()
