"""Mammograms as a site sends them (issue 21): full-size DICOM in every lossless syntax.

Full-size files (3328 x 4096, 12 bits in 16, MG, FOR PRESENTATION) are made from dev-pool
pictures as tests/dicom_files.py describes. The JPEG Lossless, JPEG-LS and RLE forms are
encoded with DCMTK, as a site's archive would hold them.
"""

from __future__ import annotations

import os
import statistics
from pathlib import Path

import cv2
import numpy as np
import pytest

from tests.conftest import SHIPPED_MODEL, dev_pool_images, require_programs
from tests.dicom_files import (
    FULL_SIZE_SYNTAXES,
    dicom_dataset,
    full_size_dicom,
    full_size_stored,
    to_bytes,
)
from worker.imaging import j2k
from worker.imaging.dicom import read_dicom
from worker.imaging.errors import ImageError
from worker.imaging.preprocess import PreprocessSettings, preprocess_bytes, preprocess_file
from worker.imaging.reduction import Reduction, reduce_to
from worker.processing.reading import KEEP_BYTES, load_file, preprocess_loaded
from worker.scoring.scorer import Scorer


@pytest.fixture(scope="module")
def scorer() -> Scorer:
    return Scorer(SHIPPED_MODEL)


def _grey(path: Path) -> np.ndarray:
    return cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)


def _score(scorer: Scorer, x: np.ndarray) -> float:
    return float(scorer.score_batch([x])[0])


def test_reduce_to_is_an_area_average_on_the_stored_integers() -> None:
    rng = np.random.default_rng(0)
    img = rng.integers(0, 4096, (1000, 700)).astype(np.uint16)
    exact = cv2.resize(img.astype(np.float64), (96, 128), interpolation=cv2.INTER_AREA)
    small = reduce_to(img.copy(), (128, 96))
    assert small.dtype == np.float32 and small.shape == (128, 96)
    # 12-bit values averaged in 16 bits keep 1/16 of a stored level.
    assert np.abs(small - exact).max() <= 1 / 16 + 1e-6
    eight = (img >> 4).astype(np.uint8)
    exact8 = cv2.resize(eight.astype(np.float64), (96, 128), interpolation=cv2.INTER_AREA)
    assert np.abs(reduce_to(eight, (128, 96)) - exact8).max() <= 1 / 256 + 1e-6


def test_reduction_targets_the_model_geometry() -> None:
    r = Reduction(384, pad_square=False)
    assert r.target(4096, 3328) == (384, 384)  # stretched, as the dev pool's squares were
    assert r.target(640, 640) is None  # under twice the model's side: the v2 path
    assert Reduction(384, pad_square=True).target(4096, 3328) == (384, 312)
    assert r.decoder_scale(4096, 3328) == 1  # decoders stop early only when the model says
    assert Reduction(384, False, decoder_scaling=True).decoder_scale(4096, 3328) == 4


def test_a_full_size_picture_scores_as_its_training_form(scorer: Scorer) -> None:
    """The same picture, as the 640 px JPEG the model was trained on and as a full-size
    detector file, scores within 0.03 on average and 0.08 at most (issue 21)."""
    settings = scorer.metadata.preprocess
    gaps = []
    for path in dev_pool_images(400)[::34]:  # 12 pictures across the first 400
        full = to_bytes(dicom_dataset(full_size_stored(_grey(path)), WindowCenter=2048,
                                      WindowWidth=4096))
        gaps.append(abs(_score(scorer, preprocess_bytes(full, settings))
                        - _score(scorer, preprocess_file(path, settings))))
    assert statistics.mean(gaps) <= 0.03 and max(gaps) <= 0.08, gaps


def test_the_padded_geometry_does_not_match_the_training_form(scorer: Scorer) -> None:
    """The v2 geometry (padding a portrait image to the square) puts a narrower breast in
    front of the model than any it learned from: its scores stray several times further."""
    settings = scorer.metadata.preprocess
    padded = PreprocessSettings(**{**settings.__dict__, "pad_square": True})
    gaps = {"stretched": [], "padded": []}
    for path in dev_pool_images(400)[::67]:
        full = to_bytes(dicom_dataset(full_size_stored(_grey(path)), WindowCenter=2048,
                                      WindowWidth=4096))
        ref = _score(scorer, preprocess_file(path, settings))
        gaps["stretched"].append(abs(_score(scorer, preprocess_bytes(full, settings)) - ref))
        gaps["padded"].append(abs(_score(scorer, preprocess_bytes(full, padded)) - ref))
    assert statistics.mean(gaps["padded"]) > 2 * statistics.mean(gaps["stretched"]), gaps


