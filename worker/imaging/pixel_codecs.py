"""Which decoder turns a DICOM image's Pixel Data into stored values, and how far it may stop
early (worker.imaging.reduction). pydicom's plugins by default; for a full-size image the faster
permissively licensed ones where pydicom would try a slower one first, and, where a model's
preprocessing allows it, JPEG 2000 resolution levels and libjpeg's scaling.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np

from worker.imaging.reduction import JPEG_REDUCED

if TYPE_CHECKING:
    from pydicom.dataset import Dataset
    from pydicom.uid import UID

# JPEG 2000 syntaxes whose codestream keeps resolution levels (Part 1 and High-Throughput).
_J2K_SYNTAXES = frozenset(
    {
        "1.2.840.10008.1.2.4.90",  # JPEG 2000 Lossless
        "1.2.840.10008.1.2.4.91",  # JPEG 2000
        "1.2.840.10008.1.2.4.201",  # HTJ2K Lossless
        "1.2.840.10008.1.2.4.202",  # HTJ2K Lossless RPCL
        "1.2.840.10008.1.2.4.203",  # HTJ2K
    }
)
_JPEG_BASELINE = "1.2.840.10008.1.2.4.50"
# Lossless JPEG (process 14, and its selection value 1): imagecodecs' decoder (BSD) is several
# times faster than python-gdcm's, and pydicom has no plugin for it.
_LOSSLESS_JPEG = frozenset({"1.2.840.10008.1.2.4.57", "1.2.840.10008.1.2.4.70"})
# pydicom tries its plugins in a fixed order; for these syntaxes a later one is several times
# faster on a full-size image (pylibjpeg-rle's Rust, pyjpegls' CharLS against python-gdcm).
_FASTEST_PLUGIN = {
    "1.2.840.10008.1.2.5": "pylibjpeg",  # RLE Lossless
    "1.2.840.10008.1.2.4.80": "pyjpegls",  # JPEG-LS Lossless
    "1.2.840.10008.1.2.4.81": "pyjpegls",  # JPEG-LS Near-Lossless
}


def stored_pixels(ds: Dataset, uid: UID, scale: int) -> np.ndarray:
    """The stored values, divided in size by up to `scale` where the codec can stop early
    (JPEG 2000 resolution levels through the system's OpenJPEG; libjpeg's scaling for 8-bit
    baseline JPEG); otherwise pydicom decodes the whole frame."""
    unsigned = int(ds.get("PixelRepresentation", 0)) == 0
    if scale > 1 and unsigned and str(uid) in _J2K_SYNTAXES:
        from worker.imaging import j2k

        if j2k.reduced_decoder_available():
            return j2k.decode_reduced(_first_frame(ds), scale)
    if unsigned and str(uid) in _LOSSLESS_JPEG:
        ljpeg = _imagecodecs_ljpeg()
        if ljpeg is not None:
            return ljpeg(_first_frame(ds))
    if scale > 1 and str(uid) == _JPEG_BASELINE and int(ds.BitsAllocated) == 8:
        import cv2

        frame = np.frombuffer(_first_frame(ds), dtype=np.uint8)
        pixels = cv2.imdecode(frame, JPEG_REDUCED[scale])
        if pixels is not None:
            return pixels
    plugin = _FASTEST_PLUGIN.get(str(uid))
    if plugin is not None:
        from pydicom.pixels import get_decoder

        if plugin in get_decoder(uid).available_plugins:
            ds.pixel_array_options(decoding_plugin=plugin)
    return ds.pixel_array


def _imagecodecs_ljpeg() -> Callable[[bytes], np.ndarray] | None:
    try:
        from imagecodecs import ljpeg_decode
    except ImportError:  # python-gdcm, through pydicom, decodes it instead
        return None
    return ljpeg_decode


def _first_frame(ds: Dataset) -> bytes:
    from pydicom.encaps import generate_frames

    return next(generate_frames(ds.PixelData, number_of_frames=1))
