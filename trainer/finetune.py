"""The fine-tuning recipe: EfficientNet-Lite0 from its ImageNet weights, every layer trained.

Frozen ImageNet features reach ~0.66 in-pool and fall to chance on a new site; a model that
is to find lesions has to learn them. On two CPU cores this is affordable only with a lean
input path (measured: 9-11 img/s at 256 px when the data is cached, 3 img/s when every batch
is decoded and converted on the host):

* every image is preprocessed once, by the worker's own function, and cached as uint8
  (:func:`trainer.arrays.cached_arrays`);
* batches are uint8 slices of that cache, and the cast to float, the geometric augmentation
  and the intensity augmentation (gamma, contrast, noise) all run inside the graph.

The intensity augmentation stands in for machines the pool does not have: after the v2
intensity step removes affine (or monotone) differences, what is left between units is the
curve's shape and noise, which is what it varies.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import keras
import numpy as np
from keras import layers, ops

from trainer.fitting import (
    ArrayBatches,
    balanced_sample_weights,
    compile_and_fit,
    cosine_schedule,
    predict,
)
from trainer.layers import RandomIntensity
from trainer.model import build_augmentation, build_model
from trainer.panel import FitScore, network_fit_score
from trainer.recipes import FINETUNE
from worker.scoring.model_metadata import INPUT_NAME


@dataclass(frozen=True)
class FinetuneConfig:
    arch: str = "lite0"  # or "cnn" (from scratch, the control of the same cost)
    size: int = FINETUNE.size
    epochs: int = FINETUNE.epochs
    batch_size: int = FINETUNE.batch_size
    lr: float = FINETUNE.lr
    weight_decay: float = 1e-4
    label_smoothing: float = 0.0
    intensity_augment: bool = True
    tta: bool = True  # score = mean of the image and its mirror image
    mixed_bfloat16: bool = False  # ~15% faster on CPUs with AVX-512 BF16
    machine_balanced: bool = False  # weight training images so machines carry no label signal

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


# --- augmentation in the graph -------------------------------------------------------------


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
        sample_weight: np.ndarray | None = None, verbose: int | str = 2,
        callbacks: Sequence[keras.callbacks.Callback] = ()) -> keras.Model:
    """A fresh model trained for ``cfg.epochs`` on uint8 ``x``: AdamW, cosine decay with a
    warm-up over the first 10% of steps, balanced class weights (times ``sample_weight``
    when given). Returns the bare model (float input in [0, 1]), as saved and exported."""
    keras.utils.set_random_seed(seed)
    if cfg.mixed_bfloat16:
        keras.mixed_precision.set_global_policy("mixed_bfloat16")
    model = build_model(cfg.arch, cfg.size, "pretrained")
    wrapper = training_wrapper(model, cfg, seed)
    data = ArrayBatches(x, y, cfg.batch_size, balanced_sample_weights(y, sample_weight),
                        shuffle=True, seed=seed, whole_batches=True)
    schedule = cosine_schedule(cfg.lr, cfg.epochs * len(data), warmup_fraction=0.1,
                               alpha=0.01)
    started = time.time()
    compile_and_fit(wrapper, data, cfg.epochs,
                    keras.optimizers.AdamW(schedule, weight_decay=cfg.weight_decay),
                    keras.losses.BinaryCrossentropy(label_smoothing=cfg.label_smoothing),
                    callbacks=callbacks, verbose=verbose)
    rate = len(data) * cfg.batch_size * cfg.epochs / (time.time() - started)
    print(f"trained {cfg.arch} {cfg.size}px: {rate:.1f} img/s", flush=True)
    if cfg.mixed_bfloat16:
        keras.mixed_precision.set_global_policy("float32")
    return model


def finetune_fit_score(cfg: FinetuneConfig, x: np.ndarray, y: np.ndarray,
                       log: Path | None = None,
                       machines: np.ndarray | None = None) -> FitScore:
    """The recipe as a panel ``fit_score`` (:func:`trainer.panel.network_fit_score`: each
    fit's test scores appended to ``log``; ``cfg.machine_balanced`` weights by ``machines``)."""

    def fit_and_score(tr: np.ndarray, te: np.ndarray, weight: np.ndarray | None,
                      seed: int) -> np.ndarray:
        model = fit(cfg, x[tr], y[tr], seed, sample_weight=weight)
        scores = predict(model, x[te], cfg.tta)
        keras.backend.clear_session()
        return scores

    return network_fit_score(fit_and_score, y, machines, cfg.machine_balanced, log)
