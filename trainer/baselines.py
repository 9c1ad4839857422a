"""What a model must beat: validation figures of trivial and metadata-only scorers.

On the same patient split the trainer uses (:func:`trainer.dataset.split_by_patient` of the
dev pool's ``labels.csv``), each baseline produces a score per validation image, and gets the
same treatment as the CNN: ROC AUC, and accuracy / sensitivity / specificity at the highest
threshold that keeps validation sensitivity at 0.9.

* ``majority``: always benign (a constant score: AUC 0.5).
* ``metadata_logreg`` (with ``--machine-column`` and/or ``--site-column``): logistic
  regression on one-hot machine + site, fitted on the training split (NumPy, L2, balanced
  class weights). Machines and sites are not image content, but they are unevenly spread
  between the classes: a model that only recognises the machine would score about this.
* ``machine_rate``: the training split's malignant rate for the image's machine.
* one baseline per ``--score-column``: that column's value as the score (e.g. the woman's
  age, or a background flag: context, never an input of any model here).

The columns are the caller's to name; nothing here knows a data set:

    screen baselines ../shared/data/mammo-3383/labels.csv \\
        --machine-column rsna_machine_id --site-column rsna_site_id \\
        --score-column bright_background --score-column age
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from trainer.dataset import describe, discover, read_columns, split_by_patient
from trainer.logistic import balanced_weights, fit_logistic
from worker.audit.metrics import summary, threshold_for_sensitivity


def one_hot(values: Sequence[str], categories: Sequence[str]) -> np.ndarray:
    """Columns in ``categories`` order; a value unseen in training is all zeros."""
    index = {c: i for i, c in enumerate(categories)}
    out = np.zeros((len(values), len(categories)))
    for row, value in enumerate(values):
        if value in index:
            out[row, index[value]] = 1.0
    return out


def predict_logistic(w: np.ndarray, x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-(np.hstack([x, np.ones((len(x), 1))]) @ w)))


def _figures(y: np.ndarray, scores: np.ndarray, target: float) -> dict[str, Any]:
    return summary(y, scores, threshold_for_sensitivity(y, scores, target))


def compute_baselines(labels_csv: str | Path, val_fraction: float = 0.2, seed: int = 0,
                      sensitivity_target: float = 0.9, machine_column: str | None = None,
                      site_column: str | None = None,
                      score_columns: Sequence[str] = ()) -> dict[str, Any]:
    """Validation figures of each baseline on the trainer's patient split of ``labels_csv``."""
    path = Path(labels_csv)
    train, val = split_by_patient(discover(path), val_fraction, seed)
    names = [c for c in (machine_column, site_column, *score_columns) if c]
    col_tr, col_val = read_columns(path, train, names), read_columns(path, val, names)
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

    groups = [c for c in (machine_column, site_column) if c]
    if groups:
        cats = {c: sorted(set(col_tr[c].tolist())) for c in groups}
        x_tr = np.hstack([one_hot(col_tr[c].tolist(), cats[c]) for c in groups])
        x_val = np.hstack([one_hot(col_val[c].tolist(), cats[c]) for c in groups])
        w = fit_logistic(x_tr, y_train, 1e-2, balanced_weights(y_train))
        baselines["metadata_logreg"] = _figures(y_val, predict_logistic(w, x_val),
                                                sensitivity_target)
    if machine_column:
        overall = float(y_train.mean())
        machine_tr, machine_val = col_tr[machine_column], col_val[machine_column]
        rate = {m: float(y_train[machine_tr == m].mean()) for m in set(machine_tr.tolist())}
        baselines["machine_rate"] = _figures(
            y_val, np.array([rate.get(m, overall) for m in machine_val]), sensitivity_target)

    for c in score_columns:
        values = np.array([_number(v) for v in col_val[c]])
        values = np.where(np.isnan(values), np.nanmedian(values), values)
        baselines[c] = _figures(y_val, values, sensitivity_target)

    out["baselines"] = baselines
    return out


def _number(v: str) -> float:
    """A column value as a score: numbers as they are, true/false as 1/0, blanks as NaN."""
    if v.lower() in ("true", "false"):
        return float(v.lower() == "true")
    try:
        return float(v) if v else np.nan
    except ValueError:
        return np.nan
