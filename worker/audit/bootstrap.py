"""Percentile-bootstrap confidence intervals for the audit figures, resampling whole groups.

Images of one patient are not independent (two breasts, two views, repeat screens), so the
resampling unit is the patient when patients are known: each resample draws patients with
replacement and every image of a drawn patient comes with it. Without patient ids each image is
its own group. A resample is a vector of integer weights over the images, so every figure is a
weighted count and all resamples of a chunk are computed at once with NumPy.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

# The figures a CI is computed for; the report writes each as `<name>_ci` beside the figure.
CI_FIGURES = (
    "prevalence",
    "sensitivity",
    "specificity",
    "ppv",
    "npv",
    "recall_rate",
    "accuracy",
    "auc",
)
RESAMPLES = 2000
SEED = 20261129
LEVEL = 0.95
# Below this share of resamples in which a figure is defined (e.g. a resample drew no
# malignant image, so sensitivity is undefined), its interval is not reported: percentiles of
# the lucky remainder would be too narrow.
MIN_DEFINED_SHARE = 0.9
# Bounds the (resamples x images) weight matrix held at once, to ~80 MB of float64.
_MAX_CELLS = 10_000_000


@dataclass(frozen=True)
class BootstrapResult:
    cis: dict[str, tuple[float, float] | None]
    resamples: int
    seed: int
    groups: int


def group_index(groups: Sequence[Any]) -> np.ndarray:
    """Dense integer codes 0..G-1 for arbitrary hashable group labels, in first-seen order."""
    codes: dict[Any, int] = {}
    return np.array([codes.setdefault(g, len(codes)) for g in groups], dtype=np.int64)


def _weighted_figures(
    w: np.ndarray, y: np.ndarray, called: np.ndarray, order: np.ndarray, starts: np.ndarray
) -> dict[str, np.ndarray]:
    """Every CI figure for each row of weights `w` (resamples x items); NaN where undefined."""
    pos, neg = y, ~y
    tp = w @ (pos & called).astype(np.float64)
    fn = w @ (pos & ~called).astype(np.float64)
    fp = w @ (neg & called).astype(np.float64)
    tn = w @ (neg & ~called).astype(np.float64)
    n = tp + fn + fp + tn
    with np.errstate(divide="ignore", invalid="ignore"):
        out = {
            "prevalence": (tp + fn) / n,
            "sensitivity": tp / (tp + fn),
            "specificity": tn / (tn + fp),
            "ppv": tp / (tp + fp),
            "npv": tn / (tn + fn),
            "recall_rate": (tp + fp) / n,
            "accuracy": (tp + tn) / n,
        }
        # Weighted Mann-Whitney AUC with ties counted half: per distinct score (ascending),
        # the positive weight there times the negative weight strictly below plus half the
        # negative weight at the same score.
        ws = w[:, order]
        p_lvl = np.add.reduceat(ws * pos[order], starts, axis=1)
        n_lvl = np.add.reduceat(ws * neg[order], starts, axis=1)
        below = np.cumsum(n_lvl, axis=1) - n_lvl
        wins = np.sum(p_lvl * (below + 0.5 * n_lvl), axis=1)
        out["auc"] = wins / (p_lvl.sum(axis=1) * n_lvl.sum(axis=1))
    for v in out.values():
        v[~np.isfinite(v)] = np.nan
    return out


def bootstrap_cis(
    y_true: np.ndarray,
    scores: np.ndarray,
    called: np.ndarray,
    groups: Sequence[Any] | np.ndarray,
    resamples: int = RESAMPLES,
    seed: int = SEED,
    level: float = LEVEL,
) -> BootstrapResult:
    """95% percentile intervals for every figure in CI_FIGURES, resampling whole `groups`.

    `called` is the worker's call (score at or above the threshold recorded with the score).
    A figure gets None when it is undefined on the data itself, when fewer than two groups
    exist, or when it is undefined in too many resamples (see MIN_DEFINED_SHARE).
    """
    y = np.asarray(y_true).astype(bool)
    s = np.asarray(scores, dtype=np.float64)
    c = np.asarray(called).astype(bool)
    g = group_index(list(groups))
    n_groups = int(g.max()) + 1 if len(g) else 0
    cis: dict[str, tuple[float, float] | None] = dict.fromkeys(CI_FIGURES)
    if n_groups < 2:
        return BootstrapResult(cis, resamples, seed, n_groups)

    order = np.argsort(s, kind="mergesort")
    sorted_s = s[order]
    starts = np.flatnonzero(np.r_[True, sorted_s[1:] != sorted_s[:-1]])

    rng = np.random.default_rng(seed)
    chunk = max(1, min(resamples, _MAX_CELLS // max(len(y), n_groups)))
    collected: dict[str, list[np.ndarray]] = {k: [] for k in CI_FIGURES}
    done = 0
    while done < resamples:
        b = min(chunk, resamples - done)
        drawn = rng.integers(0, n_groups, size=(b, n_groups))
        # How many times each group was drawn in each resample, without a Python loop.
        flat = (drawn + (np.arange(b) * n_groups)[:, None]).ravel()
        counts = np.bincount(flat, minlength=b * n_groups).reshape(b, n_groups)
        w = counts[:, g].astype(np.float64)
        for k, v in _weighted_figures(w, y, c, order, starts).items():
            collected[k].append(v)
        done += b

    alpha = (1.0 - level) / 2.0
    for k in CI_FIGURES:
        values = np.concatenate(collected[k])
        defined = values[~np.isnan(values)]
        if len(defined) < MIN_DEFINED_SHARE * resamples:
            continue
        low, high = np.quantile(defined, [alpha, 1.0 - alpha])
        cis[k] = (float(low), float(high))
    return BootstrapResult(cis, resamples, seed, n_groups)
