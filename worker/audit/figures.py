"""The audit's figures of one model version: at each level, every rate with its patient-
bootstrap interval and the caveats of too few cases, and what each operating point implies."""

from __future__ import annotations

from typing import Any

import numpy as np

from worker.audit.bootstrap import CI_FIGURES, LEVEL, RESAMPLES, SEED, bootstrap_cis
from worker.audit.metrics import confusion_of_calls, rates, roc_auc
from worker.audit.units import (
    CLASSES,
    UNIT_LEVELS,
    AuditRow,
    resampling_groups,
    truth_and_scores,
    units_at,
)
from worker.scoring.levels import Level
from worker.scoring.model_metadata import DEFAULT_AGGREGATION, OperatingPoint

# A figure resting on fewer cases than this in its denominator carries a caveat: with a
# handful of cases a perfect-looking figure (AUC 1.000 on 3 images) means nothing.
MIN_CASES = 10


def _few(count: int, kind: str, figure: str, unit: str, tail: str = "") -> str | None:
    """The caveat on `count` units of one class (`kind`, malignant or benign), whose own
    figure (`figure`, sensitivity or specificity) and the ROC AUC rest on them; None when
    there are enough."""
    if count == 0:
        return f"no {kind} {unit}: {figure} and ROC AUC are undefined"
    if count == 1:
        return (f"only 1 {kind} {unit}: ROC AUC not given (it would be that {unit}'s "
                f"rank alone), {figure} rests on one case")
    if count < MIN_CASES:
        return (f"only {count} {kind} {unit}(s): {figure} and ROC AUC rest on too few "
                f"cases to judge{tail}")
    return None


def _caveats(m: dict[str, Any]) -> list[str]:
    unit = m["level"]  # image, breast or exam: the caveats name what was counted
    out = [c for c in (
        _few(m["positives"], "malignant", "sensitivity", unit, ", whatever their value"),
        _few(m["negatives"], "benign", "specificity", unit),
    ) if c is not None]
    called_pos, called_neg = m["tp"] + m["fp"], m["tn"] + m["fn"]
    if 0 < called_pos < MIN_CASES:
        out.append(f"only {called_pos} {unit}(s) called malignant: PPV rests on too few cases")
    if 0 < called_neg < MIN_CASES:
        out.append(f"only {called_neg} {unit}(s) called benign: NPV rests on too few cases")
    if len(m["thresholds"]) != 1:
        out.append(
            f"scores of this version were recorded at {len(m['thresholds'])} different "
            f"thresholds; each {unit} is counted at its own (or its recorded label)"
        )
    return out


def model_figures(
    version: str,
    rows: list[AuditRow],
    resamples: int = RESAMPLES,
    seed: int = SEED,
    level: Level = Level.IMAGE,
) -> dict[str, Any]:
    """Every figure for one model version at one level, each with its 95% bootstrap
    interval. `rows` are the units of that level (`units_at`)."""
    y, s = truth_and_scores(rows)
    called = np.array([r.called for r in rows], dtype=bool)
    c = confusion_of_calls(y, called)
    groups, unit = resampling_groups(rows)
    boot = bootstrap_cis(y, s, called, groups, resamples=resamples, seed=seed)
    thresholds = sorted({r.threshold for r in rows if r.threshold is not None})
    m: dict[str, Any] = {
        "model_version": version,
        "level": level.value,
        "n": c.n,
        "positives": int(y.sum()),
        "negatives": int((~y).sum()),
        # The operating threshold: the one recorded with each score (one per version normally).
        "threshold": thresholds[0] if len(thresholds) == 1 else None,
        "thresholds": thresholds,
        "confusion": {
            "rows": "truth",
            "columns": "call",
            "labels": list(CLASSES),
            "matrix": [[c.tn, c.fp], [c.fn, c.tp]],
        },
        **c.as_dict(),
    }
    # One malignant (or benign) unit: its "AUC" is that one unit's rank, 0 or 1 by chance, and
    # its interval cannot be computed; the figure is not given.
    auc = roc_auc(y, s) if min(int(y.sum()), int((~y).sum())) >= 2 else None
    figures = {**rates(c), "auc": auc}
    for name in CI_FIGURES:
        m[name] = figures[name]
        ci = boot.cis[name]
        m[f"{name}_ci"] = None if ci is None or figures[name] is None else list(ci)
    m["bootstrap"] = {
        "unit": unit.value,
        "groups": boot.groups,
        "resamples": boot.resamples,
        "seed": boot.seed,
        "level": LEVEL,
    }
    m["caveats"] = _caveats(m)
    return m


def _no_units_note(level: Level) -> str:
    if level is Level.EXAM:
        return "exam level: no image with a known outcome has a Study Instance UID"
    return "breast level: no image with a known outcome has a Study Instance UID and a side"


def level_figures(
    version: str,
    rows: list[AuditRow],
    aggregation: dict[str, str] | None,
    resamples: int = RESAMPLES,
    seed: int = SEED,
) -> tuple[dict[str, Any], list[str], dict[Level, list[AuditRow]]]:
    """Breast and exam figures of one version: (level -> figures, notes on levels left out,
    level -> units). `aggregation` is the version's rule, None when it is not known."""
    rule = aggregation or DEFAULT_AGGREGATION
    figures, notes, units = {}, [], {}
    for level in UNIT_LEVELS:
        level_units = units_at(rows, level, rule)
        if not level_units:
            notes.append(_no_units_note(level))
            continue
        m = model_figures(version, level_units, resamples, seed, level)
        m["images"] = sum(u.n_images for u in level_units)
        m["aggregation"] = {**rule, "source": "model" if aggregation else "default"}
        if aggregation is None:
            m["caveats"].insert(
                0,
                f"the breast and exam rules of model {version} are not known (it is not the "
                f"configured model): the default (breast {rule['breast']}, exam "
                f"{rule['exam']}) is used",
            )
        figures[level.value] = m
        units[level] = level_units
    return figures, notes, units


def operating_point_figures(
    points: dict[str, OperatingPoint], scores: np.ndarray, rows: list[AuditRow]
) -> list[dict[str, Any]]:
    """What each of a model's operating points implies in the period: the recall rate over
    every scored image, sensitivity and specificity over those with a known outcome, beside
    the figures the point had on validation data."""
    y, s = truth_and_scores(rows)
    out = []
    for name, p in sorted(points.items(), key=lambda kv: kv[1].threshold):
        c = confusion_of_calls(y, s >= p.threshold)
        figures = rates(c)
        out.append({
            "name": name,
            "threshold": p.threshold,
            "rule": p.rule,
            "recall_rate": float(np.mean(scores >= p.threshold)) if len(scores) else None,
            "sensitivity": figures["sensitivity"],
            "specificity": figures["specificity"],
            "scored": int(len(scores)),
            "with_outcome": c.n,
            "validation": {"sensitivity": p.sensitivity, "specificity": p.specificity,
                           "recall_rate": p.recall_rate},
        })
    return out
