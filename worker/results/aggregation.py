"""Aggregation: image scores into breast scores, breast scores into an exam score.

The breast score is the `breast` rule (mean or max, from the model's metadata) over its images;
the exam score the `exam` rule over its breasts. Images of unknown laterality count in the
exam, not in a breast: together they form one extra group, aggregated by the breast rule, that
enters the exam rule like a breast. Labels use the model's threshold at every level. A DICOM
instance received twice with different bytes (same SOP Instance UID) counts once, as its
latest copy. Pure functions: the worker (worker/results/exams.py) and the audit
(worker/audit) group the same way.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from worker.records.models import ImageRecord
from worker.scoring.model_metadata import ModelMetadata

LATERALITIES = ("L", "R")


def aggregate(scores: Iterable[float], rule: str) -> float:
    values = list(scores)
    if not values:
        raise ValueError("nothing to aggregate")
    if rule == "mean":
        return sum(values) / len(values)
    if rule == "max":
        return max(values)
    raise ValueError(f"unknown aggregation rule {rule!r}")


@dataclass(frozen=True)
class BreastScore:
    laterality: str
    n_images: int
    score: float


@dataclass(frozen=True)
class ExamScore:
    n_images: int
    score: float
    breasts: tuple[BreastScore, ...]


def score_exam(
    images: Iterable[tuple[str | None, float]], aggregation: dict[str, str]
) -> ExamScore:
    """(laterality, score) per image -> breast scores and the exam score."""
    groups: dict[str | None, list[float]] = {}
    for laterality, score in images:
        groups.setdefault(laterality if laterality in LATERALITIES else None, []).append(score)
    if not groups:
        raise ValueError("an exam needs at least one scored image")
    breasts = tuple(
        BreastScore(lat, len(groups[lat]), aggregate(groups[lat], aggregation["breast"]))
        for lat in LATERALITIES
        if lat in groups
    )
    parts = [b.score for b in breasts]
    if None in groups:  # unknown side: counts in the exam, in no breast
        parts.append(aggregate(groups[None], aggregation["breast"]))
    return ExamScore(
        n_images=sum(len(v) for v in groups.values()),
        score=aggregate(parts, aggregation["exam"]),
        breasts=breasts,
    )


def label_for(score: float, metadata: ModelMetadata, threshold: float) -> str:
    benign, malignant = metadata.class_names
    return malignant if score >= threshold else benign


def one_per_instance(images: list[ImageRecord]) -> list[ImageRecord]:
    """One image per SOP Instance UID, the latest received: a DICOM instance sent again with
    other bytes (re-encoded by a PACS, say) is the same image and must not count twice."""
    latest: dict[str, ImageRecord] = {}
    out = []
    for r in images:
        if r.sop_instance_uid is None:
            out.append(r)
        else:
            latest[r.sop_instance_uid] = r  # ordered by id: the last one wins
    return sorted(out + list(latest.values()), key=lambda r: r.id)
