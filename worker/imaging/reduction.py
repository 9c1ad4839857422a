"""Bringing a large image down before any grey-level work (preprocessing v3).

A full-field mammogram (3328 x 4096, 12-16 bits) is 60-100 times the model's input. Every step
after decoding (LUTs, window, polarity, the breast mask, percentiles) is cheaper and needs far
less memory on the small image, so a decoded image is first area-averaged straight to the
geometry the model sees, on its stored integers (OpenCV's exact area weights, in 16 bits with
the values shifted into their headroom so that a block's mean keeps its fraction). One area
step from the full image: a two-step reduction (an integer factor, then the rest) blurs more,
and this model's scores move with blur.

Where the model's settings allow it (``decoder_scaling``), decoders that can stop early bring
the image part of the way themselves (JPEG 2000 resolution levels, libjpeg's 1/2-1/8 scaling),
never below twice the target, so that the last step is still an area average over several
pixels. Their filters are not an area average (a wavelet's low band is sharper), and the
shipped model's scores move with the filter, so its settings keep this off.

Images under twice the model's size (the development pool's 640 px squares at 384 px) are not
reduced here: they take the path they took in v2, and give the same pixels.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

# libjpeg's scaled decoding, by scale.
JPEG_REDUCED = {
    2: cv2.IMREAD_REDUCED_GRAYSCALE_2,
    4: cv2.IMREAD_REDUCED_GRAYSCALE_4,
    8: cv2.IMREAD_REDUCED_GRAYSCALE_8,
}


@dataclass(frozen=True)
class Reduction:
    """Where a decoded image of a given size goes before its grey levels are touched."""

    size: int  # the model's input side
    pad_square: bool  # keep the aspect ratio (padded later) instead of stretching
    decoder_scaling: bool = False  # decoders may stop early (see decoder_scale)

    def target(self, rows: int, cols: int) -> tuple[int, int] | None:
        """(rows, cols) to bring the image to, or None to leave it to the v2 path."""
        if min(rows, cols) < 2 * self.size:
            return None
        if self.pad_square:  # the longer side becomes the model's side; padding follows
            return LongSide(self.size).target(rows, cols)
        return self.size, self.size

    def decoder_scale(self, rows: int, cols: int, largest: int = 8) -> int:
        """The power of two (1, 2, 4 ... `largest`) a decoder may divide each side by: the
        largest that leaves both sides at least twice the target (1 unless decoder_scaling)."""
        target = self.target(rows, cols)
        if target is None or not self.decoder_scaling:
            return 1
        room = min(rows / (2 * target[0]), cols / (2 * target[1]))
        scale = 1
        while scale * 2 <= min(room, largest):
            scale *= 2
        return scale


@dataclass(frozen=True)
class LongSide:
    """At most `long_side` pixels on the longer side, the aspect ratio kept: a picture for
    people (a Secondary Capture), not for the model. Decoders decode in full."""

    long_side: int

    def target(self, rows: int, cols: int) -> tuple[int, int] | None:
        if max(rows, cols) <= self.long_side:
            return None
        scale = self.long_side / max(rows, cols)
        return max(1, round(rows * scale)), max(1, round(cols * scale))

    def decoder_scale(self, rows: int, cols: int) -> int:
        return 1


def reduce_to(img: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Area-average a freshly decoded grey image to (rows, cols), as float32 on the same scale.

    Unsigned integers are averaged in 16 bits, shifted up first into the headroom their
    largest value leaves (a 12-bit image by 4 bits), so that a block's mean keeps 1/16 of a
    stored level or better when OpenCV rounds it; `img` may be overwritten doing so (it is
    never needed again). Other types are averaged in float32.
    """
    rows, cols = shape
    if img.dtype in (np.uint8, np.uint16):
        top = int(img.max()) if img.size else 0
        shift = 16 - max(1, top.bit_length())
        if img.dtype == np.uint8:
            img = img.astype(np.uint16)
        if shift:
            img = np.left_shift(img, np.uint16(shift), out=img if img.flags.writeable else None)
        small = cv2.resize(img, (cols, rows), interpolation=cv2.INTER_AREA)
        return small.astype(np.float32) / np.float32(1 << shift)
    if img.dtype != np.float32:
        img = img.astype(np.float32)
    return cv2.resize(img, (cols, rows), interpolation=cv2.INTER_AREA)
