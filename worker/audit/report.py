"""`screen report`: what was screened, and an audit of the calls against known outcomes.

The audit counts at three levels: images, breasts and exams (see `Level`). One gathering
step (`audit`) reads the period's rows once; the text and JSON below, the PNG
(`worker.audit.report_plots`) and the HTML page (`worker.audit.report_html`) all render its
result, so they cannot disagree. The confusion matrix has one orientation everywhere: rows are the
truth, columns the model's call, each labelled with the class names.
"""

from __future__ import annotations

import datetime as dt
import json
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import numpy as np

from worker.audit.bootstrap import CI_FIGURES, LEVEL, RESAMPLES, SEED, bootstrap_cis
from worker.audit.fitness import fitness_lines
from worker.audit.metrics import confusion_of_calls, rates, roc_auc
from worker.records.clock import iso
from worker.records.models import ImageRecord
from worker.records.store import ImageStatus, Store
from worker.results.aggregation import one_per_instance, score_exam
from worker.scoring.model_metadata import DEFAULT_AGGREGATION, OperatingPoint

CLASSES = ("benign", "malignant")  # outcome vocabulary; index 1 is the positive class
# A figure resting on fewer cases than this in its denominator carries a caveat: with a
# handful of cases a perfect-looking figure (AUC 1.000 on 3 images) means nothing.
MIN_CASES = 10
QUARANTINE_LISTED = 50  # quarantined files named in the report; the rest are counted


class Level(StrEnum):
    """The unit the figures count.

    The grouping follows worker/results/exams.py, so the audit judges the units the worker reports:
    an exam is the images of one study (an image without a Study Instance UID is in no exam
    and no breast), a breast the images of an exam with one side (L or R); images of unknown
    side are in no breast but count in their exam as one group. A unit's score is the model's
    rule (`score_exam`, mean or max) over its images, its truth malignant if any of its
    images' outcomes is, its call its score at the threshold recorded with its images. Only
    images with a known outcome enter a unit, so a unit's score can differ from the one the
    worker wrote when part of a study has no outcome yet.
    """

    IMAGE = "image"
    BREAST = "breast"
    EXAM = "exam"


UNIT_LEVELS = (Level.BREAST, Level.EXAM)  # the levels made of groups of images


class ResampledUnit(StrEnum):
    PATIENT = "patient"
    STUDY = "study"
    IMAGE = "image"
    MIXED = "patient where known, otherwise study, otherwise image"


@dataclass(frozen=True)
class AuditRow:
    """One scored image with a known outcome, as the audit needs it."""

    image_id: int
    filename: str
    model_version: str
    truth: bool  # malignant per the imported outcome
    score: float
    threshold: float | None
    called: bool  # malignant per the worker, at the threshold recorded with the score
    patient_id: str | None = None
    study_uid: str | None = None
    laterality: str | None = None
    n_images: int = 1  # images in the unit (breast and exam level)


@dataclass
class Audit:
    """The report's figures plus the per-version rows the plots draw from."""

    report: dict[str, Any]
    rows: dict[str, list[AuditRow]] = field(default_factory=dict)
    # (model version, breast or exam level) -> its units, for the plots of those levels.
    units: dict[tuple[str, Level], list[AuditRow]] = field(default_factory=dict)


def _called(r: ImageRecord) -> bool:
    if r.threshold is not None and r.score is not None:
        return r.score >= r.threshold
    return r.label == CLASSES[1]


def audit_rows(images: list[ImageRecord], outcomes: dict[str, str]) -> list[AuditRow]:
    """The scored images with a known outcome. Duplicates are left out: same image, once."""
    rows = []
    for r in images:
        if r.status != ImageStatus.SCORED or r.score is None or r.sha256 not in outcomes:
            continue
        rows.append(
            AuditRow(
                image_id=r.id,
                filename=r.filename,
                model_version=r.model_version or "?",
                truth=outcomes[r.sha256] == CLASSES[1],
                score=float(r.score),
                threshold=r.threshold,
                called=_called(r),
                patient_id=r.patient_id,
                study_uid=r.study_uid,
                laterality=r.laterality,
            )
        )
    return rows


