"""The fine-tuning recipe: EfficientNet-Lite0 from its ImageNet weights, every layer trained.

Frozen ImageNet features reach ~0.66 in-pool and fall to chance on a new site; a model that
is to find lesions has to learn them. On two CPU cores this is affordable only with a lean
input path (measured: 9-11 img/s at 256 px when the data is cached, 3 img/s when every batch
is decoded and converted on the host):

* every image is preprocessed once, by the worker's own function, and cached as uint8;
* batches are uint8 slices of that cache, and the cast to float, the geometric augmentation
  and the intensity augmentation (gamma, contrast, noise) all run inside the graph.

The intensity augmentation stands in for machines the pool does not have: after the v2
intensity step removes affine (or monotone) differences, what is left between units is the
curve's shape and noise, which is what it varies.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import keras
import numpy as np
from keras import layers, ops

from trainer.dataset import Sample
from trainer.model import build_augmentation, build_model
from worker.model_metadata import INPUT_NAME
from worker.preprocess import PreprocessSettings


@dataclass(frozen=True)
class FinetuneConfig:
    arch: str = "lite0"  # or "cnn" (from scratch, the control of the same cost)
    size: int = 256
    epochs: int = 4
    batch_size: int = 16
    lr: float = 3e-4
    weight_decay: float = 1e-4
    label_smoothing: float = 0.0
    intensity_augment: bool = True
    tta: bool = True  # score = mean of the image and its mirror image
    mixed_bfloat16: bool = False  # ~15% faster on CPUs with AVX-512 BF16

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


# --- the cache -----------------------------------------------------------------------------


def cached_arrays(samples: Sequence[Sample], settings: PreprocessSettings, cache_dir: Path,
                  threads: int = 2, verbose: int = 2) -> tuple[np.ndarray, list[Sample]]:
    """uint8 (N, size, size, 1) of the samples that preprocess, and those samples; computed
    once per (image list, preprocessing) and kept in ``cache_dir``.

    uint8 is 4x smaller than float32 (2,855 images at 512 px: 0.75 GB) and exact enough: the
    preprocessed pixels are display levels in [0, 1]."""
    from trainer.train import preprocess_samples  # Keras progress bar; keeps imports one-way

    key = hashlib.sha256(
        (settings.to_json() + "\n" + "\n".join(str(s.path) for s in samples)).encode()
    ).hexdigest()[:16]
    path = Path(cache_dir) / f"arrays-{settings.size}-{key}.npz"
    if path.is_file():
        data = np.load(path)
        kept = set(data["paths"].tolist())
        return data["x"], [s for s in samples if str(s.path) in kept]
    x, kept, failed = preprocess_samples(samples, settings, threads, verbose)
    for s, reason in failed:
        print(f"skipped {s.path}: {reason}", flush=True)
    x8 = np.round(np.asarray(x, np.float32) * 255.0).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, x=x8, paths=np.array([str(s.path) for s in kept]))
    return x8, kept


class Uint8Batches(keras.utils.PyDataset):
    """Shuffled uint8 batches with per-image weights: the host only slices memory."""

    def __init__(self, x: np.ndarray, y: np.ndarray, batch_size: int,
                 weights: np.ndarray | None = None, seed: int = 0) -> None:
        super().__init__()
        self.x, self.y = x, y.astype(np.float32)
        self.w = (np.ones(len(y), np.float32) if weights is None
                  else np.asarray(weights, np.float32))
        self.batch_size = batch_size
        self.rng = np.random.default_rng(seed)
        self.order = self.rng.permutation(len(x))

    def __len__(self) -> int:
        return len(self.x) // self.batch_size  # whole batches: one graph shape, no retracing

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        idx = np.sort(self.order[i * self.batch_size:(i + 1) * self.batch_size])
        return self.x[idx], self.y[idx], self.w[idx]

    def on_epoch_end(self) -> None:
        self.order = self.rng.permutation(len(self.x))


# --- augmentation in the graph -------------------------------------------------------------


class RandomIntensity(layers.Layer):
    """Training-only changes of the grey curve: gamma in [1/g, g], contrast about the image
    mean by up to ``contrast``, and Gaussian noise of up to ``noise`` (in [0, 1] units).
    Background (exact zeros after the v2 mask) stays zero. Identity at inference."""

    def __init__(self, gamma: float = 1.5, contrast: float = 0.25, noise: float = 0.03,
                 seed: int | None = None, **kwargs: object) -> None:
        super().__init__(**kwargs)
        self.gamma, self.contrast, self.noise = gamma, contrast, noise
        self.seed_gen = keras.random.SeedGenerator(seed)

    def call(self, x: keras.KerasTensor, training: bool | None = None) -> keras.KerasTensor:
        if not training:
            return x
        n = ops.shape(x)[0]
        shape = (n, 1, 1, 1)
        log_g = keras.random.uniform(shape, -np.log(self.gamma), np.log(self.gamma),
                                     seed=self.seed_gen)
        tissue = ops.cast(x > 0, x.dtype)
        y = ops.power(ops.maximum(x, 1e-6), ops.exp(log_g))
        c = keras.random.uniform(shape, 1 - self.contrast, 1 + self.contrast,
                                 seed=self.seed_gen)
        mean = ops.sum(y * tissue, axis=(1, 2, 3), keepdims=True) / (
            ops.sum(tissue, axis=(1, 2, 3), keepdims=True) + 1.0)
        y = (y - mean) * c + mean
        sigma = keras.random.uniform(shape, 0.0, self.noise, seed=self.seed_gen)
        y = y + sigma * keras.random.normal(ops.shape(x), seed=self.seed_gen)
        return ops.clip(y, 0.0, 1.0) * tissue

    def get_config(self) -> dict[str, object]:
        return {**super().get_config(), "gamma": self.gamma, "contrast": self.contrast,
                "noise": self.noise}


def training_wrapper(model: keras.Model, cfg: FinetuneConfig, seed: int) -> keras.Model:
    """uint8 batch -> [0, 1] -> augmentation -> ``model``: shares ``model``'s weights, so
    training the wrapper trains the model, and the model alone is saved and exported."""
    inputs = keras.Input(shape=(cfg.size, cfg.size, 1), dtype="uint8", name=INPUT_NAME)
    x = layers.Rescaling(1.0 / 255.0, name="to_unit")(ops.cast(inputs, "float32"))
    x = build_augmentation(seed)(x)
    if cfg.intensity_augment:
        # float32 even under mixed_bfloat16: gamma and noise need the precision.
        x = RandomIntensity(seed=seed, name="intensity", dtype="float32")(x)
    return keras.Model(inputs, model(x), name=f"{model.name}_train")


# --- fit and score -------------------------------------------------------------------------


def fit(cfg: FinetuneConfig, x: np.ndarray, y: np.ndarray, seed: int,
        sample_weight: np.ndarray | None = None, verbose: int | str = 2) -> keras.Model:
    """A fresh model trained for ``cfg.epochs`` on uint8 ``x``: AdamW, cosine decay with a
    short warm-up, balanced class weights (times ``sample_weight`` when given)."""
    keras.utils.set_random_seed(seed)
    if cfg.mixed_bfloat16:
        keras.mixed_precision.set_global_policy("mixed_bfloat16")
    model = build_model(cfg.arch, cfg.size, "pretrained")
    wrapper = training_wrapper(model, cfg, seed)
    counts = np.bincount(y.astype(int), minlength=2).astype(np.float64)
    w = np.where(y == 1, len(y) / (2 * counts[1]), len(y) / (2 * counts[0]))
    if sample_weight is not None:
        w = w * sample_weight / np.mean(sample_weight)
    data = Uint8Batches(x, y, cfg.batch_size, w, seed)
    steps = cfg.epochs * len(data)
    schedule = keras.optimizers.schedules.CosineDecay(
        0.0, decay_steps=steps - steps // 10, warmup_target=cfg.lr,
        warmup_steps=steps // 10, alpha=0.01)
    wrapper.compile(optimizer=keras.optimizers.AdamW(schedule, weight_decay=cfg.weight_decay),
                    loss=keras.losses.BinaryCrossentropy(label_smoothing=cfg.label_smoothing))
    started = time.time()
    wrapper.fit(data, epochs=cfg.epochs, verbose=verbose)
    rate = len(data) * cfg.batch_size * cfg.epochs / (time.time() - started)
    print(f"trained {cfg.arch} {cfg.size}px: {rate:.1f} img/s", flush=True)
    if cfg.mixed_bfloat16:
        keras.mixed_precision.set_global_policy("float32")
    return model


def predict(model: keras.Model, x: np.ndarray, tta: bool, batch_size: int = 32) -> np.ndarray:
    """Scores of uint8 ``x`` (mean with the mirror image's when ``tta``)."""
    out = np.zeros(len(x), np.float64)
    for i in range(0, len(x), batch_size):
        xb = np.asarray(x[i:i + batch_size], np.float32) / 255.0
        s = np.asarray(model.predict_on_batch(xb), np.float64).reshape(-1)
        if tta:
            s = 0.5 * (s + np.asarray(model.predict_on_batch(
                np.ascontiguousarray(xb[:, :, ::-1])), np.float64).reshape(-1))
        out[i:i + len(xb)] = s
    return out


def finetune_fit_score(cfg: FinetuneConfig, x: np.ndarray, y: np.ndarray,
                       log: Path | None = None):  # -> trainer.panel.FitScore
    """The recipe as a panel ``fit_score``; each fit's test scores appended to ``log``."""

    def fit_score(tr: np.ndarray, te: np.ndarray, seed: int) -> np.ndarray:
        model = fit(cfg, x[tr], y[tr], seed)
        scores = predict(model, x[te], cfg.tta)
        if log is not None:
            with log.open("a") as fh:
                fh.write(json.dumps({"seed": seed, "test": te.tolist(),
                                     "scores": scores.round(6).tolist()}) + "\n")
        keras.backend.clear_session()
        return scores

    return fit_score
