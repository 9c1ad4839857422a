"""Bootstrap intervals: coverage on a known case, whole groups resampled, nulls when undefined."""

from __future__ import annotations

import numpy as np
import pytest

from worker.audit.bootstrap import _weighted_figures, bootstrap_cis, group_index
from worker.audit.metrics import confusion_of_calls, rates, roc_auc


def _data(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    y = rng.random(n) < 0.4
    s = np.round(np.clip(rng.normal(0.4 + 0.25 * y, 0.2), 0, 1), 2)  # rounding makes ties
    return y, s, s >= 0.5


def test_unit_weights_reproduce_the_point_figures() -> None:
    y, s, called = _data(np.random.default_rng(3), 300)
    order = np.argsort(s, kind="mergesort")
    starts = np.flatnonzero(np.r_[True, s[order][1:] != s[order][:-1]])
    got = _weighted_figures(np.ones((1, len(y))), y, called, order, starts)
    want = {**rates(confusion_of_calls(y, called)), "auc": roc_auc(y, s)}
    for k, v in want.items():
        assert got[k][0] == pytest.approx(v), k


def test_coverage_on_a_known_sensitivity() -> None:
    """Samples from a population whose sensitivity is 0.7: the 95% interval holds it ~95%."""
    rng = np.random.default_rng(11)
    hits, trials = 0, 80
    for i in range(trials):
        y = np.ones(60, dtype=bool)
        called = rng.random(60) < 0.7
        ci = bootstrap_cis(y, called.astype(float), called, np.arange(60), 400, seed=i).cis
        low, high = ci["sensitivity"]
        hits += low <= 0.7 <= high
        assert ci["specificity"] is None and ci["auc"] is None  # no benign image at all
    assert 0.85 <= hits / trials <= 1.0  # percentile intervals run a little narrow on n=60


def test_whole_groups_are_resampled() -> None:
    """Four images per patient, identical: resampling patients gives the CI of one image
    each (same draws), resampling images pretends there is four times the evidence."""
    y, s, called = _data(np.random.default_rng(5), 80)
    one = bootstrap_cis(y, s, called, np.arange(80), 1000, seed=1).cis
    rep = (np.repeat(v, 4) for v in (y, s, called))
    y4, s4, c4 = rep
    patients = np.repeat(np.arange(80), 4)
    by_patient = bootstrap_cis(y4, s4, c4, patients, 1000, seed=1).cis
    by_image = bootstrap_cis(y4, s4, c4, np.arange(320), 1000, seed=1).cis
    for k in ("sensitivity", "specificity", "auc", "recall_rate"):
        assert by_patient[k] == pytest.approx(one[k]), k
        width = one[k][1] - one[k][0]
        assert by_image[k][1] - by_image[k][0] < 0.7 * width, k
    assert list(group_index(["b", "a", "b", 7])) == [0, 1, 0, 2]


def test_degenerate_cases_give_null() -> None:
    y = np.array([True, False])
    one_group = bootstrap_cis(y, np.array([0.9, 0.1]), y, ["p", "p"]).cis
    assert all(v is None for v in one_group.values())
    # 2 malignant of 40: most resamples still have one, but too many have none
    y = np.zeros(40, dtype=bool)
    y[:2] = True
    s = np.linspace(0, 1, 40)
    cis = bootstrap_cis(y, s, s >= 0.5, np.arange(40), 500).cis
    assert cis["sensitivity"] is None and cis["auc"] is None
    assert cis["specificity"] is not None and cis["recall_rate"] is not None
