"""Heatmaps drawn over their pictures: one image's overlay as a PNG (`screen heatmap`) and
thumbnails of the top-scored images for the HTML audit (`screen report --html`).

From the database, an image's stored map (worker/records/heatmaps.py) is drawn over its file where
the worker left it (processed/); from a file, the model scores it now and its attention is
mapped the way the worker maps it (worker/imaging/heatmap_geometry.py). Either way the drawing is
worker/imaging/heatmap.py's.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from html import escape
from pathlib import Path
from typing import TYPE_CHECKING, Any

from worker.imaging.dicom import DicomPolicy
from worker.imaging.errors import ImageError
from worker.imaging.heatmap import overlay_png
from worker.imaging.heatmap_geometry import preprocess_with_frame, to_original_frame
from worker.imaging.preprocess import PreprocessSettings, decode_source
from worker.imaging.reduction import LongSide
from worker.records.heatmaps import heatmap_for, top_scored_with_heatmaps
from worker.records.models import ImageRecord
from worker.records.paths import current_file
from worker.records.store import Store

if TYPE_CHECKING:
    import numpy as np

    from worker.scoring.scorer import Scorer

REPORT_IMAGES = 8  # thumbnails in the HTML audit
THUMBNAIL_SIDE = 360

ABOUT_THE_MAP = (
    "Colour shows the model's attention: the weight its gated-attention head gave each "
    "position of its 12 x 12 feature map, averaged over the image and its mirror image (red: "
    "most weight). It is where a weak model looked, not an outline of a lesion: on "
    "validation images, blanking the most-attended region lowered the score no more than "
    "blanking a random one (the model card has the figures)."
)


class OverlayError(ValueError):
    """No overlay can be drawn as asked; the message is one line for the operator."""


@dataclass(frozen=True)
class Overlay:
    png: bytes
    score: float | None
    label: str | None
    model_version: str
    source: Path


def _decoded(path: Path, dicom: DicomPolicy | None, max_pixels: int, max_side: int) -> Any:
    """The picture to draw on, brought down to at most `max_side` on its stored values
    before its grey levels are touched (a full-size mammogram is never held as floats)."""
    try:
        return decode_source(path, max_pixels, dicom, LongSide(max_side))
    except OSError as exc:
        raise OverlayError(f"cannot read {path}: {exc.strerror}") from exc
    except ImageError as exc:
        raise OverlayError(f"{path}: {exc}") from exc


def _drawn_over_file(record: ImageRecord, heat: np.ndarray, dicom: DicomPolicy | None,
                     max_pixels: int, max_side: int, missing: str) -> tuple[Path, bytes]:
    """PNG bytes of `heat` drawn over the record's file where the worker left it, and that
    file's path; `missing` begins the message when the file is not there."""
    path = current_file(record)
    if not path.is_file():
        raise OverlayError(f"{missing} {path}")
    img = _decoded(path, dicom, max_pixels, max_side)
    return path, overlay_png(img, heat, max_side)


def overlay_of_file(scorer: Scorer, path: Path, dicom: DicomPolicy | None = None,
                    max_side: int = 1024, max_pixels: int | None = None) -> Overlay:
    """Score one image file now and draw its attention over it."""
    if not scorer.has_attention:
        raise OverlayError(f"model {scorer.path} has no attention output: add it with "
                           f"`python -m export.attention {scorer.path}`")
    settings = scorer.metadata.preprocess
    if max_pixels is not None:
        settings = dataclasses.replace(settings, max_pixels=min(settings.max_pixels, max_pixels))
    try:  # the model's input and its frame exactly as the worker makes them
        x, frame = preprocess_with_frame(path, settings, dicom)
    except OSError as exc:
        raise OverlayError(f"cannot read {path}: {exc.strerror}") from exc
    except ImageError as exc:
        raise OverlayError(f"{path}: {exc}") from exc
    scores, maps = scorer.score_and_attend([x])
    assert maps is not None  # has_attention
    heat = to_original_frame(maps[0], frame, settings)
    score = float(scores[0])
    img = _decoded(path, dicom, settings.max_pixels, max_side)
    return Overlay(overlay_png(img, heat, max_side), score, scorer.label_for(score),
                   scorer.version, path)


def overlay_of_image(store: Store, image_id: int, dicom: DicomPolicy | None = None,
                     max_side: int = 1024,
                     max_pixels: int = PreprocessSettings.max_pixels) -> Overlay:
    """Draw an image's stored heatmap over its file."""
    with store.read() as s:
        record = s.get(ImageRecord, image_id)
    if record is None:
        raise OverlayError(f"no image #{image_id} in the database")
    heat = heatmap_for(store, image_id)
    if heat is None:
        raise OverlayError(f"image #{image_id} ({record.filename}, {record.status}) has no "
                           "heatmap: not scored, or scored by a model without the attention "
                           "output")
    path, png = _drawn_over_file(record, heat.heat, dicom, max_pixels, max_side,
                                 f"image #{image_id}: its file is no longer at")
    return Overlay(png, record.score, record.label, heat.model_version, path)


def overlays_html(store: Store, dicom: DicomPolicy | None = None, n: int = REPORT_IMAGES,
                  since: Any = None, until: Any = None,
                  max_pixels: int = PreprocessSettings.max_pixels) -> str:
    """The HTML audit's section: the ``n`` top-scored images of the period with their
    heatmaps, as inline PNG thumbnails ("" when no image has a heatmap). `max_pixels`: the
    largest image drawn (the worker's ``max_pixels``)."""
    from worker.audit.report_html import _png_img

    found = top_scored_with_heatmaps(store, n, since, until)
    if not found:
        return ""
    figures = []
    for record, heat in found:
        caption = (f"#{record.id} {escape(record.filename)}<br>score {record.score:.4f} "
                   f"({escape(record.label or '')})")
        try:
            _, png = _drawn_over_file(record, heat.heat, dicom, max_pixels, THUMBNAIL_SIDE,
                                      "file no longer at")
            picture = _png_img(png, f"heatmap of image {record.id}")
        except OverlayError as exc:
            picture = f'<div class="caveat">{escape(str(exc))}</div>'
        figures.append(f'<figure style="margin:0; max-width:{THUMBNAIL_SIDE}px">{picture}'
                       f'<figcaption class="small">{caption}</figcaption></figure>')
    return (f"<h2>Where the model looked: the {len(found)} top-scored image(s)</h2>"
            f'<p class="small">{escape(ABOUT_THE_MAP)}</p>'
            '<div class="overlays" style="display:flex; gap:1em; flex-wrap:wrap; '
            f'align-items:flex-start">{"".join(figures)}</div>')
