"""Site operating points as the scorer reads them: thresholds a site chose on its own women.

A model's own operating points were chosen on the development pool; on a new site the same
threshold can flag most of the healthy. A site point is a threshold chosen on the site's
outcomes for a target (a sensitivity, a specificity or a recall rate) at image, breast or
exam level (`screen calibrate`, worker.audit.calibration), with the figures it implied there.

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

from sqlalchemy import select

from worker.records.clock import iso
from worker.records.connect import open_store
from worker.records.models import SitePointRecord
from worker.records.store import Store
from worker.scoring.levels import Level
from worker.scoring.model_metadata import ModelMetadata, ModelMetadataError, OperatingPoint

if TYPE_CHECKING:
    from worker.config import Config


class Target(StrEnum):
    """The figure a site point's threshold was chosen to meet."""

    SENSITIVITY = "sensitivity"
    SPECIFICITY = "specificity"
    RECALL_RATE = "recall_rate"


# The figures recorded with a point, each with its interval.
FIGURES = ("sensitivity", "specificity", "recall_rate")


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

    @classmethod
    def from_record(cls, r: SitePointRecord) -> SitePoint:
        return cls(r.name, r.model_version, Level(r.level), Target(r.target), r.target_value,
                   r.threshold, r.women, r.units, json.loads(r.figures), r.created_by,
                   r.created_at)

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "model_version": self.model_version,
                "level": self.level.value, "target": self.target.value,
                "target_value": self.target_value, "threshold": self.threshold,
                "women": self.women, "units": self.units, **self.figures,
                "created_by": self.created_by, "created_at": iso(self.created_at)}

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


def history(store: Store) -> list[SitePoint]:
    """Every calibration recorded, oldest first."""
    with store.read() as s:
        return [SitePoint.from_record(r)
                for r in s.scalars(select(SitePointRecord).order_by(SitePointRecord.id))]


def in_force(points: list[SitePoint]) -> dict[tuple[str, str], SitePoint]:
    """(name, model version) -> its newest calibration."""
    return {(p.name, p.model_version): p for p in points}


def with_site_point(config: Config, metadata: ModelMetadata, name: str) -> ModelMetadata:
    """``metadata`` with the site point ``name`` of its model version among its points;
    :class:`ModelMetadataError` (one line) when there is none, or it belongs to another
    model version."""
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
