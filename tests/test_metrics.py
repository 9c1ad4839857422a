"""Report arithmetic against hand-computed cases."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from worker.audit.metrics import (
    confusion_at,
    roc_auc,
    roc_curve,
    summary,
    threshold_for_sensitivity,
)


def test_confusion_by_hand() -> None:
    y = np.array([1, 1, 1, 0, 0, 0, 0])
    s = np.array([0.9, 0.6, 0.2, 0.7, 0.4, 0.1, 0.5])
    c = confusion_at(y, s, 0.5)  # called positive: 0.9, 0.6, 0.7, 0.5
    assert (c.tp, c.fp, c.tn, c.fn) == (2, 2, 2, 1)
    m = summary(y, s, 0.5)
    assert m["accuracy"] == pytest.approx(4 / 7)
    assert m["sensitivity"] == pytest.approx(2 / 3)
    assert m["specificity"] == pytest.approx(2 / 4)
    assert m["ppv"] == pytest.approx(2 / 4)
    assert m["npv"] == pytest.approx(2 / 3)
    # AUC by counting pairs: positives 0.9, 0.6, 0.2 against negatives 0.7, 0.4, 0.1, 0.5
    # 0.9 beats 4; 0.6 beats 0.4, 0.1, 0.5 (3); 0.2 beats 0.1 (1) -> 8 of 12
    assert m["auc"] == pytest.approx(8 / 12)


def test_auc_counts_ties_as_half() -> None:
    assert roc_auc(np.array([1, 0]), np.array([0.5, 0.5])) == pytest.approx(0.5)
    assert roc_auc(np.array([1, 1, 0]), np.array([0.5, 0.8, 0.5])) == pytest.approx(0.75)


def test_auc_matches_brute_force_on_random_data() -> None:
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 200)
    s = np.round(rng.random(200), 2)  # rounding makes ties
    pairs = [(p, n) for p, n in itertools.product(s[y == 1], s[y == 0])]
    brute = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p, n in pairs) / len(pairs)
    assert roc_auc(y, s) == pytest.approx(brute)
    fpr, tpr, _ = roc_curve(y, s)
    assert np.trapezoid(tpr, fpr) == pytest.approx(brute)


def test_degenerate_cases() -> None:
    assert roc_auc(np.array([1, 1]), np.array([0.1, 0.2])) is None
    m = summary(np.array([0, 0]), np.array([0.1, 0.9]), 0.5)
    assert m["sensitivity"] is None and m["specificity"] == 0.5


def test_threshold_for_sensitivity() -> None:
    y = np.array([1] * 10 + [0] * 10)
    s = np.concatenate([np.linspace(0.1, 1.0, 10), np.linspace(0.0, 0.45, 10)])
    t = threshold_for_sensitivity(y, s, 0.9)
    assert confusion_at(y, s, t).tp == 9  # the highest threshold that keeps 9 of 10
    assert t == pytest.approx(0.2)
    assert threshold_for_sensitivity(y, s, 1.0) == pytest.approx(0.1)
