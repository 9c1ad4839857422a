"""The audit's rows and units: scored images with a known outcome, grouped into breasts and
exams (see :class:`worker.scoring.levels.Level`), and the groups the bootstrap resamples."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from enum import StrEnum

import numpy as np

from worker.records.models import ImageRecord
from worker.records.store import ImageStatus
from worker.results.aggregation import one_per_instance, score_exam
from worker.scoring.levels import Level
from worker.scoring.model_metadata import DEFAULT_AGGREGATION

CLASSES = ("benign", "malignant")  # outcome vocabulary; index 1 is the positive class
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


def unit_rows(rows: list[AuditRow], images: list[ImageRecord]) -> list[AuditRow]:
    """The image rows that enter breasts and exams: one per DICOM instance, its latest scored
    copy (worker/results/aggregation.py's rule: an instance received twice with other bytes is
    one image of its breast and exam). Image level keeps every row, both copies included, as it
    always has. ``images`` are the records the rows came from; only the scored ones compete,
    so a later duplicate (the same bytes again) never hides the image it repeats."""
    once = {r.id for r in one_per_instance([r for r in images if r.status == ImageStatus.SCORED])}
    return [r for r in rows if r.image_id in once]


def truth_and_scores(rows: list[AuditRow]) -> tuple[np.ndarray, np.ndarray]:
    """The rows' truths (malignant: True) and scores, as the metrics take them."""
    return (np.array([r.truth for r in rows], dtype=bool),
            np.array([r.score for r in rows], dtype=np.float64))


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
    model's `aggregation` rule ({"breast": ..., "exam": ...}; the default when None).

    A unit's truth is malignant if any of its images' outcomes is, its call its score at
    the threshold recorded with its images. Only images with a known outcome enter a unit,
    so a unit's score can differ from the one the worker wrote when part of a study has no
    outcome yet."""
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
