"""Unlabelled adaptation to a site: AdaBN (Li et al., 2016).

Batch-norm layers carry much of a network's dependence on the scanner: their moving mean and
variance describe the images they were estimated on (here ImageNet's). Re-estimating them on
a site's own images, labels unused, moves every normalised activation back to the range the
later layers expect, without training anything.
"""

from __future__ import annotations

from collections.abc import Iterator

import keras
import numpy as np


def _layers(model: keras.Layer) -> Iterator[keras.Layer]:
    yield from model._flatten_layers(include_self=False, recursive=True)


def adapt_batch_norm(model: keras.Model, images: np.ndarray, batch_size: int = 32,
                     limit: int | None = 512, seed: int = 0) -> int:
    """Re-estimate, in place, the moving statistics of every batch-norm layer of ``model``
    on ``images`` (uint8, the model's input at 0..255; at most ``limit`` of them, drawn at
    random): the average of per-batch statistics, each batch normalised by its own (as in
    training), stochastic depth off. Returns the number of layers adapted."""
    bns = [la for la in _layers(model) if isinstance(la, keras.layers.BatchNormalization)]
    drops = [la for la in _layers(model) if isinstance(la, keras.layers.Dropout)]
    saved = ([(b.trainable, b.momentum) for b in bns], [d.rate for d in drops])
    rows = np.arange(len(images))
    if limit is not None and len(rows) > limit:
        rows = np.sort(np.random.default_rng(seed).choice(rows, limit, replace=False))
    try:
        for d in drops:
            d.rate = 0.0  # Dropout skips itself at rate 0 even in training mode
        for b in bns:
            b.trainable = True  # a frozen BN layer ignores training=True
        for k, i in enumerate(range(0, len(rows), batch_size)):
            for b in bns:
                b.momentum = k / (k + 1)  # a running mean: batch k weighs 1/(k+1)
            xb = np.asarray(images[rows[i:i + batch_size]], np.float32) / 255.0
            model(xb, training=True)
    finally:
        for b, (trainable, momentum) in zip(bns, saved[0], strict=True):
            b.trainable, b.momentum = trainable, momentum
        for d, rate in zip(drops, saved[1], strict=True):
            d.rate = rate
    return len(bns)
