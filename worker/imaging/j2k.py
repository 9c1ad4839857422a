"""JPEG 2000 decoded at a lower resolution level, when the system's OpenJPEG can do it.

A JPEG 2000 codestream holds its image as a pyramid of wavelet resolution levels; OpenJPEG can
stop decoding at a coarser one, which for a full-field mammogram brought down 8 times costs a
small fraction of the full decode. pylibjpeg-openjpeg does not expose that, so this module reads
the codestream through glymur over the system's libopenjp2 (Debian ``libopenjp2-7``). Where
either is missing, :func:`reduced_decoder_available` is False and the caller decodes in full.
"""

from __future__ import annotations

import functools
import logging
import tempfile
import warnings

import numpy as np

log = logging.getLogger(__name__)


@functools.cache
def reduced_decoder_available() -> bool:
    """Whether glymur and a libopenjp2 it can load are installed."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # glymur warns when it finds no library
            import glymur
    except ImportError:
        return False
    found = str(getattr(glymur.version, "openjpeg_version", "") or "")
    parts = tuple(int(p) for p in found.split(".")[:2] if p.isdigit())
    return parts >= (2, 3)  # glymur reads resolution levels from OpenJPEG 2.3 on


def decode_reduced(codestream: bytes, scale: int) -> np.ndarray:
    """Decode a J2K codestream with each side divided by `scale` (a power of two), or by
    the largest power of two its decomposition levels allow if they are fewer. Raises what
    the decoder raises for a bad stream."""
    import glymur

    # glymur reads a file: the codestream goes through a temporary one.
    with tempfile.NamedTemporaryFile(suffix=".j2k") as fh:
        fh.write(codestream)
        fh.flush()
        jp2 = glymur.Jp2k(fh.name)
        cod = next((s for s in jp2.codestream.segment if s.marker_id == "COD"), None)
        if cod is not None:
            scale = min(scale, 1 << int(cod.num_res))
        pixels = jp2[::scale, ::scale]
    return np.ascontiguousarray(pixels)
