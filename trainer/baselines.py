"""What a model must beat: validation figures of trivial and metadata-only scorers.

On the same patient split the trainer uses (:func:`trainer.dataset.split_by_patient` of the
dev pool's ``labels.csv``), each baseline produces a score per validation image, and gets the
same treatment as the CNN: ROC AUC, and accuracy / sensitivity / specificity at the highest
threshold that keeps validation sensitivity at 0.9.

* ``majority``: always benign (a constant score: AUC 0.5).
* ``metadata_logreg``: logistic regression on one-hot machine id + site, fitted on the
  training split (NumPy, L2, balanced class weights). Machines and sites are not image content,
  but they are unevenly spread between the classes: a CNN that only recognises the machine
  would score about this.
* ``machine_rate``: the training split's malignant rate for the image's machine.
* ``bright_background``: the white-background flag as the score.
* ``age``: the woman's age as the score (context: not an input of any model here).

    python -m trainer.baselines ../shared/data/mammo-3383/labels.csv
"""

from __future__ import annotations

import argparse
import csv
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from trainer.dataset import Sample, describe, discover, split_by_patient
from worker.metrics import summary, threshold_for_sensitivity


def _metadata_rows(labels_csv: Path) -> dict[Path, dict[str, str]]:
    with labels_csv.open(newline="", encoding="utf-8-sig") as fh:
        return {labels_csv.parent / row["filename"]: row for row in csv.DictReader(fh)}


def one_hot(values: Sequence[str], categories: Sequence[str]) -> np.ndarray:
    """Columns in ``categories`` order; a value unseen in training is all zeros."""
    index = {c: i for i, c in enumerate(categories)}
    out = np.zeros((len(values), len(categories)))
    for row, value in enumerate(values):
        if value in index:
            out[row, index[value]] = 1.0
    return out


def fit_logistic(x: np.ndarray, y: np.ndarray, l2: float = 1e-2, steps: int = 50) -> np.ndarray:
    """Weights (bias last) of an L2 logistic regression with balanced class weights.

    Newton's method: the problem is tiny and convex, so a few dozen exact steps converge.
    """
    xb = np.hstack([x, np.ones((len(x), 1))])
    counts = np.bincount(y, minlength=2)
    sample_w = np.where(y == 1, len(y) / (2.0 * counts[1]), len(y) / (2.0 * counts[0]))
    w = np.zeros(xb.shape[1])
    reg = l2 * np.eye(xb.shape[1])
    reg[-1, -1] = 0.0  # no penalty on the bias
    for _ in range(steps):
        p = 1.0 / (1.0 + np.exp(-(xb @ w)))
        grad = xb.T @ (sample_w * (p - y)) / len(y) + reg @ w
        hess = (xb.T * (sample_w * p * (1 - p))) @ xb / len(y) + reg
        step = np.linalg.solve(hess, grad)
        w -= step
        if np.max(np.abs(step)) < 1e-8:
            break
    return w


def predict_logistic(w: np.ndarray, x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-(np.hstack([x, np.ones((len(x), 1))]) @ w)))


def _figures(y: np.ndarray, scores: np.ndarray, target: float) -> dict[str, Any]:
    return summary(y, scores, threshold_for_sensitivity(y, scores, target))


def compute_baselines(labels_csv: str | Path, val_fraction: float = 0.2, seed: int = 0,
                      sensitivity_target: float = 0.9) -> dict[str, Any]:
    """Validation figures of each baseline on the trainer's patient split of ``labels_csv``."""
    path = Path(labels_csv)
    samples = discover(path)
    train, val = split_by_patient(samples, val_fraction, seed)
    meta = _metadata_rows(path)

    def column(part: Sequence[Sample], name: str) -> list[str]:
        return [meta[s.path].get(name, "") for s in part]

    y_train = np.array([s.label for s in train])
    y_val = np.array([s.label for s in val])
    out: dict[str, Any] = {
        "split": {"strategy": "patient", "val_fraction": val_fraction, "seed": seed,
                  "train": describe(train), "val": describe(val)},
        "threshold_rule": f"highest threshold with validation sensitivity >= "
                          f"{sensitivity_target:.2f} (image level), as for the CNN",
    }
    baselines: dict[str, Any] = {}

    # Always benign: accuracy is the benign share; a constant score ranks nothing.
    baselines["majority"] = summary(y_val, np.zeros(len(y_val)), 0.5)

    machine_tr, machine_val = column(train, "rsna_machine_id"), column(val, "rsna_machine_id")
    site_tr, site_val = column(train, "rsna_site_id"), column(val, "rsna_site_id")
    machines, sites = sorted(set(machine_tr)), sorted(set(site_tr))
    x_tr = np.hstack([one_hot(machine_tr, machines), one_hot(site_tr, sites)])
    x_val = np.hstack([one_hot(machine_val, machines), one_hot(site_val, sites)])
    w = fit_logistic(x_tr, y_train)
    baselines["metadata_logreg"] = _figures(y_val, predict_logistic(w, x_val),
                                            sensitivity_target)

    overall = float(y_train.mean())
    rate = {m: float(y_train[np.array(machine_tr) == m].mean()) for m in machines}
    baselines["machine_rate"] = _figures(
        y_val, np.array([rate.get(m, overall) for m in machine_val]), sensitivity_target)

    bright = np.array([float(v or 0) for v in column(val, "bright_background")])
    baselines["bright_background"] = _figures(y_val, bright, sensitivity_target)

    ages = np.array([float(v) if v else np.nan for v in column(val, "age")])
    ages = np.where(np.isnan(ages), np.nanmedian(ages), ages)
    baselines["age"] = _figures(y_val, ages, sensitivity_target)

    out["baselines"] = baselines
    return out


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("labels_csv", type=Path)
    parser.add_argument("--val-fraction", type=float, default=0.2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(json.dumps(compute_baselines(args.labels_csv, args.val_fraction, args.seed),
                     indent=2, sort_keys=True))


if __name__ == "__main__":
    main()
