"""L2-regularised logistic regression in NumPy (Newton's method), for linear probes.

Small and exact: on a few thousand rows of ~1,000 standardised features a Newton step is one
matrix product and one Cholesky solve, and 5-10 steps reach the optimum. No scikit-learn or
SciPy dependency for the training extra.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from worker.audit.metrics import roc_auc

# Penalties searched by the inner CV (features standardised, so one grid fits all sizes).
L2_GRID = (0.3, 1.0, 3.0, 10.0, 30.0, 100.0, 300.0)


@dataclass(frozen=True)
class LinearProbe:
    """score = sigmoid(((x - mean) / scale) @ coef + intercept)."""

    mean: np.ndarray
    scale: np.ndarray
    coef: np.ndarray
    intercept: float
    l2: float

    def decision(self, x: np.ndarray) -> np.ndarray:
        return ((x - self.mean) / self.scale) @ self.coef + self.intercept

    def predict(self, x: np.ndarray) -> np.ndarray:
        return _sigmoid(self.decision(x))

    def dense_weights(self) -> tuple[np.ndarray, np.ndarray]:
        """(kernel (d, 1), bias (1,)) of an equivalent Dense(1, sigmoid) on raw features:
        the standardisation folded into the weights, so the exported model needs no extra op."""
        kernel = self.coef / self.scale
        bias = self.intercept - float(self.mean @ kernel)
        return kernel.reshape(-1, 1).astype(np.float32), np.array([bias], dtype=np.float32)


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * z))  # overflow-free form of 1 / (1 + exp(-z))


def balanced_weights(y: np.ndarray) -> np.ndarray:
    """Per-row weights n / (2 n_class): each class carries half the loss (the 2:1 imbalance)."""
    y = np.asarray(y).astype(int)
    counts = np.bincount(y, minlength=2).astype(float)
    if (counts == 0).any():
        raise ValueError("both classes are needed to fit a probe")
    return (len(y) / (2.0 * counts))[y]


def fit_logistic(x: np.ndarray, y: np.ndarray, l2: float, sample_weight: np.ndarray | None = None,
                 start: np.ndarray | None = None, max_iter: int = 50,
                 tol: float = 1e-8) -> np.ndarray:
    """Minimise mean_w(log loss) + l2/2 |coef|^2 over (coef, intercept); returns
    concat(coef, [intercept]). ``x`` is already standardised; the intercept is not penalised.
    ``start`` warm-starts Newton (a path of decreasing ``l2`` converges in a few steps each)."""
    n, d = x.shape
    sw = np.ones(n) if sample_weight is None else np.asarray(sample_weight, dtype=float)
    sw = sw / sw.sum()
    xa = np.hstack([x, np.ones((n, 1))])
    theta = np.zeros(d + 1) if start is None else start.copy()
    penalty = np.full(d + 1, l2)
    penalty[-1] = 0.0
    for _ in range(max_iter):
        p = _sigmoid(xa @ theta)
        grad = xa.T @ (sw * (p - y)) + penalty * theta
        z = xa * np.sqrt(sw * p * (1 - p))[:, None]
        hess = z.T @ z  # Z'Z: NumPy hands this to BLAS syrk, half the work of a general product
        hess[np.diag_indices_from(hess)] += penalty + 1e-10
        step = np.linalg.solve(hess, grad)
        theta -= step
        if float(np.abs(step).max()) < tol * (1.0 + float(np.abs(theta).max())):
            break
    return theta


def standardiser(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    mean = x.mean(axis=0)
    scale = x.std(axis=0)
    scale[scale < 1e-6] = 1.0  # constant columns (dead ReLU6 channels) stay zero
    return mean, scale


def fit_probe(x: np.ndarray, y: np.ndarray, l2: float, balanced: bool = True) -> LinearProbe:
    mean, scale = standardiser(x)
    theta = fit_logistic((x - mean) / scale, y, l2, balanced_weights(y) if balanced else None)
    return LinearProbe(mean, scale, theta[:-1], float(theta[-1]), l2)


def choose_l2(x: np.ndarray, y: np.ndarray, groups: np.ndarray, grid: Sequence[float],
              folds: int = 3, seed: int = 0, balanced: bool = True) -> tuple[float, list[float]]:
    """The ``l2`` in ``grid`` with the best mean AUC over ``folds`` folds of whole groups
    (patients) of the training data alone, and the mean AUC of each. Ties go to the stronger
    penalty (grid order is irrelevant)."""
    unique = np.unique(groups)
    rng = np.random.default_rng(seed)
    fold_of_group = dict(zip(rng.permutation(unique), np.arange(len(unique)) % folds, strict=True))
    fold = np.array([fold_of_group[g] for g in groups])
    grid = sorted(grid, reverse=True)  # strong to weak penalty: warm starts along the path
    scores = np.zeros((folds, len(grid)))
    for k in range(folds):
        tr, te = fold != k, fold == k
        mean, scale = standardiser(x[tr])
        xs_tr, xs_te = (x[tr] - mean) / scale, (x[te] - mean) / scale
        w = balanced_weights(y[tr]) if balanced else None
        theta = None
        for j, l2 in enumerate(grid):
            theta = fit_logistic(xs_tr, y[tr], l2, w, start=theta, tol=1e-6)
            scores[k, j] = roc_auc(y[te], xs_te @ theta[:-1])
    means = scores.mean(axis=0)
    best = int(np.argmax(means))  # first max = strongest penalty among ties
    by_input_order = dict(zip(grid, means.tolist(), strict=True))
    return grid[best], [by_input_order[v] for v in sorted(grid)]