def _unit(members: list[AuditRow], score: float, name: str, side: str | None) -> AuditRow:
    """One breast or exam of `members` (image rows of one study, ordered by id)."""
    latest = members[-1]
    # The threshold in force when the unit's last image was scored (the worker calls a
    # breast and an exam at the operating point of its images); rows from before thresholds
    # were recorded fall back to their labels: the unit is called if any image was.
    threshold = next((r.threshold for r in reversed(members) if r.threshold is not None), None)
    return AuditRow(
        image_id=members[0].image_id,
        filename=name,
        model_version=latest.model_version,
        truth=any(r.truth for r in members),
        score=score,
        threshold=threshold,
        called=score >= threshold if threshold is not None else any(r.called for r in members),
        patient_id=next((r.patient_id for r in members if r.patient_id is not None), None),
        study_uid=latest.study_uid,
        laterality=side,
        n_images=len(members),
    )


def units_at(
    rows: list[AuditRow], level: Level, aggregation: dict[str, str] | None = None
) -> list[AuditRow]:
    """The image rows of one model version as units of `level` (see Level), scored by the
    model's `aggregation` rule ({"breast": ..., "exam": ...}; the default when None)."""
    if level is Level.IMAGE:
        return rows
    rule = aggregation or DEFAULT_AGGREGATION
    studies: dict[str, list[AuditRow]] = defaultdict(list)
    for r in sorted(rows, key=lambda r: r.image_id):
        # No study, no exam and no breast (as in worker/results/exams.py).
        if r.study_uid is not None:
            studies[r.study_uid].append(r)
    units = []
    for study, members in studies.items():
        exam = score_exam(((r.laterality, r.score) for r in members), rule)
        if level is Level.EXAM:
            units.append(_unit(members, exam.score, study, None))
            continue
        for b in exam.breasts:
            side = [r for r in members if r.laterality == b.laterality]
            units.append(_unit(side, b.score, f"{study} {b.laterality}", b.laterality))
    return units


def resampling_groups(rows: list[AuditRow]) -> tuple[list[str], ResampledUnit]:
    """Bootstrap groups: the patient where known, else the study, else the image alone (units
    of one patient or one study are not independent); and what that is."""
    groups = []
    kinds: set[ResampledUnit] = set()
    for r in rows:
        if r.patient_id is not None:
            groups.append(f"p:{r.patient_id}")
            kinds.add(ResampledUnit.PATIENT)
        elif r.study_uid is not None:
            groups.append(f"s:{r.study_uid}")
            kinds.add(ResampledUnit.STUDY)
        else:
            groups.append(f"i:{r.image_id}")
            kinds.add(ResampledUnit.IMAGE)
    if len(kinds) == 1:
        return groups, kinds.pop()
    return groups, ResampledUnit.IMAGE if not kinds else ResampledUnit.MIXED


