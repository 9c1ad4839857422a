"""The units a score is given for: an image, a breast, an exam."""

from __future__ import annotations

from enum import StrEnum


class Level(StrEnum):
    """The unit the figures count.

    The grouping follows worker/results/exams.py: an exam is the images of one study (an
    image without a Study Instance UID is in no exam and no breast), a breast the images of
    an exam with one side (L or R); images of unknown side are in no breast but count in
    their exam as one group. A unit's score is the model's rule (mean or max, its
    aggregation) over its images. The audit counts at each level (worker.audit.units), and a
    site point is chosen at one (worker.scoring.site_points).
    """

    IMAGE = "image"
    BREAST = "breast"
    EXAM = "exam"
