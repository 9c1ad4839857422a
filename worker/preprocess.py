"""The one preprocessing path: bytes of an image file -> a model-ready float array.

The trainer and the worker both call :func:`preprocess_bytes`, and the settings it ran with
travel inside the ONNX model's metadata, so a worker cannot serve a model with preprocessing
it was not trained on. NumPy and OpenCV only: no TensorFlow here.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING

import cv2
import numpy as np

from worker.image_header import read_header

if TYPE_CHECKING:
    from worker.dicom import DicomPolicy

# Bump when the arithmetic below changes in a way that changes pixels: a model records the
# version it was trained with and the worker refuses a mismatch.
PREPROCESS_VERSION = 1

# cv2.imdecode reads from memory and these extensions are what the worker accepts.
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".pgm", ".pnm", ".tif", ".tiff"})


class ImageError(ValueError):
    """A file that cannot become a model input; the message is the quarantine reason."""


@dataclass(frozen=True)
class PreprocessSettings:
    """Everything that decides the pixels a model sees. Stored in the model's metadata."""

    size: int = 640
    polarity: str = "auto"  # "auto": invert images whose background is bright; "none": leave
    pad_square: bool = True  # pad to a square (dark) before resizing, keeping the aspect ratio
    corner_fraction: float = 0.05  # side of the corner patches used to judge the background
    max_pixels: int = 100_000_000  # refuse larger images from the header, before decoding
    crop: bool = False  # crop to the breast's bounding box (largest bright region) first
    orient: str = "none"  # "left": mirror images so the breast touches the left edge
    version: int = PREPROCESS_VERSION

    def __post_init__(self) -> None:
        if not 16 <= self.size <= 4096:
            raise ValueError(f"size must be between 16 and 4096, got {self.size}")
        if self.polarity not in ("auto", "none"):
            raise ValueError(f"polarity must be 'auto' or 'none', got {self.polarity!r}")
        if not 0.0 < self.corner_fraction < 0.5:
            raise ValueError(f"corner_fraction must be in (0, 0.5), got {self.corner_fraction}")
        if self.max_pixels < 1:
            raise ValueError("max_pixels must be positive")
        if self.orient not in ("none", "left"):
            raise ValueError(f"orient must be 'none' or 'left', got {self.orient!r}")

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> PreprocessSettings:
        raw = json.loads(text)
        known = {f.name for f in fields(cls)}
        unknown = set(raw) - known
        if unknown:
            raise ValueError(f"unknown preprocessing settings: {sorted(unknown)}")
        return cls(**raw)


def decode_image(
    data: bytes,
    max_pixels: int = PreprocessSettings.max_pixels,
    dicom: DicomPolicy | None = None,
) -> np.ndarray:
    """Decode DICOM/JPEG/PNG/PGM/TIFF bytes to one grey channel.

    DICOM (recognised by content, whatever the file's name) becomes the displayed picture as
    float32 in [0, 1] (see worker.dicom; `dicom` is the operator's policy, default MG only);
    the other formats become 8- or 16-bit, EXIF-oriented. The header is read first so that a
    huge or bomb-like image is refused before any pixel buffer is allocated.
    """
    if not data:
        raise ImageError("empty file")
    # Imported here because worker.dicom imports ImageError from this module.
    from worker import dicom as dicom_format

    # DICOM first: a DICOM preamble may itself hold a TIFF header (dual-format files).
    if dicom_format.is_dicom(data):
        return dicom_format.decode_dicom(data, max_pixels, dicom).pixels
    header = read_header(data)
    if header is None:
        raise ImageError("not a supported image (DICOM, JPEG, PNG, PGM or TIFF)")
    if header.width * header.height > max_pixels:
        raise ImageError(
            f"image too large: {header.width}x{header.height} pixels, over max_pixels={max_pixels}"
        )
    if header.format == "JPEG" and b"\xff\xd9" not in data[-4096:]:
        # libjpeg pads a truncated JPEG with grey and returns it; the end-of-image marker
        # cannot occur inside entropy-coded data, so its absence means the file was cut.
        raise ImageError("truncated JPEG (no end-of-image marker)")
    buf = np.frombuffer(data, dtype=np.uint8)
    # ANYDEPTH keeps 16-bit samples; not passing IMREAD_UNCHANGED keeps EXIF orientation applied.
    img = cv2.imdecode(buf, cv2.IMREAD_ANYDEPTH | cv2.IMREAD_ANYCOLOR)
    if img is None or img.size == 0:
        raise ImageError(f"cannot decode {header.format} data (corrupt or truncated)")
    if img.ndim == 3:
        code = cv2.COLOR_BGRA2GRAY if img.shape[2] == 4 else cv2.COLOR_BGR2GRAY
        img = cv2.cvtColor(img, code)
    if img.dtype not in (np.uint8, np.uint16):
        img = _to_uint16(img)
    return img


