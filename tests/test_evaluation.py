"""Choices made on validation scores: operating points and how views combine."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from trainer.dataset import Sample
from trainer.evaluation import choose_aggregation, operating_points
from worker.audit.metrics import threshold_for_recall_rate


def test_threshold_for_recall_rate_flags_that_share() -> None:
    scores = np.arange(30, dtype=float)[::-1] / 30  # 30 distinct scores
    t = threshold_for_recall_rate(scores, 0.1)
    assert np.sum(scores >= t) == 3  # not 4: 0.1 * 30 is 3.0000000000000004
    assert np.sum(scores >= threshold_for_recall_rate(scores, 0.25)) == 8  # ceil(7.5)
    tied = np.array([0.9, 0.5, 0.5, 0.5, 0.1])
    assert threshold_for_recall_rate(tied, 0.4) == 0.5  # at least 40%; ties flag more


def test_operating_points_by_hand() -> None:
    # 10 positives (five high, five middling), 10 negatives (five above the middling ones)
    y = np.array([1] * 10 + [0] * 10)
    s = np.concatenate([[1.0, 0.99, 0.98, 0.97, 0.96, 0.5, 0.49, 0.48, 0.47, 0.46],
                        [0.6, 0.59, 0.58, 0.57, 0.56, 0.1, 0.09, 0.08, 0.07, 0.06]])
    p = operating_points(y, s)
    assert set(p) == {"sens80", "sens90", "sens95", "recall10"}
    assert p["sens80"]["threshold"] == 0.48 and p["sens80"]["sensitivity"] == 0.8
    assert p["sens80"]["specificity"] == 0.5 and p["sens80"]["recall_rate"] == 0.65
    assert p["sens90"]["threshold"] == 0.47 and p["sens95"]["threshold"] == 0.46
    assert p["sens95"]["sensitivity"] == 1.0
    assert p["recall10"]["threshold"] == 0.99 and p["recall10"]["recall_rate"] == 0.1
    assert p["recall10"]["specificity"] == 1.0
    assert p["sens90"]["rule"] == "highest threshold with validation sensitivity >= 0.90"
    assert p["recall10"]["rule"] == "threshold flagging 10% of validation images"


def _images(rows: list[tuple[str, str, int, float]]) -> tuple[list[Sample], np.ndarray]:
    samples = [Sample(Path(f"{p}{side}{i}.png"), label, p, side)
               for i, (p, side, label, _) in enumerate(rows)]
    return samples, np.array([r[3] for r in rows])


def test_aggregation_follows_where_the_signal_is() -> None:
    # A malignant breast has one suspicious view and one unremarkable one: max finds it,
    # the mean dilutes it below the benign breasts' uniform 0.5.
    rows = []
    for k in range(6):
        rows += [(f"m{k}", "L", 1, 0.9), (f"m{k}", "L", 1, 0.05), (f"m{k}", "R", 0, 0.3),
                 (f"b{k}", "L", 0, 0.5), (f"b{k}", "L", 0, 0.5), (f"b{k}", "R", 0, 0.4)]
    samples, scores = _images(rows)
    agg = choose_aggregation(samples, scores)
    assert agg["breast"] == "max"
    assert agg["validation_auc"]["breast_max"] == 1.0
    assert agg["validation_auc"]["breast_mean"] == pytest.approx(2 / 3, abs=1e-6)
    assert agg["exam"] == "max" and agg["validation_auc"]["exam_max"] == 1.0


def test_aggregation_ties_keep_the_worker_defaults() -> None:
    # One image per breast and one breast per patient: every rule gives the same scores.
    samples, scores = _images([(f"p{k}", "L", k % 2, 0.1 * k) for k in range(8)])
    agg = choose_aggregation(samples, scores)
    assert (agg["breast"], agg["exam"]) == ("mean", "max")
    assert agg["validation_auc"]["breast_mean"] == agg["validation_auc"]["breast_max"]
    with pytest.raises(KeyError):
        agg["validation_auc"]["image"]


def test_exam_rule_is_chosen_on_exams_with_both_breasts() -> None:
    """Exams that show only their cancer side beside healthy exams showing both breasts (how
    pools built from cancer cases look) would favour the mean: the max of two healthy breasts
    is inflated. Only exams with both breasts choose the rule."""
    rows = []
    for k in range(10):
        rows += [(f"one{k}", "L", 1, 0.6)]  # cancer side only
        rows += [(f"both{k}", "L", 1, 0.8), (f"both{k}", "R", 0, 0.05)]  # a cancer in one breast
        rows += [(f"ok{k}", "L", 0, 0.7), (f"ok{k}", "R", 0, 0.2)]  # healthy, both breasts
    samples, scores = _images(rows)
    agg = choose_aggregation(samples, scores)
    assert agg["exams_with_both_breasts"] == {"exams": 20, "malignant": 10}
    assert agg["validation_auc"]["exam_max"] == 1.0 and agg["validation_auc"]["exam_mean"] == 0.0
    assert agg["exam"] == "max"


def test_too_few_exams_with_both_breasts_keep_the_default() -> None:
    # Mean wins on the 4 complete exams, but 2 per class are too few to choose by.
    rows = []
    for k in range(2):
        rows += [(f"both{k}", "L", 1, 0.8), (f"both{k}", "R", 0, 0.5)]
        rows += [(f"ok{k}", "L", 0, 0.9), (f"ok{k}", "R", 0, 0.1)]
    samples, scores = _images(rows)
    agg = choose_aggregation(samples, scores)
    assert agg["validation_auc"]["exam_mean"] > agg["validation_auc"]["exam_max"]
    assert agg["exam"] == "max"
