"""What a trained model's validation scores say: views combined per breast and per exam,
the rule for combining them, and the operating points a programme can choose from.

NumPy only (the arithmetic of thresholds lives in :mod:`worker.audit.metrics`). Breasts are
patient + side; an exam is the caller's exam id per image, or the patient when there is none.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from trainer.dataset import Sample
from worker.audit.metrics import (
    confusion_at,
    rates,
    roc_auc,
    threshold_for_recall_rate,
    threshold_for_sensitivity,
)
from worker.scoring.model_metadata import AGGREGATION_RULES

RULES = AGGREGATION_RULES  # the worker's, in order of preference
SENSITIVITY_POINTS = (0.80, 0.90, 0.95)
RECALL_RATE_POINTS = (0.10,)


def _combine(values: np.ndarray, rule: str) -> float:
    if rule == "mean":
        return float(np.mean(values))
    if rule == "max":
        return float(np.max(values))
    raise ValueError(f"unknown rule {rule!r}: use one of {RULES}")


def group_scores(keys: Sequence[str | None], labels: np.ndarray, scores: np.ndarray,
                 rule: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Labels (1 if any member is 1), ``rule``-combined scores and keys per group; rows whose
    key is None are left out."""
    groups: dict[str, list[int]] = {}
    for i, k in enumerate(keys):
        if k is not None:
            groups.setdefault(k, []).append(i)
    y = np.array([int(np.max(labels[idx])) for idx in groups.values()], dtype=int)
    s = np.array([_combine(scores[idx], rule) for idx in groups.values()], dtype=np.float64)
    return y, s, list(groups)


def breast_scores(samples: Sequence[Sample], scores: np.ndarray, rule: str = "mean"
                  ) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Labels, scores and ids per breast (patient + side); empty when sides are unknown."""
    labels = np.array([s.label for s in samples], dtype=int)
    return group_scores([s.breast_id for s in samples], labels, np.asarray(scores), rule)


def exam_of_breasts(samples: Sequence[Sample], breast_ids: Sequence[str],
                    exam_ids: Sequence[str] | None = None) -> list[str]:
    """The exam of each breast: its images' exam id, or the patient when there is none."""
    exam_of: dict[str, str] = {}
    for i, s in enumerate(samples):
        if s.breast_id is not None and s.breast_id not in exam_of:
            given = exam_ids[i] if exam_ids is not None else ""
            exam_of[s.breast_id] = given or f"patient:{s.patient_id}"
    return [exam_of[b] for b in breast_ids]


# An AUC over fewer exams of a class than this is too noisy to choose a rule by.
MIN_EXAMS_PER_CLASS = 10


def choose_aggregation(samples: Sequence[Sample], scores: np.ndarray,
                       exam_ids: Sequence[str] | None = None) -> dict[str, Any]:
    """The view-combination rule the worker will use, chosen on these (validation) scores:
    breast = mean or max of its images, by breast-level AUC; exam = max or mean of its
    breasts (combined by the chosen breast rule), by exam-level AUC, an exam being malignant
    when any breast is. Ties, and levels without two classes, keep the worker's defaults
    (breast mean, exam max)."""
    auc: dict[str, float | None] = {}
    per_rule = {}
    for rule in RULES:
        per_rule[rule] = breast_scores(samples, scores, rule)
        auc[f"breast_{rule}"] = roc_auc(*per_rule[rule][:2]) if len(per_rule[rule][0]) else None
    breast = _best(RULES, [auc[f"breast_{r}"] for r in RULES])
    by, bs, ids = per_rule[breast]
    exams = np.array(exam_of_breasts(samples, ids, exam_ids), dtype=object)
    # Only exams with both breasts: where one exam has only its cancer side and another both
    # healthy breasts (as in pools built from cancer cases), the max of two breasts is
    # inflated on the healthy ones and the comparison is biased against max. A screening
    # exam has both breasts, so those are the exams that can choose the rule.
    exam_names, counts = np.unique(exams, return_counts=True)
    complete = np.isin(exams, exam_names[counts == 2])
    for rule in ("max", "mean"):
        ey, es, _ = group_scores(list(exams[complete]), by[complete], bs[complete], rule)
        auc[f"exam_{rule}"] = roc_auc(ey, es) if len(ey) else None
    complete_exams = int(np.sum(counts == 2))
    malignant_complete = len({e for e, y in zip(exams[complete], by[complete], strict=True)
                              if y == 1})
    enough = min(malignant_complete, complete_exams - malignant_complete) >= MIN_EXAMS_PER_CLASS
    exam = (_best(("max", "mean"), [auc["exam_max"], auc["exam_mean"]], tie="max") if enough
            else "max")
    return {
        "breast": breast,
        "exam": exam,
        "rule": "breast: mean or max of its images' scores, whichever has the higher "
                "validation breast-level AUC; exam: max or mean of its breasts' scores, by "
                "validation exam-level AUC over exams with both breasts (exam malignant if any "
                "breast is; the patient is the exam without a study id); ties, and fewer than "
                f"{MIN_EXAMS_PER_CLASS} such exams of either class: mean for breasts, max for "
                "exams (the worker's defaults)",
        "validation_auc": {k: None if v is None else round(v, 6) for k, v in auc.items()},
        "exams_with_both_breasts": {"exams": complete_exams, "malignant": malignant_complete},
    }


def _best(rules: Sequence[str], aucs: Sequence[float | None], tie: str = "mean") -> str:
    known = [(a, r) for r, a in zip(rules, aucs, strict=True) if a is not None]
    if not known:
        return tie
    top = max(a for a, _ in known)
    winners = [r for a, r in known if a == top]
    return tie if tie in winners else winners[0]


def operating_points(y: np.ndarray, scores: np.ndarray,
                     sensitivities: Sequence[float] = SENSITIVITY_POINTS,
                     recall_rates: Sequence[float] = RECALL_RATE_POINTS
                     ) -> dict[str, dict[str, Any]]:
    """Named thresholds chosen on (validation) scores, with what each implies there:
    ``sens80`` etc. (the highest threshold keeping that sensitivity) and ``recall10`` etc.
    (the threshold flagging that share of the images)."""
    points: dict[str, tuple[float, str]] = {}
    for target in sensitivities:
        points[f"sens{round(target * 100)}"] = (
            threshold_for_sensitivity(y, scores, target),
            f"highest threshold with validation sensitivity >= {target:.2f}")
    for rate in recall_rates:
        points[f"recall{round(rate * 100)}"] = (
            threshold_for_recall_rate(scores, rate),
            f"threshold flagging {rate:.0%} of validation images")
    out = {}
    for name, (t, rule) in points.items():
        r = rates(confusion_at(y, scores, t))
        out[name] = {"threshold": t, "rule": rule, "sensitivity": r["sensitivity"],
                     "specificity": r["specificity"], "recall_rate": r["recall_rate"]}
    return out
