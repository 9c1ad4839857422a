"""Site operating points: thresholds a site chooses on its own women (`screen calibrate`).

A model's own operating points were chosen on the development pool; on a new site the same
threshold can flag most of the healthy. A site point is chosen on the site's imported
outcomes for a target (a sensitivity, a specificity or a recall rate) at image, breast or
exam level, with patient-bootstrap 95% intervals (worker/audit/bootstrap.py) for the sensitivity,
specificity and recall rate its threshold implies there. The intervals are of the figures at
that fixed threshold: what it should give on more women like these.

Each calibration is a row of `site_points`, never changed: calibrating a name again adds a
row, and the newest row of a (name, model version) is the point in force. A point belongs
to the model version it was calibrated for: `[model] operating_point` naming it with another
model is refused (:func:`with_site_point`), so a new model never inherits a threshold that
was set for another one's scores.
"""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass, replace
from enum import StrEnum
from typing import TYPE_CHECKING, Any

import numpy as np
from sqlalchemy import select

from worker.audit.bootstrap import RESAMPLES, SEED, bootstrap_cis
from worker.audit.metrics import (
    confusion_of_calls,
    rates,
    threshold_for_recall_rate,
    threshold_for_sensitivity,
    threshold_for_specificity,
)
from worker.audit.report import MIN_CASES, Level, audit_rows, resampling_groups, units_at
from worker.records.models import SitePointRecord
from worker.records.store import ImageStatus, Store
from worker.results.aggregation import one_per_instance
from worker.scoring.model_metadata import ModelMetadata, ModelMetadataError, OperatingPoint

if TYPE_CHECKING:
    from worker.config import Config

FIGURES = ("sensitivity", "specificity", "recall_rate")


class Target(StrEnum):
    SENSITIVITY = "sensitivity"
    SPECIFICITY = "specificity"
    RECALL_RATE = "recall_rate"


_SHORT = {Target.SENSITIVITY: "sens", Target.SPECIFICITY: "spec", Target.RECALL_RATE: "recall"}


class CalibrationError(ValueError):
    """Why a site point cannot be chosen (too few outcomes, a taken name); one line."""


@dataclass(frozen=True)
class SitePoint:
    name: str
    model_version: str
    level: Level
    target: Target
    target_value: float
    threshold: float
    women: int  # resampling groups behind the intervals (patients, where known)
    units: int  # images, breasts or exams with a known outcome
    figures: dict[str, Any]  # each of FIGURES, its `_ci`, counts and the bootstrap's unit
    created_by: str
    created_at: dt.datetime

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "model_version": self.model_version,
                "level": self.level.value, "target": self.target.value,
                "target_value": self.target_value, "threshold": self.threshold,
                "women": self.women, "units": self.units, **self.figures,
                "created_by": self.created_by, "created_at": self.created_at.isoformat() + "Z"}

    def as_operating_point(self) -> OperatingPoint:
        return OperatingPoint(
            threshold=self.threshold, rule=f"site point: {self.describe()}",
            **{k: self.figures[k] for k in FIGURES})

    def describe(self) -> str:
        return (f"{self.target.value.replace('_', ' ')} {self.target_value:g} at "
                f"{self.level.value} level on {women(self.women, self.figures['unit'])}, "
                f"{self.created_at:%Y-%m-%d %H:%M} UTC by {self.created_by}")


def women(groups: int, unit: str) -> str:
    """`212 women`, or `212 study group(s)` where patients are not known."""
    return f"{groups} women" if unit == "patient" else f"{groups} {unit} group(s)"


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
    """The units of ``level`` with a known outcome scored by ``model_version`` (as the
    report counts them: duplicates out, one image per DICOM instance)."""
    images = [r for r in one_per_instance(store.all_images()) if r.status == ImageStatus.SCORED]
    rows = [r for r in audit_rows(images, store.outcomes()) if r.model_version == model_version]
    return units_at(rows, level, aggregation)


def choose(units: list, target: Target, value: float, level: Level,
           min_cases: int = MIN_CASES, resamples: int = RESAMPLES, seed: int = SEED
           ) -> tuple[float, int, dict[str, Any]]:
    """(threshold, groups, figures) of a point for ``target`` on ``units``; refused with
    one line when the outcomes are too few to say anything."""
    if not 0.0 < value < 1.0:
        raise CalibrationError(f"the target {target.value} must be between 0 and 1, "
                               f"got {value:g}")
    y = np.array([u.truth for u in units], dtype=bool)
    s = np.array([u.score for u in units], dtype=np.float64)
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
    c = confusion_of_calls(y, called)
    figures: dict[str, Any] = {"positives": pos, "negatives": neg, "unit": unit.value,
                               "resamples": resamples, "seed": seed}
    for k in FIGURES:
        figures[k] = rates(c)[k]
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
        return _point(record)


def _point(r: SitePointRecord) -> SitePoint:
    return SitePoint(r.name, r.model_version, Level(r.level), Target(r.target), r.target_value,
                     r.threshold, r.women, r.units, json.loads(r.figures), r.created_by,
                     r.created_at)


def history(store: Store) -> list[SitePoint]:
    """Every calibration recorded, oldest first."""
    with store.read() as s:
        return [_point(r) for r in s.scalars(select(SitePointRecord).order_by(SitePointRecord.id))]


def in_force(points: list[SitePoint]) -> dict[tuple[str, str], SitePoint]:
    """(name, model version) -> its newest calibration."""
    return {(p.name, p.model_version): p for p in points}


def with_site_point(config: Config, metadata: ModelMetadata, name: str) -> ModelMetadata:
    """``metadata`` with the site point ``name`` of its model version among its points;
    :class:`ModelMetadataError` (one line) when there is none, or it belongs to another
    model version."""
    from worker.records.connect import open_store

    known = ", ".join(metadata.points)
    try:
        store = open_store(config)
    except Exception as exc:  # a missing or unreadable database holds no site point
        raise ModelMetadataError(f"model has no operating point {name!r} (it has: {known}) "
                                 f"and the database's site points cannot be read: {exc}"
                                 ) from exc
    try:
        recorded = [p for (n, _), p in in_force(history(store)).items() if n == name]
    finally:
        store.dispose()
    mine = [p for p in recorded if p.model_version == metadata.model_version]
    if mine:
        points = {**metadata.points, name: mine[0].as_operating_point()}
        return replace(metadata, operating_points=points)
    if recorded:
        raise ModelMetadataError(
            f"site point {name!r} was calibrated for model version "
            f"{', '.join(p.model_version for p in recorded)}, not {metadata.model_version}: "
            "a new model needs its own (screen calibrate)")
    raise ModelMetadataError(f"model has no operating point {name!r} (it has: {known}) and "
                             "the database has no site point of that name")


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
