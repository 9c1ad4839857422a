"""`screen report`: what was screened, and an audit of the calls against known outcomes.

The audit counts at three levels: images, breasts and exams (see
:class:`worker.scoring.levels.Level`). One gathering step (`audit`) reads the period's rows
once; the text and JSON (`worker.audit.report_text`), the PNG (`worker.audit.report_plots`)
and the HTML page (`worker.audit.report_html`) all render its result, so they cannot
disagree. The rows and units are `worker.audit.units`, the figures of each model version
`worker.audit.figures`.
"""

from __future__ import annotations

import datetime as dt
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from worker.audit.bootstrap import RESAMPLES, SEED
from worker.audit.figures import level_figures, model_figures, operating_point_figures
from worker.audit.units import AuditRow, audit_rows, unit_rows, units_at
from worker.records.clock import iso
from worker.records.models import ImageRecord
from worker.records.store import ImageStatus, Store
from worker.scoring.levels import Level
from worker.scoring.model_metadata import OperatingPoint

QUARANTINE_LISTED = 50  # quarantined files named in the report; the rest are counted


@dataclass
class Audit:
    """The report's figures plus the per-version rows the plots draw from."""

    report: dict[str, Any]
    rows: dict[str, list[AuditRow]] = field(default_factory=dict)
    # (model version, breast or exam level) -> its units, for the plots of those levels.
    units: dict[tuple[str, Level], list[AuditRow]] = field(default_factory=dict)

    def units_of(self, version: str, level: Level) -> list[AuditRow]:
        """The units of ``version`` at ``level`` with a known outcome: its rows at image
        level; none when it has no such units."""
        if level is Level.IMAGE:
            return self.rows.get(version, [])
        return self.units.get((version, level), [])


def reason_kind(reason: str) -> str:
    """A quarantine reason without its file's details, to count files by kind: the text
    before the first ": " outside brackets ("truncated DICOM pixel data: 14360 of 15360
    bytes" -> "truncated DICOM pixel data"); a colon inside "(...)" belongs to the kind."""
    depth = 0
    for i, ch in enumerate(reason):
        depth += {"(": 1, "[": 1, ")": -1, "]": -1}.get(ch, 0)
        if ch == ":" and depth <= 0 and reason[i + 1 : i + 2] in (" ", ""):
            return reason[:i]
    return reason


def _before(images: list[ImageRecord], until: dt.datetime | None) -> list[ImageRecord]:
    # Store.all_images filters `since` in SQL; `until` is applied here so the store's query
    # stays as it is.
    return [r for r in images if until is None or r.received_at < until]


def _add_levels(
    models: list[dict[str, Any]],
    per_version: dict[str, list[AuditRow]],
    images: list[ImageRecord],
    aggregation: dict[str, dict[str, str]] | None,
    resamples: int,
    seed: int,
) -> dict[tuple[str, Level], list[AuditRow]]:
    """Each version's breast and exam figures, added to its image-level figures in
    `models`; the units of each (version, level)."""
    units: dict[tuple[str, Level], list[AuditRow]] = {}
    for m in models:
        version = m["model_version"]
        m["levels"], m["level_notes"], by_level = level_figures(
            version,
            unit_rows(per_version[version], images),
            (aggregation or {}).get(version),
            resamples,
            seed,
        )
        units.update({(version, level): u for level, u in by_level.items()})
    return units


def _all_caveats(models: list[dict[str, Any]], scored: int, with_outcome: int) -> list[str]:
    """Every version's and level's caveats, each named, as the report lists them."""
    caveats = [f"{m['model_version']}: {c}" for m in models for c in m["caveats"]]
    caveats += [
        f"{m['model_version']}, {level} level: {c}"
        for m in models
        for level, lm in m["levels"].items()
        for c in lm["caveats"]
    ]
    if scored and not with_outcome:
        caveats.insert(
            0, "no scored image has a known outcome yet (screen outcomes import FILE.csv)"
        )
    return caveats


def _points_in_period(
    operating_points: dict[str, dict[str, OperatingPoint]] | None,
    images: list[ImageRecord],
    per_version: dict[str, list[AuditRow]],
) -> dict[str, list[dict[str, Any]]]:
    """Model version -> what each of its operating points implies in the period."""
    return {
        version: operating_point_figures(
            points,
            np.array([r.score for r in images if r.status == ImageStatus.SCORED
                      and r.model_version == version and r.score is not None]),
            per_version.get(version, []))
        for version, points in sorted((operating_points or {}).items())
    }


def audit(
    store: Store,
    since: dt.datetime | None = None,
    until: dt.datetime | None = None,
    resamples: int = RESAMPLES,
    seed: int = SEED,
    operating_points: dict[str, dict[str, OperatingPoint]] | None = None,
    aggregation: dict[str, dict[str, str]] | None = None,
) -> Audit:
    """Counts by status and call, and per model version the audit against outcomes, at
    image level and, where images carry a study (and a side), at breast and exam level.

    The period is by time received, `since` inclusive and `until` exclusive (naive UTC).
    ``operating_points`` (model version -> its points, from the model file) adds what each
    point would have implied in the period. ``aggregation`` (model version -> its breast and
    exam rule, from the model file) scores breasts and exams; other versions get the default
    rule, with a caveat.
    """
    images = _before(store.all_images(since), until)
    outcomes = store.outcomes()
    by_status = Counter(r.status for r in images)
    by_call = Counter(r.label for r in images if r.status == ImageStatus.SCORED and r.label)
    quarantined = [r for r in images if r.status == ImageStatus.QUARANTINED]
    reasons = Counter(reason_kind(r.error or "") for r in quarantined)

    per_version: dict[str, list[AuditRow]] = defaultdict(list)
    for row in units_at(audit_rows(images, outcomes), Level.IMAGE):
        per_version[row.model_version].append(row)
    models = [
        model_figures(v, rows, resamples, seed) for v, rows in sorted(per_version.items())
    ]
    units = _add_levels(models, per_version, images, aggregation, resamples, seed)

    scored = by_status.get(ImageStatus.SCORED, 0)
    with_outcome = sum(len(v) for v in per_version.values())
    report = {
        "since": iso(since),
        "until": iso(until),
        "total": len(images),
        "by_status": dict(sorted(by_status.items())),
        "by_call": dict(sorted(by_call.items())),
        "quarantine_reasons": dict(reasons.most_common()),
        "quarantined_files": [
            {"filename": r.filename, "reason": r.error} for r in quarantined[:QUARANTINE_LISTED]
        ],
        "duplicates": by_status.get(ImageStatus.DUPLICATE, 0),
        "scored": scored,
        "with_outcome": with_outcome,
        "models": models,
        "operating_points": _points_in_period(operating_points, images, per_version),
        "caveats": _all_caveats(models, scored, with_outcome),
    }
    return Audit(report, dict(per_version), units)


def build_report(
    store: Store, since: dt.datetime | None = None, until: dt.datetime | None = None
) -> dict[str, Any]:
    return audit(store, since, until).report