@pytest.fixture(scope="module")
def one_picture_every_syntax(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    require_programs("dcmtk", "dcmcrle", "dcmcjpeg", "dcmcjpls")
    folder = tmp_path_factory.mktemp("fullsize")
    grey = _grey(dev_pool_images(1)[0])
    return {s: full_size_dicom(grey, s, folder, s) for s in FULL_SIZE_SYNTAXES}


def test_every_lossless_syntax_gives_the_same_input(
    one_picture_every_syntax: dict[str, Path], scorer: Scorer
) -> None:
    settings = scorer.metadata.preprocess
    inputs = {s: preprocess_file(p, settings) for s, p in one_picture_every_syntax.items()}
    ref = inputs["uncompressed"]
    for syntax, x in inputs.items():
        assert np.array_equal(x, ref), syntax  # lossless: the same stored values, same input
    syntaxes = {read_dicom(p).file_meta.TransferSyntaxUID
                for p in one_picture_every_syntax.values()}
    assert len(syntaxes) == len(FULL_SIZE_SYNTAXES)  # really five encodings


def test_jpeg2000_decodes_at_a_resolution_level_or_in_full(
    one_picture_every_syntax: dict[str, Path], scorer: Scorer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With decoder_scaling, a JPEG 2000 file is decoded at a coarser level through the
    system's OpenJPEG; without that decoder it falls back to the full decode, which equals
    the uncompressed file's input exactly."""
    settings = PreprocessSettings(**{**scorer.metadata.preprocess.__dict__,
                                     "decoder_scaling": True})
    path = one_picture_every_syntax["jpeg2000"]
    plain = preprocess_file(one_picture_every_syntax["uncompressed"], settings)
    if not j2k.reduced_decoder_available():
        pytest.skip("glymur or the system's libopenjp2 is missing: apt-get install libopenjp2-7")
    calls = []
    real = j2k.decode_reduced
    monkeypatch.setattr(j2k, "decode_reduced", lambda *a: calls.append(a[1]) or real(*a))
    reduced = preprocess_file(path, settings)
    assert calls == [4]  # 4096 x 3328 -> 1024 x 832, twice the model's side
    # A wavelet's low band, not an area average: close, not equal (models/EXPERIMENTS.md).
    tissue = plain > 0
    assert 0 < np.abs(reduced - plain)[tissue].mean() < 0.05
    monkeypatch.setattr(j2k, "reduced_decoder_available", lambda: False)
    assert np.array_equal(preprocess_file(path, settings), plain)


def test_a_large_file_is_hashed_streaming_and_decoded_from_the_file(tmp_path: Path) -> None:
    grey = _grey(dev_pool_images(1)[0])
    path = full_size_dicom(grey, "uncompressed", tmp_path, "big")
    assert path.stat().st_size > KEEP_BYTES
    loaded = load_file(path)
    assert loaded.data is None  # type: ignore[union-attr]  # not held from hashing to decoding
    settings = PreprocessSettings(size=384)
    x, _ = preprocess_loaded(path, loaded.fingerprint, settings, None)  # type: ignore[union-attr,arg-type]
    assert np.array_equal(x, preprocess_bytes(path.read_bytes(), settings))
    # Rewritten after its receipt: its pixels are not the hashed content's; quarantined.
    os.utime(path, ns=(0, 0))
    with pytest.raises(ImageError, match="changed after it was received"):
        preprocess_loaded(path, loaded.fingerprint, settings, None)  # type: ignore[union-attr,arg-type]


def test_libjpeg_scales_a_large_jpeg_while_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    """With decoder_scaling, a large plain JPEG is decoded by libjpeg at 1/2..1/8 size and
    then area-averaged; without it, in full. Both give nearly the same input."""
    grey = cv2.resize(_grey(dev_pool_images(1)[0]), (1700, 2100), interpolation=cv2.INTER_CUBIC)
    ok, buf = cv2.imencode(".jpg", grey, [cv2.IMWRITE_JPEG_QUALITY, 95])
    assert ok
    flags_seen: list[int] = []
    real = cv2.imdecode
    monkeypatch.setattr(cv2, "imdecode", lambda b, f: flags_seen.append(f) or real(b, f))
    full = preprocess_bytes(buf.tobytes(), PreprocessSettings(size=384))
    scaled = preprocess_bytes(buf.tobytes(), PreprocessSettings(size=384, decoder_scaling=True))
    assert flags_seen[0] != cv2.IMREAD_REDUCED_GRAYSCALE_2
    assert flags_seen[1] == cv2.IMREAD_REDUCED_GRAYSCALE_2  # 1700 / 2 >= twice 384
    tissue = full > 0
    assert 0 < np.abs(full - scaled)[tissue].mean() < 0.02


def test_a_baseline_jpeg_dicom_is_scaled_by_libjpeg(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    require_programs("dcmtk", "dcmcjpeg")
    import subprocess

    grey = cv2.resize(_grey(dev_pool_images(1)[0]), (1700, 2100), interpolation=cv2.INTER_CUBIC)
    plain = tmp_path / "plain.dcm"
    plain.write_bytes(to_bytes(dicom_dataset(grey, bits_stored=8)))
    jpeg = tmp_path / "baseline.dcm"
    subprocess.run(["dcmcjpeg", "+eb", str(plain), str(jpeg)], check=True)
    assert read_dicom(jpeg).file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.4.50"
    full = preprocess_file(jpeg, PreprocessSettings(size=384))
    flags_seen: list[int] = []
    real = cv2.imdecode
    monkeypatch.setattr(cv2, "imdecode", lambda b, f: flags_seen.append(f) or real(b, f))
    scaled = preprocess_file(jpeg, PreprocessSettings(size=384, decoder_scaling=True))
    assert flags_seen == [cv2.IMREAD_REDUCED_GRAYSCALE_2]  # the frame, by libjpeg, at 1/2
    tissue = full > 0
    assert 0 < np.abs(full - scaled)[tissue].mean() < 0.02


def test_an_overlay_scores_a_full_size_file_as_the_worker_does(
    tmp_path: Path, scorer: Scorer
) -> None:
    """`screen heatmap FILE` scores the file with the worker's own preprocessing (the image
    brought down first), and draws on a picture brought down to the overlay's size."""
    from worker.audit.overlays import overlay_of_file

    path = full_size_dicom(_grey(dev_pool_images(1)[0]), "uncompressed", tmp_path, "big")
    overlay = overlay_of_file(scorer, path, max_side=512)
    assert overlay.score == _score(scorer, preprocess_file(path, scorer.metadata.preprocess))
    drawn = cv2.imdecode(np.frombuffer(overlay.png, np.uint8), cv2.IMREAD_COLOR)
    assert max(drawn.shape[:2]) == 512 and drawn.shape[0] > drawn.shape[1]  # portrait kept
