"""Calibrating a site operating point on the site's own outcomes (`screen calibrate`).

A site point is chosen on the site's imported outcomes for a target (a sensitivity, a
specificity or a recall rate) at image, breast or exam level, with patient-bootstrap 95%
intervals (worker/audit/bootstrap.py) for the sensitivity, specificity and recall rate its
threshold implies there. The intervals are of the figures at that fixed threshold: what it
should give on more women like these. The point is recorded as a new row of `site_points`;
what it is, and how the scorer reads it, is worker.scoring.site_points.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from worker.audit.bootstrap import RESAMPLES, SEED, bootstrap_cis
from worker.audit.figures import MIN_CASES
from worker.audit.metrics import (
    confusion_of_calls,
    rates,
    threshold_for_recall_rate,
    threshold_for_sensitivity,
    threshold_for_specificity,
)
from worker.audit.units import (
    UNIT_LEVELS,
    audit_rows,
    resampling_groups,
    truth_and_scores,
    unit_rows,
    units_at,
)
from worker.records.models import SitePointRecord
from worker.records.store import Store
from worker.scoring.levels import Level
from worker.scoring.site_points import FIGURES, SitePoint, Target

_SHORT = {Target.SENSITIVITY: "sens", Target.SPECIFICITY: "spec", Target.RECALL_RATE: "recall"}


class CalibrationError(ValueError):
    """Why a site point cannot be chosen (too few outcomes, a taken name); one line."""


def default_name(target: Target, value: float) -> str:
    """`site-sens90`, `site-spec85`, `site-recall10`."""
    return f"site-{_SHORT[target]}{round(value * 100):d}"


def threshold_for(target: Target, value: float, y: np.ndarray, s: np.ndarray) -> float:
    if target is Target.SENSITIVITY:
        return threshold_for_sensitivity(y, s, value)
    if target is Target.SPECIFICITY:
        return threshold_for_specificity(y, s, value)
    return threshold_for_recall_rate(s, value)


def site_units(store: Store, model_version: str, level: Level,
               aggregation: dict[str, str] | None) -> list:
    """The units of ``level`` with a known outcome scored by ``model_version``, gathered as
    the report gathers them (worker.audit.units.unit_rows)."""
    images = store.all_images()
    rows = [r for r in audit_rows(images, store.outcomes()) if r.model_version == model_version]
    if level in UNIT_LEVELS:
        rows = unit_rows(rows, images)
    return units_at(rows, level, aggregation)


def choose(units: list, target: Target, value: float, level: Level,
           min_cases: int = MIN_CASES, resamples: int = RESAMPLES, seed: int = SEED
           ) -> tuple[float, int, dict[str, Any]]:
    """(threshold, groups, figures) of a point for ``target`` on ``units``; refused with
    one line when the outcomes are too few to say anything."""
    if not 0.0 < value < 1.0:
        raise CalibrationError(f"the target {target.value} must be between 0 and 1, "
                               f"got {value:g}")
    y, s = truth_and_scores(units)
    pos, neg = int(y.sum()), int((~y).sum())
    if pos < min_cases or neg < min_cases:
        raise CalibrationError(
            f"too few outcomes to calibrate at {level.value} level: {pos} malignant and {neg} "
            f"benign {level.value}(s) of this model have a known outcome, at least {min_cases} "
            "of each are needed (screen outcomes import FILE.csv)")
    threshold = threshold_for(target, value, y, s)
    called = s >= threshold
    groups, unit = resampling_groups(units)
    boot = bootstrap_cis(y, s, called, groups, resamples=resamples, seed=seed)
    missing = [k for k in FIGURES if boot.cis[k] is None]
    if missing:
        raise CalibrationError(
            f"too few women to calibrate at {level.value} level: no interval for "
            f"{', '.join(missing)} from {boot.groups} {unit.value} group(s)")
    achieved = rates(confusion_of_calls(y, called))
    figures: dict[str, Any] = {"positives": pos, "negatives": neg, "unit": unit.value,
                               "resamples": resamples, "seed": seed}
    for k in FIGURES:
        figures[k] = achieved[k]
        figures[f"{k}_ci"] = list(boot.cis[k])  # type: ignore[arg-type]
    return threshold, boot.groups, figures


def calibrate(store: Store, model_version: str, target: Target, value: float,
              level: Level = Level.IMAGE, aggregation: dict[str, str] | None = None,
              name: str = "", created_by: str = "", model_points: set[str] | None = None,
              min_cases: int = MIN_CASES, resamples: int = RESAMPLES, seed: int = SEED
              ) -> SitePoint:
    """Choose a site point for ``model_version`` on the site's outcomes and record it."""
    name = name or default_name(target, value)
    if name in (model_points or set()):
        raise CalibrationError(f"{name!r} is one of the model's own operating points: "
                               "choose another --name")
    units = site_units(store, model_version, level, aggregation)
    threshold, women, figures = choose(units, target, value, level, min_cases, resamples,
                                       seed)
    record = SitePointRecord(
        name=name, model_version=model_version, level=level.value, target=target.value,
        target_value=value, threshold=threshold, women=women, units=len(units),
        figures=json.dumps(figures, sort_keys=True), created_by=created_by or "unknown")
    with store.write() as s:
        s.add(record)
        s.flush()
        return SitePoint.from_record(record)


def format_point(p: SitePoint) -> list[str]:
    """A recorded point as text lines."""
    f = p.figures
    lines = [f"site point {p.name} for model {p.model_version}: threshold {p.threshold:.4f}",
             f"  chosen for {p.describe()}",
             f"  from {p.units} {p.level.value}(s) with a known outcome ({f['positives']} "
             f"malignant, {f['negatives']} benign); 95% intervals: patient bootstrap, "
             f"{f['resamples']} resamples"]
    for k in FIGURES:
        low, high = f[f"{k}_ci"]
        lines.append(f"  {k.replace('_', ' '):<12} {f[k]:.3f}   {low:.3f} to {high:.3f}")
    return lines
