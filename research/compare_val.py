"""Paired comparison of two models' validation predictions on the same patient split.

Reads two ``val_predictions.csv`` files written by ``screen train`` with the same split (same
``--val-fraction`` and ``--seed``) and prints, for each model and for the difference B - A:
image AUC overall, within machine 49 and within each site, and breast-level AUC, with a
patient-level paired bootstrap 95% interval for each difference.

    python research/compare_val.py ../shared/data/mammo-3383/labels.csv \\
        runs/ship/val_predictions.csv runs/probe384/val_predictions.csv
"""

from __future__ import annotations

import argparse
import csv
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from worker.audit.metrics import roc_auc  # noqa: E402


def _read(path: Path) -> dict[str, dict[str, str]]:
    with path.open(newline="") as fh:
        return {r["filename"]: r for r in csv.DictReader(fh)}


def _breast_auc(y: np.ndarray, s: np.ndarray, breast: np.ndarray) -> float | None:
    keys = np.unique(breast)
    yb = np.array([y[breast == k].max() for k in keys])
    sb = np.array([s[breast == k].mean() for k in keys])
    return roc_auc(yb, sb)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("labels", type=Path, help="the pool's labels.csv (machine and site)")
    p.add_argument("a", type=Path, help="val_predictions.csv of model A")
    p.add_argument("b", type=Path, help="val_predictions.csv of model B")
    p.add_argument("--bootstrap", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    meta = _read(args.labels)
    a, b = _read(args.a), _read(args.b)
    if set(a) != set(b):
        raise SystemExit("the two files do not hold the same validation images (same split?)")
    names = sorted(a)
    y = np.array([int(a[n]["label"] == "malignant") for n in names])
    sa = np.array([float(a[n]["score"]) for n in names])
    sb = np.array([float(b[n]["score"]) for n in names])
    patient = np.array([a[n]["patient_id"] for n in names])
    breast = np.array([f"{a[n]['patient_id']}:{a[n]['laterality']}" for n in names])
    machine = np.array([meta[n]["rsna_machine_id"] for n in names])
    site = np.array([meta[n]["rsna_site_id"] for n in names])

    subsets: dict[str, Callable[[np.ndarray], np.ndarray]] = {
        "all images": lambda idx: np.ones(len(idx), bool),
        "machine 49": lambda idx: machine[idx] == "49",
        "site 1": lambda idx: site[idx] == "1",
        "site 2": lambda idx: site[idx] == "2",
    }

    def figures(idx: np.ndarray) -> dict[str, tuple[float | None, float | None]]:
        out = {}
        for name, pick in subsets.items():
            m = idx[pick(idx)]
            out[name] = (roc_auc(y[m], sa[m]), roc_auc(y[m], sb[m]))
        out["breast level"] = (_breast_auc(y[idx], sa[idx], breast[idx]),
                               _breast_auc(y[idx], sb[idx], breast[idx]))
        return out

    point = figures(np.arange(len(names)))
    rng = np.random.default_rng(args.seed)
    patients = np.unique(patient)
    rows_of = {pt: np.where(patient == pt)[0] for pt in patients}
    diffs: dict[str, list[float]] = {k: [] for k in point}
    for _ in range(args.bootstrap):
        idx = np.concatenate([rows_of[pt] for pt in rng.choice(patients, len(patients))])
        for k, (fa, fb) in figures(idx).items():
            if fa is not None and fb is not None:
                diffs[k].append(fb - fa)
    print(f"A = {args.a}\nB = {args.b}\n{len(names)} images, {len(patients)} patients")
    print("| subset | n | AUC A | AUC B | B - A (95% CI, patient bootstrap) |")
    print("|---|---:|---:|---:|---|")
    for k, (fa, fb) in point.items():
        n = len(np.unique(breast)) if k == "breast level" else int(
            subsets[k](np.arange(len(names))).sum())
        lo, hi = np.percentile(diffs[k], [2.5, 97.5])
        print(f"| {k} | {n} | {fa:.3f} | {fb:.3f} | {fb - fa:+.3f} ({lo:+.3f} to {hi:+.3f}) |")


if __name__ == "__main__":
    main()
