"""worker/imaging/heatmap_geometry.py: a map cell the model attended lands on the same place of the
original picture, whatever preprocessing did (pad or stretch, mirror by orient, crop)."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from worker.imaging.heatmap_geometry import (
    MAX_SIDE,
    Frame,
    preprocess_array_with_frame,
    preprocess_with_frame,
    to_original_frame,
)
from worker.imaging.preprocess import PreprocessSettings, preprocess_bytes

CELLS = 12


def _settings(**kw: object) -> PreprocessSettings:
    # Grey levels by the image's range, so that the spot stays the brightest block.
    return PreprocessSettings(size=96, intensity="range", mask_background=False, **kw)


def _picture(rows: int, cols: int, spot: tuple[int, int], right: bool = False) -> np.ndarray:
    """A breast-like ellipse touching the left (or right) side, a bright spot in it."""
    yy, xx = np.mgrid[0:rows, 0:cols]
    cx = cols if right else 0
    img = np.where(((xx - cx) / (0.7 * cols)) ** 2 + ((yy - rows / 2) / (0.45 * rows)) ** 2
                   <= 1, 0.35, 0.0)
    r, c = spot
    img[r - 6:r + 6, c - 6:c + 6] = 1.0
    return (img * 255).astype(np.uint8)


def _attended(x: np.ndarray) -> np.ndarray:
    """A one-hot map at the cell of the preprocessed input's brightest block."""
    size = x.shape[0]
    blocks = x[:, :, 0].reshape(CELLS, size // CELLS, CELLS, size // CELLS).mean(axis=(1, 3))
    out = np.zeros((CELLS, CELLS), np.float32)
    out[np.unravel_index(np.argmax(blocks), blocks.shape)] = 1.0
    return out


@pytest.mark.parametrize(
    ("shape", "spot", "right", "settings"),
    [
        ((600, 400), (150, 60), False, _settings(pad_square=True)),  # padded, portrait
        ((400, 640), (300, 120), False, _settings(pad_square=True)),  # padded, landscape
        ((600, 400), (450, 100), False, _settings(pad_square=False)),
        ((600, 400), (200, 330), True, _settings(orient="left")),
        ((600, 400), (420, 40), False, _settings(crop=True)),
        ((500, 700), (100, 620), True,
         _settings(orient="left", crop=True, pad_square=False)),
    ],
    ids=["pad-portrait", "pad-landscape", "stretch", "orient-left", "crop", "all-three"],
)
def test_the_attended_cell_lands_on_the_spot(shape: tuple[int, int], spot: tuple[int, int],
                                             right: bool, settings: PreprocessSettings) -> None:
    img = _picture(*shape, spot, right)
    x, frame = preprocess_array_with_frame(img, settings)
    assert frame.mirrored == (settings.orient == "left" and right)
    heat = to_original_frame(_attended(x), frame, settings)
    assert max(heat.shape) <= MAX_SIDE
    # Padded, a stored cell is square on the picture (stretched, it is a model cell).
    aspect = heat.shape[1] / heat.shape[0]
    assert not settings.pad_square or abs(aspect - shape[1] / shape[0]) < 0.15
    peak = np.array(np.unravel_index(np.argmax(heat), heat.shape), np.float64)
    at = (peak + 0.5) * np.array(shape) / np.array(heat.shape)
    # Within one map cell of the spot (a cell spans the square / 12 of the picture).
    cell = max(shape) / CELLS
    assert np.all(np.abs(at - np.array(spot)) <= cell), (at, spot)


def test_preprocess_with_frame_is_preprocess_bytes_and_the_frame() -> None:
    img = _picture(300, 200, (100, 40))
    data = cv2.imencode(".png", img)[1].tobytes()
    settings = PreprocessSettings(size=48)
    x, frame = preprocess_with_frame(data, settings)
    assert np.array_equal(x, preprocess_bytes(data, settings))
    # A picture of at least twice the model's side is brought down first (worker.imaging.reduction):
    # the frame is the picture as preprocessing takes it, and only its shape places the map.
    assert frame == Frame(48, 48)
    _, padded = preprocess_with_frame(data, PreprocessSettings(size=48, pad_square=True))
    assert padded == Frame(48, 32)


def test_outside_the_crop_the_map_is_zero() -> None:
    settings = PreprocessSettings(size=96, crop=True)
    frame = Frame(400, 400, crop=(0, 400, 0, 200))  # the model saw the left half only
    heat = to_original_frame(np.ones((CELLS, CELLS), np.float32), frame, settings)
    half = heat.shape[1] // 2
    assert np.all(heat[:, half + 1:] == 0) and np.all(heat[:, : half - 1] > 0)
