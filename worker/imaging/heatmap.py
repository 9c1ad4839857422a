"""Where the model looked: a small attention map drawn over the picture it scored.

A heatmap here is the model's own attention (its gated-attention head's weight per position of
its feature grid), mapped back onto the original image's geometry: a small float array in
[0, 1] whose rows and columns cover the whole original frame. It is attention of a weak model,
not a lesion outline. This module only draws it; computing and storing it live with the scorer
and the store.
"""

from __future__ import annotations

import cv2
import numpy as np


def normalise_map(heat: np.ndarray) -> np.ndarray:
    """A map scaled to [0, 1] by its own range (a flat map becomes all zeros)."""
    h = np.asarray(heat, dtype=np.float32)
    if h.ndim != 2 or h.size == 0:
        raise ValueError(f"a heatmap is a 2D array, got shape {h.shape}")
    lo, hi = float(h.min()), float(h.max())
    if not (np.isfinite(lo) and np.isfinite(hi)) or hi <= lo:
        return np.zeros_like(h)
    return (h - np.float32(lo)) / np.float32(hi - lo)


def overlay_rgb(grey: np.ndarray, heat: np.ndarray, alpha: float = 0.4) -> np.ndarray:
    """The picture in grey with the map in colour over it, as uint8 RGB of the picture's size.

    ``grey``: the picture as displayed, float in [0, 1] (0 = dark) or uint8, shape (H, W).
    ``heat``: any small 2D map covering the same frame; it is scaled to [0, 1] by its own
    range, enlarged smoothly to (H, W) and blended with weight ``alpha`` where it is strong,
    so that the picture stays readable where the model paid no attention.
    """
    if grey.ndim != 2:
        raise ValueError(f"the picture must be one grey channel, got shape {grey.shape}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    base = grey if grey.dtype == np.uint8 else np.clip(grey * 255.0 + 0.5, 0, 255).astype(np.uint8)
    rows, cols = base.shape
    big = cv2.resize(normalise_map(heat), (cols, rows), interpolation=cv2.INTER_CUBIC)
    big = np.clip(big, 0.0, 1.0)
    colour = cv2.applyColorMap((big * 255.0).astype(np.uint8), cv2.COLORMAP_JET)
    colour = cv2.cvtColor(colour, cv2.COLOR_BGR2RGB).astype(np.float32)
    grey_rgb = np.repeat(base[:, :, None], 3, axis=2).astype(np.float32)
    weight = (alpha * big)[:, :, None]
    return np.clip(grey_rgb * (1.0 - weight) + colour * weight + 0.5, 0, 255).astype(np.uint8)


def display_picture(img: np.ndarray, max_side: int) -> np.ndarray:
    """A decoded picture as the model saw its grey levels (its own range, dark background):
    float32 in [0, 1]. The picture is already at most ``max_side`` pixels a side: it was
    brought down while decoding (worker.imaging.reduction.LongSide), on its stored values."""
    from worker.imaging.preprocess import normalise_polarity, to_unit_float

    if max_side < 16:
        raise ValueError(f"max_side must be at least 16, got {max_side}")
    return normalise_polarity(to_unit_float(img))


def overlay_png(img: np.ndarray, heat: np.ndarray, max_side: int = 1024) -> bytes:
    """PNG bytes of :func:`overlay_rgb` over :func:`display_picture` of a decoded picture
    (decoded with ``LongSide(max_side)``)."""
    rgb = overlay_rgb(display_picture(img, max_side), heat)
    ok, buf = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    if not ok:
        raise ValueError("PNG encoding failed")
    return buf.tobytes()
