"""Preprocess once: the uint8 cache holds the worker's own preprocessing, and comes back whole."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import DATA
from trainer.dataset import Sample

pytest.importorskip("keras")
pytestmark = pytest.mark.train


def test_uint8_cache_round_trip(tmp_path: Path) -> None:
    from trainer.arrays import cache_path, cached_arrays, preprocess_samples
    from worker.imaging.preprocess import PreprocessSettings

    sources = sorted((DATA / "images").rglob("*.jpg"))[:4]
    if len(sources) < 4:
        pytest.skip(f"dev pool not found at {DATA}")
    samples = []
    for i, src in enumerate(sources):
        shutil.copyfile(src, tmp_path / f"{i}.jpg")
        samples.append(Sample(tmp_path / f"{i}.jpg", i % 2, f"p{i}", "L"))
    (tmp_path / "junk.png").write_bytes(b"not an image")
    samples.insert(2, Sample(tmp_path / "junk.png", 1, "p9", "R"))
    settings = PreprocessSettings(size=64)
    cache = tmp_path / "cache"

    x, kept = cached_arrays(samples, settings, cache, verbose=0)
    assert x.dtype == np.uint8 and x.shape == (4, 64, 64, 1)
    assert [s.path.name for s in kept] == ["0.jpg", "1.jpg", "2.jpg", "3.jpg"]
    # The cached levels are the worker's float preprocessing, rounded to 1/255.
    ref, _, failed = preprocess_samples(samples, settings, verbose=False)
    assert [s.path.name for s, _ in failed] == ["junk.png"]
    assert np.max(np.abs(x / 255.0 - ref.astype(np.float32))) <= 0.5 / 255 + 1e-3

    assert cache_path(samples, settings, cache).is_file()
    x2, kept2 = cached_arrays(samples, settings, cache, verbose=0)
    np.testing.assert_array_equal(x2, x)
    assert kept2 == kept
    # Other settings are another entry, not a stale hit.
    x3, _ = cached_arrays(samples, PreprocessSettings(size=64, intensity="range"), cache,
                          verbose=0)
    assert len(list(cache.glob("*.npz"))) == 2 and x3.shape == x.shape
    # Without a folder nothing is kept, and the arrays are the same.
    x4, _ = cached_arrays(samples, settings, None, verbose=0)
    np.testing.assert_array_equal(x4, x)
