"""The shared preprocessing path: decoding, orientation, polarity, bit depth, sizes."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from tests.conftest import DATA, write_mammo_like
from worker.imaging.errors import ImageError
from worker.imaging.image_header import read_header
from worker.imaging.preprocess import (
    PreprocessSettings,
    background_is_bright,
    breast_mask,
    decode_image,
    preprocess_bytes,
    preprocess_file,
)


def _png_bytes(arr: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".png", arr)
    assert ok
    return buf.tobytes()


def test_output_shape_dtype_and_range(tmp_path: Path) -> None:
    p = write_mammo_like(tmp_path / "a.png", size=(120, 90))
    x = preprocess_file(p, PreprocessSettings(size=64))
    assert x.shape == (64, 64, 1)
    assert x.dtype == np.float32
    assert x.min() >= 0.0 and x.max() <= 1.0


@pytest.mark.parametrize("size", [32, 256, 640])
def test_resizes_to_model_size(tmp_path: Path, size: int) -> None:
    p = write_mammo_like(tmp_path / "a.png", size=(300, 200))
    assert preprocess_file(p, PreprocessSettings(size=size)).shape == (size, size, 1)


def _bright_portrait() -> np.ndarray:
    arr = np.zeros((100, 50), np.uint8)
    arr[:, :] = 200
    arr[:5, :5] = 0  # dark corners so the polarity rule leaves it alone
    arr[:5, -5:] = 0
    arr[-5:, :5] = 0
    arr[-5:, -5:] = 0
    return arr


def test_non_square_is_stretched_by_default() -> None:
    # v3: the development pool's squares were stretched from portrait originals, so a
    # 100x50 white rectangle fills (nearly) all of the 100x100 input.
    x = preprocess_bytes(_png_bytes(_bright_portrait()), PreprocessSettings(size=100))
    assert float((x > 0.5).mean()) > 0.9


def test_non_square_is_padded_when_asked() -> None:
    # A 100x50 white rectangle padded to 100x100 keeps half its area white.
    s = PreprocessSettings(size=100, pad_square=True)
    x = preprocess_bytes(_png_bytes(_bright_portrait()), s)
    bright = float((x > 0.5).mean())
    assert 0.45 < bright < 0.52


def test_16bit_png_keeps_depth(tmp_path: Path) -> None:
    # Values that differ only below 8 bits must stay different after decoding.
    arr = np.zeros((64, 64), np.uint16)
    arr[20:40, 0:40] = 40000
    arr[20:40, 40:64] = 40100
    data = _png_bytes(arr)
    img = decode_image(data)
    assert img.dtype == np.uint16
    assert img.max() == 40100
    x = preprocess_bytes(data, PreprocessSettings(size=64, polarity="none", intensity="range",
                                                  mask_background=False))
    # By the image's own range (0..40100), not the dtype's.
    assert x[30, 10, 0] == pytest.approx(40000 / 40100, abs=1e-4)
    assert x[30, 50, 0] > x[30, 10, 0]


def test_16bit_and_8bit_of_same_image_agree(tmp_path: Path) -> None:
    p8 = write_mammo_like(tmp_path / "a8.png", dtype=np.uint8)
    p16 = write_mammo_like(tmp_path / "a16.png", dtype=np.uint16)
    s = PreprocessSettings(size=48)
    assert np.abs(preprocess_file(p8, s) - preprocess_file(p16, s)).max() < 0.01


def test_white_background_is_inverted(tmp_path: Path) -> None:
    dark = write_mammo_like(tmp_path / "dark.png", size=(96, 96), white_background=False)
    white = write_mammo_like(tmp_path / "white.png", size=(96, 96), white_background=True)
    s = PreprocessSettings(size=64)
    a, b = preprocess_file(dark, s), preprocess_file(white, s)
    assert a[0, -1, 0] < 0.1 and b[0, -1, 0] < 0.1  # a background corner is dark in both
    assert np.abs(a - b).mean() < 0.02
    raw = preprocess_file(white, PreprocessSettings(size=64, polarity="none", intensity="range",
                                                    mask_background=False))
    assert raw[0, -1, 0] > 0.9  # polarity="none" leaves it bright


def test_polarity_rule_agrees_with_dev_pool_flag() -> None:
    """On real dev-pool images the rule matches the README's bright_background column."""
    if not DATA.is_dir():
        pytest.skip("dev pool not available")
    with (DATA / "labels.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    bright = [r for r in rows if r["bright_background"] == "1"][:40]
    dark = [r for r in rows if r["bright_background"] == "0"][:40]
    agree = 0
    for r in bright + dark:
        img = decode_image((DATA / r["filename"]).read_bytes())
        x = img.astype(np.float32) / 255.0
        agree += background_is_bright(x) == (r["bright_background"] == "1")
    assert agree / 80 >= 0.95


def _exif_jpeg(arr: np.ndarray, orientation: int) -> bytes:
    im = Image.fromarray(arr)
    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    im.save(buf, format="JPEG", exif=exif.tobytes(), quality=95)
    return buf.getvalue()


def test_exif_orientation_is_applied() -> None:
    # A tall image stored sideways with orientation 6 (rotate 90 CW to display) decodes upright.
    upright = np.zeros((80, 40), np.uint8)
    upright[:20, :] = 255  # bright band at the top
    stored = np.ascontiguousarray(np.rot90(upright, k=1))  # rotated 90 CCW, shape (40, 80)
    img = decode_image(_exif_jpeg(stored, 6))
    assert img.shape == (80, 40)
    assert img[:20].mean() > 200 and img[40:].mean() < 50


def test_exif_orientation_normal_is_untouched() -> None:
    arr = np.zeros((40, 80), np.uint8)
    arr[:, :20] = 255
    img = decode_image(_exif_jpeg(arr, 1))
    assert img.shape == (40, 80)


@pytest.mark.parametrize("ext", [".pgm", ".tif", ".png", ".jpg"])
def test_formats_decode(tmp_path: Path, ext: str) -> None:
    p = write_mammo_like(tmp_path / f"a{ext}")
    header = read_header(p.read_bytes())
    assert header is not None and (header.width, header.height) == (80, 96)
    assert preprocess_file(p, PreprocessSettings(size=32)).shape == (32, 32, 1)


def test_16bit_tiff_and_pgm(tmp_path: Path) -> None:
    for ext in (".tif", ".pgm"):
        p = write_mammo_like(tmp_path / f"b{ext}", dtype=np.uint16)
        assert decode_image(p.read_bytes()).dtype == np.uint16


def test_colour_and_palette_become_grey(tmp_path: Path) -> None:
    rgb = Image.fromarray(np.full((30, 30, 3), (200, 10, 10), np.uint8))
    for mode in ("RGB", "P", "CMYK"):
        buf = io.BytesIO()
        fmt = "JPEG" if mode == "CMYK" else "PNG"
        rgb.convert(mode).save(buf, format=fmt)
        img = decode_image(buf.getvalue())
        assert img.ndim == 2 and img.shape == (30, 30)


@pytest.mark.parametrize(
    "data, reason",
    [
        (b"", "empty file"),
        (b"hello, this is a text file\n", "not a supported image"),
        (b"\x89PNG\r\n\x1a\n" + b"\x00" * 8, "not a supported image"),
    ],
)
def test_bad_input_raises_image_error(data: bytes, reason: str) -> None:
    with pytest.raises(ImageError, match=reason):
        decode_image(data)


@pytest.mark.parametrize("ext", [".png", ".jpg"])
@pytest.mark.parametrize("keep", [0.3, 0.9])
def test_truncated_files_are_refused(tmp_path: Path, ext: str, keep: float) -> None:
    # libjpeg fills a truncated JPEG with grey and returns it; we must refuse it instead.
    data = write_mammo_like(tmp_path / f"t{ext}", size=(200, 200)).read_bytes()
    with pytest.raises(ImageError, match="truncated|corrupt"):
        decode_image(data[: int(len(data) * keep)])


def test_huge_dimensions_refused_from_header() -> None:
    # A PNG header claiming 30000 x 30000 pixels with no pixel data behind it.
    import struct
    import zlib

    ihdr = struct.pack(">IIBBBBB", 30000, 30000, 8, 0, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    data = (
        b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + chunk + struct.pack(">I", zlib.crc32(chunk))
    )
    with pytest.raises(ImageError, match="too large"):
        decode_image(data, max_pixels=100_000_000)


def test_settings_round_trip_and_validation() -> None:
    s = PreprocessSettings(size=256)
    assert PreprocessSettings.from_json(s.to_json()) == s
    with pytest.raises(ValueError):
        PreprocessSettings(size=8)
    with pytest.raises(ValueError):
        PreprocessSettings(polarity="maybe")
    with pytest.raises(ValueError, match="unknown"):
        PreprocessSettings.from_json('{"size": 64, "colour": true}')


def test_orient_left_mirrors_right_sided_breasts(tmp_path: Path) -> None:
    p = write_mammo_like(tmp_path / "a.png", size=(96, 96))  # breast touches the left edge
    mirrored = cv2.flip(cv2.imread(str(p), cv2.IMREAD_UNCHANGED), 1)
    s = PreprocessSettings(size=64, orient="left")
    a = preprocess_bytes(p.read_bytes(), s)
    b = preprocess_bytes(_png_bytes(mirrored), s)
    assert np.abs(a - b).max() < 1e-6
    assert a[:, :32].sum() > a[:, 32:].sum()


def test_crop_keeps_the_breast_and_drops_background(tmp_path: Path) -> None:
    arr = np.zeros((400, 400), np.uint8)
    arr[100:300, 0:150] = 180  # the breast
    arr[380:390, 380:395] = 255  # a small burned-in marker
    full = preprocess_bytes(_png_bytes(arr), PreprocessSettings(size=100))
    cropped = preprocess_bytes(_png_bytes(arr), PreprocessSettings(size=100, crop=True))
    assert (cropped > 0.5).mean() > 2 * (full > 0.5).mean()
    assert cropped[95:, 95:].max() < 0.5  # the marker is outside the crop


def test_old_settings_json_gets_new_defaults() -> None:
    old = (
        '{"corner_fraction": 0.05, "max_pixels": 100, "pad_square": true, '
        '"polarity": "auto", "size": 64, "version": 1}'
    )
    s = PreprocessSettings.from_json(old)
    assert s.crop is False and s.orient == "none"


# --- v2 intensity step: acquisition-invariant grey levels -----------------------------------


def _dev_image() -> np.ndarray:
    if not DATA.is_dir():
        pytest.skip("dev pool not available")
    with (DATA / "labels.csv").open() as fh:
        first = next(csv.DictReader(fh))
    return decode_image((DATA / first["filename"]).read_bytes())


@pytest.mark.parametrize("mode", ["range", "percentile", "equalise"])
def test_bit_depth_does_not_change_the_pixels(mode: str) -> None:
    """8-bit, 12-bit-in-16-bit (the usual DICOM-to-PNG output) and full 16-bit copies of one
    picture preprocess to the same array: the scale comes from the image, not its dtype."""
    img8 = _dev_image()
    s = PreprocessSettings(size=128, intensity=mode)
    ref = preprocess_bytes(_png_bytes(img8), s)
    for scaled in (img8.astype(np.uint16) * 16, img8.astype(np.uint16) * 257):
        assert np.abs(preprocess_bytes(_png_bytes(scaled), s) - ref).max() < 1e-3


def test_percentile_cancels_gain_and_offset() -> None:
    img = _dev_image().astype(np.float64)
    # Another detector: lower gain, a pedestal, stored in 12 bits.
    other = np.round(img * 7.3 + 500).astype(np.uint16)
    s = PreprocessSettings(size=128, intensity="percentile")
    a = preprocess_bytes(_png_bytes(img.astype(np.uint8)), s)
    b = preprocess_bytes(_png_bytes(other), s)
    assert np.abs(a - b).max() < 1e-3
    # "range" alone does not: the pedestal lifts the background into the image's range.
    r = PreprocessSettings(size=128, intensity="range", mask_background=False)
    with_pedestal = other.copy()
    with_pedestal[:5, :5] = 0  # a dead corner: the image's range now starts below the pedestal
    diff = preprocess_bytes(_png_bytes(with_pedestal), r) - preprocess_bytes(_png_bytes(other), r)
    assert np.abs(diff).max() > 0.05


def test_equalise_cancels_a_monotone_contrast_curve() -> None:
    img = _dev_image().astype(np.float64) / 255.0
    curved = np.round(65535 * img**2.2).astype(np.uint16)  # a vendor's gamma-like LUT
    s = PreprocessSettings(size=128, intensity="equalise")
    a = preprocess_bytes(_png_bytes(np.round(img * 65535).astype(np.uint16)), s)
    b = preprocess_bytes(_png_bytes(curved), s)
    assert np.abs(a - b).mean() < 0.01
    # "percentile" is only affine-invariant: the curve shows through.
    p = PreprocessSettings(size=128, intensity="percentile")
    pa = preprocess_bytes(_png_bytes(np.round(img * 65535).astype(np.uint16)), p)
    assert np.abs(pa - preprocess_bytes(_png_bytes(curved), p)).mean() > 0.03


def test_mask_background_removes_burned_in_labels() -> None:
    arr = np.zeros((200, 200), np.uint8)
    yy, xx = np.mgrid[0:200, 0:200]
    arr[((yy - 100) / 80.0) ** 2 + (xx / 90.0) ** 2 < 1] = 150  # breast against the left edge
    arr[10:20, 160:190] = 255  # "R CC" label
    masked = preprocess_bytes(_png_bytes(arr), PreprocessSettings(size=100))
    kept = preprocess_bytes(_png_bytes(arr), PreprocessSettings(size=100, mask_background=False))
    assert masked[5:10, 80:95].max() == 0.0
    assert kept[5:10, 80:95].max() > 0.5
    assert masked[50, 10, 0] > 0  # the breast itself stays


def test_breast_mask_keeps_dark_fatty_tissue() -> None:
    """High-contrast units show fat barely above the background: the mask must keep it (a
    threshold between fat and dense tissue would cut the breast down to its dense core)."""
    img = np.zeros((200, 200), np.float32)
    yy, xx = np.mgrid[0:200, 0:200]
    breast = ((yy - 100) / 90.0) ** 2 + (xx / 100.0) ** 2 < 1
    img[breast] = 0.12  # fat
    img[((yy - 100) / 30.0) ** 2 + ((xx - 30) / 30.0) ** 2 < 1] = 0.9  # dense core
    img += np.random.default_rng(0).normal(0, 0.01, img.shape).astype(np.float32)
    mask = breast_mask(np.clip(img, 0, 1))
    assert (mask & breast).sum() / breast.sum() > 0.95
    assert (mask & ~breast).sum() / (~breast).sum() < 0.02


def test_unknown_intensity_mode_is_refused() -> None:
    with pytest.raises(ValueError, match="intensity"):
        PreprocessSettings(intensity="clahe")
    with pytest.raises(ValueError, match="percentiles"):
        PreprocessSettings(percentiles=(50.0, 10.0))


def test_settings_round_trip_through_json() -> None:
    s = PreprocessSettings(size=96, intensity="equalise", percentiles=(2.0, 98.0))
    assert PreprocessSettings.from_json(s.to_json()) == s
