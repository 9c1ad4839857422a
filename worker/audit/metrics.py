"""Binary-classification arithmetic shared by the trainer's validation and `screen report`.

NumPy only, so the worker can report without scikit-learn or TensorFlow.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Confusion:
    tp: int
    fp: int
    tn: int
    fn: int

    @property
    def n(self) -> int:
        return self.tp + self.fp + self.tn + self.fn

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


def _ratio(num: int, den: int) -> float | None:
    return num / den if den else None


def confusion_at(y_true: np.ndarray, scores: np.ndarray, threshold: float) -> Confusion:
    """Confusion counts with positive = score >= threshold (the label the worker records)."""
    return confusion_of_calls(y_true, np.asarray(scores, dtype=np.float64) >= threshold)


def roc_auc(y_true: np.ndarray, scores: np.ndarray) -> float | None:
    """ROC AUC by the rank-sum (Mann-Whitney) formula, ties counted half. None if one class."""
    y = np.asarray(y_true).astype(bool)
    s = np.asarray(scores, dtype=np.float64)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return None
    order = np.argsort(s, kind="mergesort")
    ranks = np.empty(len(s), dtype=np.float64)
    sorted_s = s[order]
    # average ranks over ties
    i = 0
    while i < len(s):
        j = i
        while j + 1 < len(s) and sorted_s[j + 1] == sorted_s[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2.0 + 1.0
        i = j + 1
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def weighted_roc_auc(y_true: np.ndarray, scores: np.ndarray, weights: np.ndarray) -> float | None:
    """ROC AUC with a weight per image: the weighted share of (positive, negative) pairs in
    which the positive scores higher, ties counted half. None without weight in both classes."""
    y = np.asarray(y_true).astype(bool)
    s = np.asarray(scores, dtype=np.float64)
    w = np.asarray(weights, dtype=np.float64)
    w_pos, w_neg = float(w[y].sum()), float(w[~y].sum())
    if w_pos <= 0 or w_neg <= 0:
        return None
    levels, inverse = np.unique(s, return_inverse=True)
    neg_at = np.bincount(inverse, weights=np.where(~y, w, 0.0), minlength=len(levels))
    neg_below = np.concatenate([[0.0], np.cumsum(neg_at)[:-1]])
    credit = neg_below[inverse] + 0.5 * neg_at[inverse]
    return float(np.sum(np.where(y, w, 0.0) * credit) / (w_pos * w_neg))


def roc_curve(y_true: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """False-positive rates, true-positive rates and thresholds, from (0, 0) to (1, 1)."""
    y = np.asarray(y_true).astype(bool)
    s = np.asarray(scores, dtype=np.float64)
    thresholds = np.unique(s)[::-1]
    n_pos, n_neg = max(int(y.sum()), 1), max(int((~y).sum()), 1)
    tpr = [0.0] + [float(np.sum((s >= t) & y)) / n_pos for t in thresholds]
    fpr = [0.0] + [float(np.sum((s >= t) & ~y)) / n_neg for t in thresholds]
    return np.array(fpr), np.array(tpr), np.concatenate([[np.inf], thresholds])


def rates(c: Confusion) -> dict[str, float | None]:
    """The audit's proportions from one confusion; None where the denominator is zero.

    Recall rate is the share of images the model calls malignant (what a programme would
    recall for assessment), prevalence the share that are malignant.
    """
    return {
        "prevalence": _ratio(c.tp + c.fn, c.n),
        "sensitivity": _ratio(c.tp, c.tp + c.fn),
        "specificity": _ratio(c.tn, c.tn + c.fp),
        "ppv": _ratio(c.tp, c.tp + c.fp),
        "npv": _ratio(c.tn, c.tn + c.fn),
        "recall_rate": _ratio(c.tp + c.fp, c.n),
        "accuracy": _ratio(c.tp + c.tn, c.n),
    }


def confusion_of_calls(y_true: np.ndarray, called: np.ndarray) -> Confusion:
    """Confusion counts from the calls the worker recorded (each at its own threshold)."""
    y = np.asarray(y_true).astype(bool)
    pred = np.asarray(called).astype(bool)
    return Confusion(
        tp=int(np.sum(pred & y)),
        fp=int(np.sum(pred & ~y)),
        tn=int(np.sum(~pred & ~y)),
        fn=int(np.sum(~pred & y)),
    )


def summary(y_true: np.ndarray, scores: np.ndarray, threshold: float) -> dict[str, Any]:
    """The figures `screen report` and the model card show for one set of scored images."""
    c = confusion_at(y_true, scores, threshold)
    auc = roc_auc(y_true, scores)
    return {
        "n": c.n,
        "threshold": float(threshold),
        **c.as_dict(),
        "accuracy": _ratio(c.tp + c.tn, c.n),
        "sensitivity": _ratio(c.tp, c.tp + c.fn),
        "specificity": _ratio(c.tn, c.tn + c.fp),
        "ppv": _ratio(c.tp, c.tp + c.fp),
        "npv": _ratio(c.tn, c.tn + c.fn),
        "auc": auc,
    }


def threshold_for_sensitivity(y_true: np.ndarray, scores: np.ndarray, target: float = 0.9) -> float:
    """The highest threshold whose sensitivity reaches `target` (screening favours recall).

    Taking the highest such threshold keeps specificity as high as that sensitivity allows.
    """
    y = np.asarray(y_true).astype(bool)
    s = np.asarray(scores, dtype=np.float64)
    pos = np.sort(s[y])[::-1]
    if len(pos) == 0:
        return 0.5
    k = int(np.ceil(target * len(pos)))  # need at least k positives at or above the threshold
    k = min(max(k, 1), len(pos))
    return float(pos[k - 1])


def threshold_for_recall_rate(scores: np.ndarray, rate: float = 0.1) -> float:
    """The threshold that flags a share ``rate`` of these images (score >= threshold): the
    ceil(rate * n)-th highest score, so at least that share is flagged (more only on ties)."""
    s = np.sort(np.asarray(scores, dtype=np.float64))[::-1]
    if len(s) == 0:
        return 0.5
    # The epsilon keeps 0.1 * 30 (3.0000000000000004 in floating point) at 3, not 4.
    k = min(max(int(np.ceil(rate * len(s) - 1e-9)), 1), len(s))
    return float(s[k - 1])


def threshold_for_specificity(y_true: np.ndarray, scores: np.ndarray,
                              target: float = 0.9) -> float:
    """The lowest threshold whose specificity reaches `target` (so sensitivity stays as high
    as that specificity allows): just above the ceil(target * n)-th lowest benign score."""
    y = np.asarray(y_true).astype(bool)
    neg = np.sort(np.asarray(scores, dtype=np.float64)[~y])
    if len(neg) == 0:
        return 0.5
    k = min(max(int(np.ceil(target * len(neg) - 1e-9)), 1), len(neg))
    return float(np.nextafter(neg[k - 1], np.inf))