def _caveats(m: dict[str, Any]) -> list[str]:
    out = []
    unit = m["level"]  # image, breast or exam: the caveats name what was counted
    if m["positives"] == 0:
        out.append(f"no malignant {unit}: sensitivity and ROC AUC are undefined")
    elif m["positives"] == 1:
        out.append(f"only 1 malignant {unit}: ROC AUC not given (it would be that {unit}'s "
                   "rank alone), sensitivity rests on one case")
    elif m["positives"] < MIN_CASES:
        out.append(
            f"only {m['positives']} malignant {unit}(s): sensitivity and ROC AUC rest on too "
            "few cases to judge, whatever their value"
        )
    if m["negatives"] == 0:
        out.append(f"no benign {unit}: specificity and ROC AUC are undefined")
    elif m["negatives"] == 1:
        out.append(f"only 1 benign {unit}: ROC AUC not given (it would be that {unit}'s "
                   "rank alone), specificity rests on one case")
    elif m["negatives"] < MIN_CASES:
        out.append(
            f"only {m['negatives']} benign {unit}(s): specificity and ROC AUC rest on too few "
            "cases to judge"
        )
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
    y = np.array([r.truth for r in rows], dtype=bool)
    s = np.array([r.score for r in rows], dtype=np.float64)
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
    y = np.array([r.truth for r in rows], dtype=bool)
    s = np.array([r.score for r in rows], dtype=np.float64)
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
    # One DICOM instance received twice with other bytes is one image of its breast and exam
    # (worker/results/exams.py's rule); at image level both copies stay, as they always have.
    once = {r.id for r in one_per_instance([r for r in images if r.status == ImageStatus.SCORED])}
    units: dict[tuple[str, Level], list[AuditRow]] = {}
    for m in models:
        version = m["model_version"]
        m["levels"], m["level_notes"], by_level = level_figures(
            version,
            [r for r in per_version[version] if r.image_id in once],
            (aggregation or {}).get(version),
            resamples,
            seed,
        )
        units.update({(version, level): u for level, u in by_level.items()})

    scored = by_status.get(ImageStatus.SCORED, 0)
    with_outcome = sum(len(v) for v in per_version.values())
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
        "operating_points": {
            version: operating_point_figures(
                points,
                np.array([r.score for r in images if r.status == ImageStatus.SCORED
                          and r.model_version == version and r.score is not None]),
                per_version.get(version, []))
            for version, points in sorted((operating_points or {}).items())
        },
        "caveats": caveats,
    }
    return Audit(report, dict(per_version), units)


def build_report(
    store: Store, since: dt.datetime | None = None, until: dt.datetime | None = None
) -> dict[str, Any]:
    return audit(store, since, until).report


def fmt_value(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)


def fmt_ci(ci: list[float] | None) -> str:
    return "n/a" if ci is None else f"{ci[0]:.3f} to {ci[1]:.3f}"


def period_text(report: dict[str, Any]) -> str:
    since, until = report["since"], report["until"]
    if not since and not until:
        return "all images received"
    if since and until:
        return f"received from {since} to before {until}"
    return f"received from {since}" if since else f"received before {until}"


# (JSON key, label) of the figures shown with their intervals, in reading order.
FIGURE_ROWS = (
    ("sensitivity", "sensitivity"),
    ("specificity", "specificity"),
    ("ppv", "PPV"),
    ("npv", "NPV"),
    ("recall_rate", "recall rate"),
    ("accuracy", "accuracy"),
    ("auc", "ROC AUC"),
    ("prevalence", "prevalence"),
)


def confusion_lines(m: dict[str, Any]) -> list[str]:
    """The confusion matrix as text, rows = truth, columns = call (the one orientation)."""
    labels = m["confusion"]["labels"]
    matrix = m["confusion"]["matrix"]
    width = max(len(f"call {lab}") for lab in labels) + 2
    head = " " * 20 + "".join(f"{'call ' + lab:>{width}}" for lab in labels)
    lines = [head]
    for lab, row in zip(labels, matrix, strict=True):
        lines.append(f"  {'truth ' + lab:<18}" + "".join(f"{v:>{width}}" for v in row))
    return lines


def level_summary(m: dict[str, Any]) -> str:
    """`image level: n=...`, with the images and the rule behind breast and exam units."""
    text = f"{m['level']} level, n={m['n']} ({m['positives']} malignant, {m['negatives']} benign)"
    if m["level"] != "image":
        a = m["aggregation"]
        text += (f" from {m['images']} image(s); score: breast {a['breast']}, exam {a['exam']} "
                 f"({'from the model' if a['source'] == 'model' else 'default rule'})")
    return text


_PLURAL = {"patient": "patients", "study": "studies", "image": "images"}