def _to_uint16(img: np.ndarray) -> np.ndarray:
    """Float or 32-bit TIFFs: stretch to the 16-bit range (their absolute scale is unknown)."""
    img = img.astype(np.float64)
    lo, hi = float(np.nanmin(img)), float(np.nanmax(img))
    if not np.isfinite(lo) or not np.isfinite(hi):
        raise ImageError("image contains non-finite values")
    span = hi - lo if hi > lo else 1.0
    return np.round((img - lo) / span * 65535.0).astype(np.uint16)


def to_unit_float(img: np.ndarray) -> np.ndarray:
    """Integer image -> float32 in [0, 1] by its dtype's full range."""
    scale = 65535.0 if img.dtype == np.uint16 else 255.0
    return img.astype(np.float32) / np.float32(scale)


def background_is_bright(img: np.ndarray, corner_fraction: float = 0.05) -> bool:
    """True when the image's corners (where the background is) are mostly bright.

    A mammogram's breast touches one side, so at least two corners are background; the median
    of the four corner medians is robust to one corner covered by tissue or a burned-in label.
    """
    h, w = img.shape[:2]
    k = max(1, int(round(min(h, w) * corner_fraction)))
    corners = [img[:k, :k], img[:k, -k:], img[-k:, :k], img[-k:, -k:]]
    level = float(np.median([np.median(c) for c in corners]))
    return level > 0.5


def normalise_polarity(img: np.ndarray, corner_fraction: float = 0.05) -> np.ndarray:
    """Invert a unit-float image whose background is bright, so that background is dark."""
    if background_is_bright(img, corner_fraction):
        return 1.0 - img
    return img


def pad_to_square(img: np.ndarray) -> np.ndarray:
    """Pad with zeros (dark background) around the shorter side, centring the image."""
    h, w = img.shape[:2]
    if h == w:
        return img
    side = max(h, w)
    top, left = (side - h) // 2, (side - w) // 2
    out = np.zeros((side, side), dtype=img.dtype)
    out[top : top + h, left : left + w] = img
    return out


def breast_on_right(img: np.ndarray) -> bool:
    """True when more tissue lies in the right half than the left (background is dark)."""
    half = img.shape[1] // 2
    return float(img[:, half:].sum()) > float(img[:, :half].sum())


def breast_bbox(img: np.ndarray, margin: float = 0.02) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) of the largest bright region, with a small margin.

    Otsu's threshold on a smoothed copy separates tissue from background; the largest
    connected component is the breast (burned-in labels and markers are small).
    """
    small = cv2.GaussianBlur((img * 255).astype(np.uint8), (5, 5), 0)
    _, mask = cv2.threshold(small, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    n, _, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
    h, w = img.shape[:2]
    if n <= 1:
        return 0, h, 0, w
    k = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
    x, y, bw, bh = (int(v) for v in stats[k, :4])
    if bw * bh < 0.05 * h * w:  # nothing breast-sized found: keep the whole image
        return 0, h, 0, w
    m = int(round(margin * max(h, w)))
    return max(0, y - m), min(h, y + bh + m), max(0, x - m), min(w, x + bw + m)


def preprocess_array(img: np.ndarray, settings: PreprocessSettings) -> np.ndarray:
    """A decoded grey image (uint8/uint16) -> float32 array of shape (size, size, 1) in [0, 1]."""
    x = to_unit_float(img)
    if settings.polarity == "auto":
        x = normalise_polarity(x, settings.corner_fraction)
    if settings.orient == "left" and breast_on_right(x):
        x = np.ascontiguousarray(x[:, ::-1])
    if settings.crop:
        top, bottom, left, right = breast_bbox(x)
        x = x[top:bottom, left:right]
    if settings.pad_square:
        x = pad_to_square(x)
    if x.shape[0] != settings.size or x.shape[1] != settings.size:
        shrinking = x.shape[0] > settings.size
        interp = cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR
        x = cv2.resize(x, (settings.size, settings.size), interpolation=interp)
    return np.clip(x, 0.0, 1.0)[:, :, np.newaxis].astype(np.float32, copy=False)


def preprocess_bytes(
    data: bytes, settings: PreprocessSettings, dicom: DicomPolicy | None = None
) -> np.ndarray:
    """Decode, orient, fix polarity, resize and scale: the function trainer and worker share."""
    return preprocess_array(decode_image(data, settings.max_pixels, dicom), settings)


def preprocess_file(
    path: str | Path, settings: PreprocessSettings, dicom: DicomPolicy | None = None
) -> np.ndarray:
    return preprocess_bytes(Path(path).read_bytes(), settings, dicom)
