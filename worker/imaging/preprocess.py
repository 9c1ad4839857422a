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

from worker.imaging.errors import ImageError
from worker.imaging.image_header import read_header
from worker.imaging.reduction import JPEG_REDUCED, LongSide, Reduction, reduce_to

if TYPE_CHECKING:
    from worker.imaging.dicom import DicomPolicy

# Bump when the arithmetic below changes in a way that changes pixels: a model records the
# version it was trained with and the worker refuses a mismatch.
# v2: intensity from the image's own range, then normalised within the breast (``intensity``).
# v3: a non-square image is stretched to the square, as the development pool's squares were
#     made from portrait originals (``pad_square`` off), and a large image is first brought
#     down to the model's geometry (area averaging on its stored integers, worker.imaging.reduction)
#     before any grey-level work. A 640 px square at 384 px takes the same path as in v2.
PREPROCESS_VERSION = 3

# How the breast's grey levels are normalised (after polarity, at model size):
#   "range":      the image's own darkest..brightest, nothing more (bit depth stops mattering);
#   "percentile": the breast's own low..high percentiles map to 0..1 (any affine change of the
#                 grey scale, such as another bit depth, window or detector gain, cancels out);
#   "equalise":   each breast pixel becomes its rank among the breast's pixels (any monotone
#                 contrast curve, such as a vendor's processing LUT or a SIGMOID window, cancels).
INTENSITY_MODES = ("range", "percentile", "equalise")

# cv2.imdecode reads from memory and these extensions are what the worker accepts.
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".pgm", ".pnm", ".tif", ".tiff"})


@dataclass(frozen=True)
class PreprocessSettings:
    """Everything that decides the pixels a model sees. Stored in the model's metadata."""

    size: int = 640
    polarity: str = "auto"  # "auto": invert images whose background is bright; "none": leave
    # True: pad to a square (dark) before resizing, keeping the aspect ratio; False: stretch
    # to the square, the geometry of the development pool's images.
    pad_square: bool = False
    corner_fraction: float = 0.05  # side of the corner patches used to judge the background
    max_pixels: int = 100_000_000  # refuse larger images from the header, before decoding
    crop: bool = False  # crop to the breast's bounding box (largest bright region) first
    orient: str = "none"  # "left": mirror images so the breast touches the left edge
    intensity: str = "percentile"  # one of INTENSITY_MODES
    percentiles: tuple[float, float] = (1.0, 99.0)  # "percentile": the breast's levels -> 0, 1
    mask_background: bool = True  # zero everything outside the breast (burned-in labels, markers)
    # Let decoders stop early on large images (JPEG 2000 resolution levels, libjpeg's scaling):
    # several times faster, but their filters are not an area average, and the shipped
    # model's scores move with the filter (models/EXPERIMENTS.md), so it is off by default.
    decoder_scaling: bool = False
    version: int = PREPROCESS_VERSION

    def __post_init__(self) -> None:
        # JSON and asdict() give lists; a tuple keeps the settings hashable and comparable.
        object.__setattr__(self, "percentiles", tuple(float(v) for v in self.percentiles))
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
        if self.intensity not in INTENSITY_MODES:
            raise ValueError(f"intensity must be one of {', '.join(INTENSITY_MODES)}, "
                             f"got {self.intensity!r}")
        lo, hi = self.percentiles
        if not 0.0 <= lo < hi <= 100.0:
            raise ValueError(f"percentiles must satisfy 0 <= low < high <= 100, got {lo}, {hi}")

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
    reduction: Reduction | LongSide | None = None,
) -> np.ndarray:
    """Decode DICOM/JPEG/PNG/PGM/TIFF bytes to one grey channel.

    DICOM (recognised by content, whatever the file's name) becomes the displayed picture as
    float32 in [0, 1] (see worker.imaging.dicom; `dicom` is the operator's policy, default MG only);
    the other formats become 8- or 16-bit, EXIF-oriented. The header is read first so that a
    huge or bomb-like image is refused before any pixel buffer is allocated.

    `reduction`: where a large image is brought before anything else (worker.imaging.reduction);
    decoders that can stop early (JPEG 2000 resolution levels, libjpeg's scaling) do so.
    """
    if not data:
        raise ImageError("empty file")
    # pydicom loads when a DICOM file first arrives, not with every import of this module.
    from worker.imaging import dicom as dicom_format

    # DICOM first: a DICOM preamble may itself hold a TIFF header (dual-format files).
    if dicom_format.is_dicom(data):
        return dicom_format.decode_dicom(data, max_pixels, dicom, reduction).pixels
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
    target = reduction.target(header.height, header.width) if reduction else None
    # ANYDEPTH keeps 16-bit samples; not passing IMREAD_UNCHANGED keeps EXIF orientation applied.
    flags = cv2.IMREAD_ANYDEPTH | cv2.IMREAD_ANYCOLOR
    if target is not None and header.format == "JPEG":
        scale = reduction.decoder_scale(header.height, header.width)  # type: ignore[union-attr]
        if scale > 1:  # libjpeg scales while decoding
            flags = JPEG_REDUCED[scale]
    img = cv2.imdecode(buf, flags)
    if img is None or img.size == 0:
        raise ImageError(f"cannot decode {header.format} data (corrupt or truncated)")
    if img.ndim == 3:
        code = cv2.COLOR_BGRA2GRAY if img.shape[2] == 4 else cv2.COLOR_BGR2GRAY
        img = cv2.cvtColor(img, code)
    if img.dtype not in (np.uint8, np.uint16):
        img = _to_uint16(img)
    if target is None:
        return img
    rows, cols = img.shape[:2]  # after EXIF orientation: the target follows the picture
    if (rows > cols) != (header.height > header.width):
        target = target[::-1]
    return reduce_to(img, target)


