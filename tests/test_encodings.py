"""The same picture scores the same whatever its encoding (issue 9, item 2).

One dev-pool mammogram is written as 8-bit PNG and JPEG, 12-bit-in-16-bit PNG, 16-bit PNG and
TIFF, and as DICOM (12-bit MONOCHROME2 with a window, MONOCHROME1, a linear VOI LUT, RLE and
JPEG 2000); the shipped model, loaded as the worker loads it, must score them all within 0.01.
"""

from __future__ import annotations

from collections.abc import Callable

import cv2
import numpy as np
import pytest
from pydicom.uid import JPEG2000Lossless, RLELossless

from tests.conftest import SHIPPED_MODEL, dev_pool_images
from tests.dicom_files import dicom_bytes, voi_lut_item, with_sequence
from worker.imaging.preprocess import decode_image, preprocess_bytes
from worker.scoring.scorer import Scorer

TOLERANCE = 0.01


def _encode(ext: str, img: np.ndarray, *params: int) -> bytes:
    ok, buf = cv2.imencode(ext, img, list(params))
    assert ok
    return buf.tobytes()


def _window_full_12bit(g: np.ndarray) -> bytes:
    return dicom_bytes(g.astype(np.uint16) * 16, WindowCenter=2048, WindowWidth=4096)


def _linear_voi_lut(g: np.ndarray) -> bytes:
    lut = np.linspace(0, 65535, 4096).round().astype(np.uint16)
    return dicom_bytes(g.astype(np.uint16) * 16, VOILUTSequence=with_sequence(voi_lut_item(lut)))


# name -> grey uint8 picture -> file bytes
ENCODINGS: dict[str, Callable[[np.ndarray], bytes]] = {
    "png8": lambda g: _encode(".png", g),
    "jpeg95": lambda g: _encode(".jpg", g, cv2.IMWRITE_JPEG_QUALITY, 95),
    "png12in16": lambda g: _encode(".png", g.astype(np.uint16) * 16),
    "png16": lambda g: _encode(".png", g.astype(np.uint16) * 257),
    "tiff16": lambda g: _encode(".tif", g.astype(np.uint16) * 257),
    "dicom-mono2-12bit-window": _window_full_12bit,
    "dicom-mono1": lambda g: dicom_bytes(
        4095 - g.astype(np.uint16) * 16, photometric="MONOCHROME1"
    ),
    "dicom-voi-lut": _linear_voi_lut,
    "dicom-rle": lambda g: dicom_bytes(g.astype(np.uint16) * 16, transfer_syntax=RLELossless),
    "dicom-jpeg2000": lambda g: dicom_bytes(
        g.astype(np.uint16) * 16, transfer_syntax=JPEG2000Lossless
    ),
}


@pytest.fixture(scope="module")
def picture() -> np.ndarray:
    [path] = dev_pool_images(1)
    grey = decode_image(path.read_bytes())
    assert grey.dtype == np.uint8 and grey.ndim == 2
    return grey


def test_every_encoding_holds_the_same_picture(picture: np.ndarray) -> None:
    """The files really differ in bytes and format, and decode to one picture (up to JPEG)."""
    files = {name: enc(picture) for name, enc in ENCODINGS.items()}
    assert len({f for f in files.values()}) == len(files)
    for name, data in files.items():
        img = decode_image(data).astype(np.float64)
        unit = (img - img.min()) / (img.max() - img.min())
        ref = (picture - picture.min()) / float(picture.max() - picture.min())
        tol = 0.05 if name == "jpeg95" else 1e-3
        assert np.abs(unit - ref).mean() < tol, name


def test_same_picture_same_score_with_the_shipped_model(picture: np.ndarray) -> None:
    scorer = Scorer(SHIPPED_MODEL)
    settings = scorer.metadata.preprocess
    names = list(ENCODINGS)
    inputs = [preprocess_bytes(ENCODINGS[n](picture), settings) for n in names]
    scores = dict(zip(names, (float(s) for s in scorer.score_batch(inputs)), strict=True))
    spread = max(scores.values()) - min(scores.values())
    assert spread <= TOLERANCE, f"scores differ by {spread:.4f}: {scores}"
