"""The network: a small from-scratch CNN, and the augmentation used only while training.

Backend-agnostic Keras 3 (no TensorFlow import), so the same code runs with
``KERAS_BACKEND=jax`` or ``torch``. The model that is saved and exported is :func:`build_cnn`'s
alone; augmentation wraps it only for ``fit`` (see :func:`with_augmentation`).
"""

from __future__ import annotations

import keras
from keras import layers

from worker.scoring.model_metadata import INPUT_NAME, OUTPUT_NAME


def _conv_bn_relu(x: keras.KerasTensor, filters: int, name: str, strides: int = 1,
                  kernel: int = 3) -> keras.KerasTensor:
    # No conv bias: the batch norm that follows has its own shift.
    x = layers.Conv2D(filters, kernel, strides=strides, padding="same", use_bias=False,
                      name=f"{name}_conv")(x)
    x = layers.BatchNormalization(name=f"{name}_bn")(x)
    return layers.ReLU(name=f"{name}_relu")(x)


def build_cnn(size: int, widths: tuple[int, ...] = (16, 32, 64, 128),
              dropout: float = 0.3) -> keras.Model:
    """Input ``image`` (size, size, 1) in [0, 1] -> output ``score`` = P(malignant).

    A 4x4 stride-4 "patchify" stem straight to 1/4 of ``size`` (on two CPU cores a 5x5
    stride-2 stem at half resolution was 2.7x slower to train, for the same 1/4 resolution
    after pooling), then one stage per entry of ``widths`` (two conv-BN-ReLU, then 2x2 max
    pooling), global average + max pooling (a lesion is small: the max keeps a local signal
    that the average dilutes), dropout and one sigmoid unit.
    """
    inputs = keras.Input(shape=(size, size, 1), name=INPUT_NAME)
    # Centre the [0, 1] input; fixed constants keep preprocessing identical at export.
    x = layers.Rescaling(2.0, offset=-1.0, name="centre")(inputs)
    x = _conv_bn_relu(x, widths[0], "stem", strides=4, kernel=4)
    for i, width in enumerate(widths):
        x = _conv_bn_relu(x, width, f"s{i}a")
        x = _conv_bn_relu(x, width, f"s{i}b")
        x = layers.MaxPooling2D(2, name=f"s{i}_pool")(x)
    x = layers.Concatenate(name="pool")(
        [layers.GlobalAveragePooling2D(name="gap")(x), layers.GlobalMaxPooling2D(name="gmp")(x)]
    )
    x = layers.Dropout(dropout, name="dropout")(x)
    outputs = layers.Dense(1, activation="sigmoid", name=OUTPUT_NAME)(x)
    return keras.Model(inputs, outputs, name=f"cnn{size}")


def build_augmentation(seed: int | None = None) -> keras.Sequential:
    """Random flips, small rotations, zoom, translation and contrast; identity at inference.

    Horizontal flips mirror left/right breasts (the pool has both orientations). No vertical
    flip: the pectoral muscle and nipple keep their up/down order on real images.
    """
    augment = keras.Sequential(
        [
            layers.RandomFlip("horizontal", seed=seed),
            layers.RandomRotation(0.04, fill_mode="constant", seed=seed),
            layers.RandomZoom(0.1, fill_mode="constant", seed=seed),
            layers.RandomTranslation(0.05, 0.05, fill_mode="constant", seed=seed),
            layers.RandomContrast(0.2, value_range=(0.0, 1.0), seed=seed),
        ],
        name="augment",
    )
    if keras.backend.backend() == "jax":
        # Keras marks rotation, zoom and translation as not XLA-compilable, for TensorFlow's
        # transform op; under JAX they are plain jnp ops. Left marked, any model holding them
        # trains op by op, uncompiled (seen: one JAX compile per operation, every step).
        for layer in augment.layers:
            layer.supports_jit = True
    return augment


def with_augmentation(model: keras.Model, augment: keras.Sequential) -> keras.Model:
    """A training wrapper: augment -> model. Shares ``model``'s layers and weights, so
    training the wrapper trains ``model``, and ``model`` alone is what gets saved."""
    size = model.input_shape[1]
    inputs = keras.Input(shape=(size, size, 1), name=INPUT_NAME)
    return keras.Model(inputs, model(augment(inputs)), name=f"{model.name}_train")


NETWORKS = ("cnn", "lite0")  # what build_model builds (recipes: trainer.recipes)


def build_model(arch: str, size: int, weights: str | None = "pretrained") -> keras.Model:
    """``cnn``: the small CNN from scratch; ``lite0``: EfficientNet-Lite0, ImageNet-initialised
    from the weights package unless ``weights`` is None (random init, for comparison)."""
    if arch == "cnn":
        return build_cnn(size)
    if arch == "lite0":
        from trainer.efficientnet_lite import build_efficientnet_lite0

        return build_efficientnet_lite0(size, weights=weights)
    raise ValueError(f"unknown architecture {arch!r}; choose one of {NETWORKS}")