def _to_uint16(img: np.ndarray) -> np.ndarray:
    """Float or 32-bit TIFFs: stretch to the 16-bit range (their absolute scale is unknown)."""
    img = img.astype(np.float64)
    lo, hi = float(np.nanmin(img)), float(np.nanmax(img))
    if not np.isfinite(lo) or not np.isfinite(hi):
        raise ImageError("image contains non-finite values")
    span = hi - lo if hi > lo else 1.0
    return np.round((img - lo) / span * 65535.0).astype(np.uint16)


def to_unit_float(img: np.ndarray) -> np.ndarray:
    """Grey image (any dtype) -> float32 in [0, 1] by its own darkest and brightest pixel.

    Not by the dtype's range: a 12-bit image stored in 16 bits (the usual DICOM-to-PNG output)
    would otherwise come out 16 times too dark. The image's own range makes 8-bit, 12-bit and
    16-bit copies of one picture the same array (up to rounding)."""
    x = img.astype(np.float32)
    lo, hi = float(x.min()), float(x.max())
    if not (np.isfinite(lo) and np.isfinite(hi)):
        raise ImageError("image contains non-finite values")
    if hi <= lo:  # a flat image: nothing to see, but not an error of the file
        return np.zeros_like(x)
    return (x - np.float32(lo)) / np.float32(hi - lo)


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


