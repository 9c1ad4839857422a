"""Every custom Keras layer of the trainer's recipes, and :func:`load_trained`.

A saved ``.keras`` file names its custom layers by their registered names; they are all
here, so that reading one back needs this module alone (``load_trained`` passes them to
Keras itself rather than relying on some other import having registered them).
"""

from __future__ import annotations

from pathlib import Path

import keras
import numpy as np
from keras import layers, ops


@keras.saving.register_keras_serializable(package="mammo_screen")
class AttentionPool(layers.Layer):
    """Softmax-weighted sum over map positions: (B, H, W, C) values and (B, H, W, 1) logits
    -> (B, C). The weights sum to 1 per image, so the head can attend to a single position."""

    def call(self, values: keras.KerasTensor, logits: keras.KerasTensor) -> keras.KerasTensor:
        shape = ops.shape(values)
        v = ops.reshape(values, (shape[0], -1, shape[3]))
        w = ops.softmax(ops.reshape(logits, (shape[0], -1, 1)), axis=1)
        return ops.sum(v * w, axis=1)


@keras.saving.register_keras_serializable(package="mammo_screen")
class WithMirrorImages(layers.Layer):
    """(B, H, W, C) -> (2B, H, W, C): the images, then the same images mirrored left-right."""

    def call(self, x: keras.KerasTensor) -> keras.KerasTensor:
        return ops.concatenate([x, ops.flip(x, axis=2)], axis=0)


@keras.saving.register_keras_serializable(package="mammo_screen")
class MeanOfHalves(layers.Layer):
    """(2B, 1) -> (B, 1): the mean of row i and row B + i (an image and its mirror image)."""

    def call(self, s: keras.KerasTensor) -> keras.KerasTensor:
        half = ops.shape(s)[0] // 2
        return 0.5 * (s[:half] + s[half:])


class RandomIntensity(layers.Layer):
    """Training-only changes of the grey curve: gamma in [1/g, g], contrast about the image
    mean by up to ``contrast``, and Gaussian noise of up to ``noise`` (in [0, 1] units).
    Background (exact zeros after the v2 mask) stays zero. Identity at inference, and never
    part of a saved model (it lives in the training wrapper only)."""

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


# The layers a saved model of any recipe can hold, by their registered names.
SAVED_LAYERS = {keras.saving.get_registered_name(cls): cls
                for cls in (AttentionPool, WithMirrorImages, MeanOfHalves)}


def load_trained(path: str | Path) -> keras.Model:
    """A saved ``best.keras`` of any recipe, read as the exporter, the bench and the trainer
    all read it."""
    return keras.saving.load_model(path, custom_objects=SAVED_LAYERS, compile=False)
