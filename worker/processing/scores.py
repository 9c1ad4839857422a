"""The scoring thread's task for one batch: wait for its preprocessing (decode threads), score
what decoded in ONNX Runtime, and return every file's :class:`Decision`. Nothing here touches
the database: only the calling thread commits (:mod:`worker.processing.decision`).
"""

from __future__ import annotations

import dataclasses
import logging
from concurrent.futures import Future

import numpy as np

from worker.imaging.errors import ImageError
from worker.imaging.heatmap_geometry import Frame, to_original_frame
from worker.imaging.identity import Identity
from worker.imaging.preprocess import PreprocessSettings
from worker.processing.decision import Decision
from worker.records.clock import utcnow
from worker.records.heatmaps import heatmap_row
from worker.records.store import ImageStatus
from worker.scoring.scorer import Scorer

log = logging.getLogger("mammo_screen")

# A file's preprocessing under way (decode threads), with the identity its decision records.
Preprocessing = dict[int, tuple[Future[tuple[np.ndarray, Frame]], Identity]]


class BatchScorer:
    def __init__(self, scorer: Scorer, settings: PreprocessSettings) -> None:
        self.scorer = scorer
        self.settings = settings

    def preprocessed_and_scored(self, preprocessing: Preprocessing) -> dict[int, Decision]:
        """Wait for the batch's preprocessing, score what decoded in one ONNX Runtime call,
        and return every file's decision (not committed)."""
        to_score: list[tuple[int, np.ndarray, Frame]] = []
        decided: dict[int, Decision] = {}
        for rid, (future, ident) in preprocessing.items():
            try:
                to_score.append((rid, *future.result()))
            except ImageError as exc:
                decided[rid] = Decision(ImageStatus.QUARANTINED, error=str(exc), identity=ident)
            except Exception as exc:  # a decoder bug must not stop the worker
                decided[rid] = Decision(
                    ImageStatus.QUARANTINED,
                    error=f"preprocessing failed: {exc!r}",
                    identity=ident,
                )
        for rid, decision in self.score(to_score).items():
            decided[rid] = dataclasses.replace(decision, identity=preprocessing[rid][1])
        return decided

    def score(self, items: list[tuple[int, np.ndarray, Frame]]) -> dict[int, Decision]:
        """Score in one ONNX Runtime call; if the batch fails, one by one to isolate the cause.
        With a model that has the attention output, each decision carries its `heatmap` row."""
        if not items:
            return {}
        try:
            scores, maps = self.scorer.score_and_attend([img for _, img, _ in items])
        except Exception as exc:
            if len(items) == 1:
                log.error("scoring failed id=%d error=%r", items[0][0], exc)
                return {}  # stays `received`: retried, then quarantined after max_attempts
            out: dict[int, Decision] = {}
            for item in items:
                out.update(self.score([item]))
            return out
        now = utcnow()
        out = {
            rid: Decision(
                ImageStatus.SCORED,
                score=float(score),
                label=self.scorer.label_for(float(score)),
                threshold=self.scorer.threshold,
                model_version=self.scorer.version,
                scored_at=now,
            )
            for (rid, _, _), score in zip(items, scores, strict=True)
        }
        if maps is not None:
            for (rid, _, frame), attention in zip(items, maps, strict=True):
                try:
                    heat = to_original_frame(attention, frame, self.settings)
                except Exception as exc:  # a map is an extra: it must never cost a score
                    log.warning("no heatmap id=%d error=%r", rid, exc)
                    continue
                out[rid] = dataclasses.replace(out[rid], heatmap=heatmap_row(
                    rid, heat, attention.size, self.scorer.version))
        return out