def _largest_bright_region(img: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """(label image, stats row) of the largest bright connected region of a unit-float image
    with a dark background, or None when there is no bright region.

    The triangle threshold on a smoothed copy separates tissue from background: it sits just
    above the background's peak, so dark fatty tissue stays in (Otsu's threshold, between
    the fat and the dense tissue on high-contrast units, cut the fat off). The largest
    connected component is the breast (burned-in labels and markers are small)."""
    small = cv2.GaussianBlur((img * 255).astype(np.uint8), (5, 5), 0)
    _, mask = cv2.threshold(small, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_TRIANGLE)
    n, labels, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
    if n <= 1:
        return None
    k = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
    return labels == k, stats[k]


def breast_mask(img: np.ndarray) -> np.ndarray:
    """Boolean mask of the breast (the largest bright region); all True when none is found,
    so that an unusual image is normalised as a whole rather than not at all."""
    found = _largest_bright_region(img)
    if found is None or found[1][cv2.CC_STAT_AREA] < 0.02 * img.size:
        return np.ones(img.shape[:2], dtype=bool)
    # Holes (dark fat inside the outline) belong to the breast: fill them.
    mask = found[0].astype(np.uint8)
    contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    cv2.drawContours(mask, contours, -1, 1, thickness=cv2.FILLED)
    return mask.astype(bool)


def breast_bbox(img: np.ndarray, margin: float = 0.02) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) of the largest bright region, with a small margin."""
    h, w = img.shape[:2]
    found = _largest_bright_region(img)
    if found is None:
        return 0, h, 0, w
    x, y, bw, bh = (int(v) for v in found[1][:4])
    if bw * bh < 0.05 * h * w:  # nothing breast-sized found: keep the whole image
        return 0, h, 0, w
    m = int(round(margin * max(h, w)))
    return max(0, y - m), min(h, y + bh + m), max(0, x - m), min(w, x + bw + m)


def normalise_intensity(x: np.ndarray, settings: PreprocessSettings) -> np.ndarray:
    """The breast's grey levels, made independent of how the picture was acquired and stored
    (``settings.intensity``; see INTENSITY_MODES). ``x``: unit float, dark background."""
    if settings.intensity == "range" and not settings.mask_background:
        return x
    mask = breast_mask(x)
    tissue = x[mask]
    if settings.intensity == "percentile":
        lo, hi = (float(v) for v in np.percentile(tissue, settings.percentiles))
        if hi - lo > 1.0 / 255:  # flat tissue has no levels to spread: leave it as it is
            x = (x - np.float32(lo)) / np.float32(hi - lo)
    elif settings.intensity == "equalise":
        # Mid-rank of each level among the breast's pixels, so tied levels (8-bit sources)
        # map to one value whatever their count.
        levels = np.sort(tissue)
        rank = (np.searchsorted(levels, x, "left") + np.searchsorted(levels, x, "right")) * 0.5
        x = (rank / len(levels)).astype(np.float32)
    if settings.mask_background:
        x = np.where(mask, x, np.float32(0.0))
    return x


def reduction_for(settings: PreprocessSettings) -> Reduction | None:
    """How decoding may bring a large image down for these settings: to the model's geometry,
    or not at all when the image is cropped first (the crop would then be upsampled)."""
    if settings.crop:
        return None
    return Reduction(settings.size, settings.pad_square, settings.decoder_scaling)


def preprocess_array(img: np.ndarray, settings: PreprocessSettings) -> np.ndarray:
    """A decoded grey image (any dtype) -> float32 array of shape (size, size, 1) in [0, 1]."""
    return preprocess_with_geometry(img, settings)[0]


def preprocess_with_geometry(
    img: np.ndarray, settings: PreprocessSettings
) -> tuple[np.ndarray, bool, tuple[int, int, int, int] | None]:
    """:func:`preprocess_array`'s result and the geometry it gave the picture: whether
    ``orient`` mirrored it, and the crop box (top, bottom, left, right) in the mirrored
    picture (None without ``crop``). One pass, so that the map's geometry
    (worker.imaging.heatmap_geometry) is the one the model's input was made with."""
    x = to_unit_float(img)
    if settings.polarity == "auto":
        x = normalise_polarity(x, settings.corner_fraction)
    mirrored = settings.orient == "left" and breast_on_right(x)
    if mirrored:
        x = np.ascontiguousarray(x[:, ::-1])
    box = None
    if settings.crop:
        box = breast_bbox(x)
        top, bottom, left, right = box
        x = x[top:bottom, left:right]
    if settings.pad_square:
        x = pad_to_square(x)
    if x.shape[0] != settings.size or x.shape[1] != settings.size:
        shrinking = x.shape[0] > settings.size
        interp = cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR
        x = cv2.resize(x, (settings.size, settings.size), interpolation=interp)
    # At model size: the mask and the levels cost little there, and resizing is linear, so
    # normalising after it gives the same invariances as before it.
    x = normalise_intensity(x, settings)
    return np.clip(x, 0.0, 1.0)[:, :, np.newaxis].astype(np.float32, copy=False), mirrored, box


def decode_for(
    source: bytes | Path, settings: PreprocessSettings, dicom: DicomPolicy | None = None
) -> np.ndarray:
    """The decoded picture as :func:`preprocess_array` takes it (a large one already brought
    down, see worker.imaging.reduction), from a file's bytes or from the file itself
    (:func:`decode_source`)."""
    return decode_source(source, settings.max_pixels, dicom, reduction_for(settings))


def decode_source(
    source: bytes | Path,
    max_pixels: int,
    dicom: DicomPolicy | None = None,
    reduction: Reduction | LongSide | None = None,
) -> np.ndarray:
    """:func:`decode_image` of a file's bytes or of the file itself: a DICOM file is parsed
    from the file, so that a full-size image is in memory once (its Pixel Data), not twice;
    another file is read whole (raises OSError when it cannot be)."""
    from worker.imaging import dicom as dicom_format

    if isinstance(source, Path):
        if dicom_format.is_dicom_file(source):
            return dicom_format.decode_dicom(source, max_pixels, dicom, reduction).pixels
        source = source.read_bytes()
    return decode_image(source, max_pixels, dicom, reduction)


def preprocess_bytes(
    data: bytes, settings: PreprocessSettings, dicom: DicomPolicy | None = None
) -> np.ndarray:
    """Decode, fix polarity, orient, resize and normalise intensity: the function trainer and
    worker share. `dicom`: the operator's DICOM policy (default: MG only)."""
    return preprocess_array(decode_for(data, settings, dicom), settings)


def preprocess_file(
    path: str | Path, settings: PreprocessSettings, dicom: DicomPolicy | None = None
) -> np.ndarray:
    """:func:`preprocess_bytes` of a file (see :func:`decode_for`)."""
    return preprocess_array(decode_for(Path(path), settings, dicom), settings)