def bootstrap_text(b: dict[str, Any]) -> str:
    """`percentile bootstrap, 2000 resamples of 23 patients, seed 0` (what was resampled)."""
    unit = b["unit"]
    drawn = (f"{b['groups']} {_PLURAL[unit]}" if unit in _PLURAL else
             f"{b['groups']} groups (each a patient where known, otherwise a study, "
             "otherwise an image)")
    return f"percentile bootstrap, {b['resamples']} resamples of {drawn}, seed {b['seed']}"


def figures_block(m: dict[str, Any]) -> list[str]:
    """One model version at one level, as text lines."""
    b = m["bootstrap"]
    threshold = ", ".join(f"{t:.4f}" for t in m["thresholds"]) or "not recorded"
    return [
        f"model {m['model_version']}: {level_summary(m)}, threshold {threshold}",
        *confusion_lines(m),
        f"  {'figure':<14}{'value':>7}   95% CI",
        *(
            f"  {label:<14}{fmt_value(m[key]):>7}   {fmt_ci(m[key + '_ci'])}"
            for key, label in FIGURE_ROWS
        ),
        f"  intervals: {bootstrap_text(b)}",
        *(f"  CAVEAT: {c}" for c in m["caveats"]),
    ]


def format_text(report: dict[str, Any]) -> str:
    lines = [
        f"period: {period_text(report)} (UTC)",
        f"images recorded: {report['total']}",
        "by status: "
        + (", ".join(f"{k} {v}" for k, v in report["by_status"].items()) or "none"),
        "called by the model: "
        + (", ".join(f"{k} {v}" for k, v in report["by_call"].items()) or "none"),
    ]
    if report["quarantine_reasons"]:
        lines.append(
            "quarantined because: "
            + "; ".join(f"{k} ({v})" for k, v in report["quarantine_reasons"].items())
        )
        lines += [f"  {q['filename']}: {q['reason']}" for q in report["quarantined_files"]]
    lines.append(f"scored with a known outcome: {report['with_outcome']} of {report['scored']}")
    for m in report["models"]:
        lines += ["", *figures_block(m)]
        for lm in m.get("levels", {}).values():
            lines += ["", *figures_block(lm)]
        lines += [f"model {m['model_version']}: {note} (level left out)"
                  for note in m.get("level_notes", [])]
    for version, points in report.get("operating_points", {}).items():
        lines += ["", f"operating points of model {version} (the model file's, and site points "
                      "from screen calibrate): what each would have called in this period",
                  f"  {'point':<14}{'threshold':>10}{'recall rate':>13}{'sensitivity':>13}"
                  f"{'specificity':>13}   on validation (site points: calibration): "
                  "sens / spec / recall"]
        for p in points:
            v = p["validation"]
            lines.append(
                f"  {p['name']:<14}{p['threshold']:>10.4f}{fmt_value(p['recall_rate']):>13}"
                f"{fmt_value(p['sensitivity']):>13}{fmt_value(p['specificity']):>13}   "
                f"{fmt_value(v['sensitivity'])} / {fmt_value(v['specificity'])} / "
                f"{fmt_value(v['recall_rate'])}")
    if report.get("site_points"):
        lines += ["", "site points recorded (screen calibrate), oldest first:"]
        lines += [f"  {p['name']} for model {p['model_version']}: threshold {p['threshold']:.4f}, "
                  f"{p['target']} {p['target_value']:g} at {p['level']} level on {p['women']} "
                  f"{'women' if p['unit'] == 'patient' else p['unit'] + ' group(s)'}, "
                  f"{p['created_at']} by {p['created_by']}"
                  for p in report["site_points"]]
    if report.get("fitness"):
        lines += ["", *fitness_lines(report["fitness"])]
    if report["caveats"] and not report["models"]:
        lines += ["", *(f"CAVEAT: {c}" for c in report["caveats"])]
    return "\n".join(lines)


def format_report(report: dict[str, Any], fmt: str) -> str:
    return json.dumps(report, indent=2) if fmt == "json" else format_text(report)
