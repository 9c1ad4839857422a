"""Heatmaps in the database: one small map per scored image, committed with its score.

A stored map is the model's attention (its ``attention`` output, see export/attention.py)
resampled onto the decoded picture (worker/imaging/heatmap_geometry.py), scaled so that 1.0 is the
weight every map position would get if the model attended evenly (a map of 144 positions
summing to 1, times 144). float16, a few hundred bytes an image: the map, not a picture.
A duplicate has no map of its own; :func:`heatmap_for` follows it to its original.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from sqlalchemy import insert, select
from sqlalchemy.orm import Session

from worker.records.models import HeatmapRecord, ImageRecord
from worker.records.store import Store

_DTYPE = np.dtype("<f2")
_INSERT = insert(HeatmapRecord.__table__)


@dataclass(frozen=True)
class StoredHeatmap:
    image_id: int
    model_version: str
    heat: np.ndarray  # float32 (rows, cols) over the decoded picture; 1.0 = even attention


def heatmap_row(image_id: int, heat: np.ndarray, positions: int, model_version: str
                ) -> dict[str, Any]:
    """The `heatmaps` row of a map in the original frame (``positions``: the model map's
    cell count, the scale at which 1.0 is even attention)."""
    scaled = np.asarray(heat, dtype=np.float32) * np.float32(positions)
    rows, cols = scaled.shape
    return {"image_id": image_id, "model_version": model_version, "rows": rows, "cols": cols,
            "data": scaled.astype(_DTYPE).tobytes()}


def insert_heatmaps(s: Session, rows: list[dict[str, Any]]) -> None:
    """Add a batch's maps in the caller's transaction (the one that records its scores)."""
    if rows:
        s.execute(_INSERT, rows)


def decode(record: HeatmapRecord) -> np.ndarray:
    return np.frombuffer(record.data, dtype=_DTYPE).reshape(record.rows, record.cols).astype(
        np.float32)


def heatmap_for(store: Store, image_id: int) -> StoredHeatmap | None:
    """The map of an image (a duplicate's: its original's), or None when it has none."""
    with store.read() as s:
        return heatmap_in(s, image_id)


def heatmap_in(s: Session, image_id: int) -> StoredHeatmap | None:
    """:func:`heatmap_for` inside the caller's session."""
    original = s.scalar(select(ImageRecord.duplicate_of).where(ImageRecord.id == image_id))
    record = s.get(HeatmapRecord, original or image_id)
    if record is None:
        return None
    return StoredHeatmap(image_id, record.model_version, decode(record))


def top_scored_with_heatmaps(store: Store, n: int, since: Any = None, until: Any = None
                             ) -> list[tuple[ImageRecord, StoredHeatmap]]:
    """The ``n`` highest-scored images (received in the period) that have a map."""
    with store.read() as s:
        q = (select(ImageRecord, HeatmapRecord)
             .join(HeatmapRecord, HeatmapRecord.image_id == ImageRecord.id)
             .order_by(ImageRecord.score.desc(), ImageRecord.id).limit(n))
        if since is not None:
            q = q.where(ImageRecord.received_at >= since)
        if until is not None:
            q = q.where(ImageRecord.received_at < until)
        return [(image, StoredHeatmap(image.id, record.model_version, decode(record)))
                for image, record in s.execute(q).tuples()]
