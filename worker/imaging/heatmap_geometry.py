"""Where each cell of the model's attention map lies on the original picture.

The model sees the picture after preprocessing (worker/imaging/preprocess.py): mirrored when
``orient = "left"`` found the breast on the right, cropped to the breast when ``crop``, padded
to a centred square when ``pad_square`` (else stretched to the square), resized to ``size``.
Its attention map (``H x W`` cells, 12 x 12 at 384 px) covers that square. This module undoes
those steps: :func:`to_original_frame` resamples the map onto a small grid whose rows and
columns cover the decoded picture exactly (the frame ``decode_image`` returns: EXIF-oriented,
DICOM as displayed), zero where the model saw none of it (outside the crop), so that drawing it
is a plain resize to the picture's size (worker/imaging/heatmap.py).

The map is in the input's own orientation already: the attention output averages the plain
pass with the mirror pass flipped back (export/attention.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import cv2
import numpy as np

from worker.imaging.preprocess import PreprocessSettings, decode_for, preprocess_with_geometry

if TYPE_CHECKING:
    from worker.imaging.dicom import DicomPolicy

# Output cells per map cell along each axis (finer than the map, so that bilinear resampling
# keeps its shape), and the most cells a side of a stored map may have.
OVERSAMPLE = 2
MAX_SIDE = 64


@dataclass(frozen=True)
class Frame:
    """The geometry preprocessing gave one picture: its decoded size (a large picture's as
    brought down before preprocessing, worker.imaging.reduction: only its shape places the map),
    whether ``orient`` mirrored it, and the crop box (top, bottom, left, right) in the
    mirrored picture."""

    height: int
    width: int
    mirrored: bool = False
    crop: tuple[int, int, int, int] | None = None

    def box(self) -> tuple[int, int, int, int]:
        return self.crop if self.crop is not None else (0, self.height, 0, self.width)


def preprocess_array_with_frame(img: np.ndarray, settings: PreprocessSettings
                                ) -> tuple[np.ndarray, Frame]:
    """:func:`worker.imaging.preprocess.preprocess_array` of a decoded picture and the frame
    it gave the picture (found in the same pass)."""
    x, mirrored, crop = preprocess_with_geometry(img, settings)
    h, w = img.shape[:2]
    return x, Frame(h, w, mirrored, crop)


def preprocess_with_frame(
    source: bytes | Path, settings: PreprocessSettings, dicom: DicomPolicy | None = None
) -> tuple[np.ndarray, Frame]:
    """:func:`worker.imaging.preprocess.preprocess_bytes` (the same two calls) and the frame: that
    of the decoded picture, which for a large image is already brought down (its shape, not
    its pixel count, is what places the map)."""
    return preprocess_array_with_frame(decode_for(source, settings, dicom), settings)


def to_original_frame(attention: np.ndarray, frame: Frame, settings: PreprocessSettings
                      ) -> np.ndarray:
    """The model's ``(H, W)`` map resampled onto a grid covering the decoded picture
    (float32, at most MAX_SIDE cells a side; zero outside the crop)."""
    att = np.asarray(attention, dtype=np.float32)
    rows_m, cols_m = att.shape
    top, bottom, left, right = frame.box()
    seen_h, seen_w = bottom - top, right - left
    if settings.pad_square:
        side = max(seen_h, seen_w)
        square_h = square_w = side
        pad_top, pad_left = (side - seen_h) // 2, (side - seen_w) // 2
    else:  # stretched to the square
        square_h, square_w, pad_top, pad_left = seen_h, seen_w, 0, 0
    out_rows = int(np.clip(round(OVERSAMPLE * frame.height * rows_m / square_h), 1, MAX_SIDE))
    out_cols = int(np.clip(round(OVERSAMPLE * frame.width * cols_m / square_w), 1, MAX_SIDE))
    # Each output cell's centre, in the decoded picture's pixels, then in the model's square.
    y = (np.arange(out_rows, dtype=np.float32) + 0.5) * (frame.height / out_rows)
    x = (np.arange(out_cols, dtype=np.float32) + 0.5) * (frame.width / out_cols)
    if frame.mirrored:
        x = frame.width - x
    v = (y - top + pad_top) * (rows_m / square_h)  # in map cells, 0..rows_m across the square
    u = (x - left + pad_left) * (cols_m / square_w)
    inside = (((y >= top) & (y < bottom))[:, None] & ((x >= left) & (x < right))[None, :])
    map_y = np.repeat((v - 0.5)[:, None], out_cols, axis=1)  # cell centres at 0, 1, ...
    map_x = np.repeat((u - 0.5)[None, :], out_rows, axis=0)
    out = cv2.remap(att, map_x, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    return np.where(inside, out, np.float32(0.0)).astype(np.float32)
