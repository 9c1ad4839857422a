"""Frozen EfficientNet-Lite0 features: pooled backbone outputs for every image, computed once.

A linear probe on frozen ImageNet features is the cheapest honest use of pretraining on two
CPU cores: the backbone runs forward once per image (and once more mirrored, for flip
augmentation and test-time flip), and every later experiment is a fit on a small matrix.

The feature model is exactly the front of the shipped probe model
(:func:`trainer.efficientnet_lite.build_efficientnet_lite0` with ``pooling``), so features
computed here and scores from the exported ONNX model agree.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

import keras
import numpy as np
from keras import layers

from trainer.arrays import preprocess_samples
from trainer.dataset import DatasetError, Sample, discover
from trainer.efficientnet_lite import grey_to_normalised_rgb, lite0_backbone
from worker.imaging.preprocess import PreprocessSettings
from worker.scoring.model_metadata import INPUT_NAME

POOLINGS = ("avg", "max", "avg+max")


def build_feature_model(size: int, weights: str | Path | None = "pretrained",
                        pooling: str = "avg+max") -> keras.Model:
    """image (size, size, 1) in [0, 1] -> pooled features of the backbone's last maps:
    ``avg`` (1280, global average), ``max`` (1280, global max) or ``avg+max`` (2560, average
    then max). Frozen, so batch norms run in inference mode with their moving statistics."""
    if pooling not in POOLINGS:
        raise ValueError(f"unknown pooling {pooling!r}: use one of {', '.join(POOLINGS)}")
    inputs = keras.Input(shape=(size, size, 1), name=INPUT_NAME)
    backbone = lite0_backbone(size, weights)
    backbone.trainable = False
    maps = backbone(grey_to_normalised_rgb(inputs))
    pools = []
    if "avg" in pooling:
        pools.append(layers.GlobalAveragePooling2D(name="gap")(maps))
    if "max" in pooling:
        pools.append(layers.GlobalMaxPooling2D(name="gmp")(maps))
    pooled = pools[0] if len(pools) == 1 else layers.Concatenate(name="pool")(pools)
    return keras.Model(inputs, pooled, name=f"lite0_features_{size}")


def build_tap_model(size: int, taps: Sequence[str],
                    weights: str | Path | None = "pretrained") -> keras.Model:
    """Like :func:`build_feature_model` with ``avg+max``, but pooling the outputs of the named
    backbone layers (e.g. ``block10_add``, the end of the 112-channel stage), concatenated in
    ``taps`` order: mid-level features for the probe, from one forward pass."""
    inputs = keras.Input(shape=(size, size, 1), name=INPUT_NAME)
    backbone = lite0_backbone(size, weights)
    tapped = keras.Model(backbone.input, [backbone.get_layer(t).output for t in taps])
    tapped.trainable = False
    maps = tapped(grey_to_normalised_rgb(inputs))
    maps = list(maps) if isinstance(maps, list | tuple) else [maps]  # one tap: one tensor
    pools = []
    for t, m in zip(taps, maps, strict=True):
        pools += [layers.GlobalAveragePooling2D(name=f"{t}_gap")(m),
                  layers.GlobalMaxPooling2D(name=f"{t}_gmp")(m)]
    return keras.Model(inputs, layers.Concatenate(name="pool")(pools), name=f"lite0_taps_{size}")


def extract(model: keras.Model, x: np.ndarray, batch_size: int = 16, flip: bool = False,
            progress: bool = True, label: str = "") -> np.ndarray:
    """Features (N, 2560) float32 for the (N, s, s, 1) array ``x`` (mirrored left-right first
    when ``flip``). Prints one progress line every ~10% when ``progress``."""
    out = np.zeros((len(x), model.output_shape[-1]), dtype=np.float32)
    started, step = time.time(), max(1, len(x) // 10)
    for i in range(0, len(x), batch_size):
        xb = np.asarray(x[i : i + batch_size], dtype=np.float32)
        if flip:
            xb = xb[:, :, ::-1, :]
        out[i : i + len(xb)] = np.asarray(model.predict_on_batch(np.ascontiguousarray(xb)))
        done = i + len(xb)
        if progress and (done // step != i // step or done == len(x)):
            rate = done / max(time.time() - started, 1e-9)
            print(f"features{label}: {done}/{len(x)} images ({rate:.1f} img/s)", flush=True)
    return out


def select(features: np.ndarray, pooling: str) -> np.ndarray:
    """The columns for ``pooling``: "avg", "max" or "avg+max" (all)."""
    half = features.shape[1] // 2
    if pooling == "avg":
        return features[:, :half]
    if pooling == "max":
        return features[:, half:]
    if pooling == "avg+max":
        return features
    raise ValueError(f"unknown pooling {pooling!r}: use avg, max or avg+max")


def load_features(path: str | Path, source: str | Path
                  ) -> tuple[list[Sample], dict[str, np.ndarray], str]:
    """Samples in the cached features' row order, their arrays ("plain", and "flipped" when
    extracted with ``--flip``), and the preprocessing JSON (what :func:`extract_features`
    writes)."""
    data = np.load(path)
    by_path = {str(s.path.resolve()): s for s in discover(source) if s.split != "test"}
    samples = [by_path[str(Path(p).resolve())] for p in data["paths"].tolist()]
    arrays = {k: data[k] for k in ("plain", "flipped") if k in data.files}
    return samples, arrays, str(data["settings"])


def load_feature_sets(paths: Sequence[str | Path], source: str | Path,
                      pooling: str | None = None
                      ) -> tuple[list[Sample], dict[str, np.ndarray], list[str]]:
    """Several cached feature files of one pool, their columns side by side (each file's
    :func:`select` ``pooling`` columns first when given), as float64; the samples and each
    file's preprocessing JSON. Raises :class:`DatasetError` when they list other images."""
    loaded = [load_features(p, source) for p in paths]
    samples = loaded[0][0]
    if any([s.path for s in other] != [s.path for s in samples] for other, _, _ in loaded):
        raise DatasetError("feature files list different images: extract them from one pool")
    kinds = set.intersection(*(set(raw) for _, raw, _ in loaded))
    feats = {k: np.hstack([raw[k] if pooling is None else select(raw[k], pooling)
                           for _, raw, _ in loaded]).astype(np.float64) for k in kinds}
    return samples, feats, [settings for _, _, settings in loaded]


def extract_features(source: str | Path, settings: PreprocessSettings, out: Path,
                     flip: bool = False, batch_size: int = 16,
                     taps: Sequence[str] | None = None) -> int:
    """Compute and cache (an .npz at ``out``) the features of a labelled pool's images, for
    ``screen panel --features``; with ``flip`` also those of the mirrored images; with
    ``taps`` the named backbone layers pooled instead of the head. Returns the image count."""
    samples = [s for s in discover(source) if s.split != "test"]
    x, samples, failed = preprocess_samples(samples, settings, threads=2, verbose=2)
    if failed:
        print(f"{len(failed)} images failed to preprocess and are left out", flush=True)
    model = (build_tap_model(settings.size, taps) if taps
             else build_feature_model(settings.size))
    arrays = {"plain": extract(model, x, batch_size, label=" plain")}
    if flip:
        arrays["flipped"] = extract(model, x, batch_size, flip=True, label=" flipped")
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(
        out,
        paths=np.array([str(s.path) for s in samples]),
        settings=np.array(settings.to_json()),
        **arrays,
    )
    return len(samples)
