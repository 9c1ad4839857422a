"""Training a network: batches from cached arrays, the learning-rate schedule, compile and
fit, per-epoch validation scores, and scoring. One home for what every network recipe shares
(:mod:`trainer.train`'s ``cnn`` and ``lite0``, :mod:`trainer.finetune`).

Backend-agnostic Keras 3: NumPy arrays and ``keras.utils.PyDataset``, no TensorFlow import.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import keras
import numpy as np

from worker.audit.metrics import roc_auc

# --- batches -------------------------------------------------------------------------------


def class_weights(y: np.ndarray) -> dict[int, float]:
    """Balanced weights n / (2 n_c), so each class contributes half of the loss."""
    counts = np.bincount(y.astype(int), minlength=2).astype(np.float64)
    return {c: float(len(y) / (2.0 * counts[c])) for c in (0, 1)}


def balanced_sample_weights(y: np.ndarray, sample_weight: np.ndarray | None = None
                            ) -> np.ndarray:
    """Per-image :func:`class_weights`, times ``sample_weight`` (normalised to mean 1)."""
    cw = class_weights(y)
    w = np.where(np.asarray(y) == 1, cw[1], cw[0])
    if sample_weight is not None:
        w = w * sample_weight / np.mean(sample_weight)
    return w


class ArrayBatches(keras.utils.PyDataset):
    """Batches of cached arrays (float16 cast to float32; uint8 passed as is, for a model that
    scales in the graph), with per-image weights, shuffled each epoch when ``shuffle``.

    ``whole_batches`` drops the last partial batch (one graph shape, no retracing), unless
    there are fewer images than one batch: then they are the one batch."""

    def __init__(self, x: np.ndarray, y: np.ndarray, batch_size: int,
                 weights: np.ndarray | None = None, shuffle: bool = False, seed: int = 0,
                 whole_batches: bool = False) -> None:
        super().__init__()
        self.x, self.y, self.batch_size = x, np.asarray(y, np.float32), batch_size
        self.weights = None if weights is None else np.asarray(weights, np.float32)
        self.shuffle, self.whole_batches = shuffle, whole_batches
        self.rng = np.random.default_rng(seed)
        self.order = self.rng.permutation(len(x)) if shuffle else np.arange(len(x))

    def __len__(self) -> int:
        if self.whole_batches:
            return max(len(self.x) // self.batch_size, min(len(self.x), 1))
        return int(np.ceil(len(self.x) / self.batch_size))

    def __getitem__(self, index: int) -> tuple[np.ndarray, ...]:
        idx = np.sort(self.order[index * self.batch_size : (index + 1) * self.batch_size])
        xb = self.x[idx]
        if xb.dtype != np.uint8:
            xb = xb.astype(np.float32)
        if self.weights is None:
            return xb, self.y[idx]
        return xb, self.y[idx], self.weights[idx]

    def on_epoch_end(self) -> None:
        if self.shuffle:
            self.order = self.rng.permutation(len(self.x))


# --- schedule, compile and fit -------------------------------------------------------------


def cosine_schedule(lr: float, steps: int, warmup_fraction: float = 0.0,
                    alpha: float = 0.02) -> keras.optimizers.schedules.LearningRateSchedule:
    """Cosine decay to ``alpha * lr`` over ``steps``, after a linear warm-up over the first
    ``warmup_fraction`` of them (none by default)."""
    warmup = int(steps * warmup_fraction)
    if warmup == 0:
        return keras.optimizers.schedules.CosineDecay(lr, decay_steps=max(steps, 1),
                                                      alpha=alpha)
    return keras.optimizers.schedules.CosineDecay(
        0.0, decay_steps=max(steps - warmup, 1), warmup_target=lr, warmup_steps=warmup,
        alpha=alpha)


def compile_and_fit(fit_model: keras.Model, data: ArrayBatches, epochs: int,
                    optimizer: keras.optimizers.Optimizer,
                    loss: str | keras.losses.Loss | Sequence[keras.losses.Loss]
                    = "binary_crossentropy",
                    callbacks: Sequence[keras.callbacks.Callback] = (),
                    metrics: Sequence[keras.metrics.Metric] = (),
                    verbose: int | str = 2,
                    loss_weights: Sequence[float] | None = None) -> list[dict[str, float]]:
    """Compile ``fit_model`` (usually a training wrapper around the model that is saved) and
    fit it for ``epochs``; returns one row of logs per epoch run. A model with several
    outputs takes one loss per output, weighted by ``loss_weights``."""
    fit_model.compile(optimizer=optimizer, loss=loss if isinstance(loss, str | keras.losses.Loss)
                      else list(loss), metrics=list(metrics),
                      loss_weights=list(loss_weights) if loss_weights is not None else None)
    history = fit_model.fit(data, epochs=epochs, callbacks=list(callbacks), verbose=verbose)
    n = len(history.history.get("loss", []))
    return [{k: float(v[i]) for k, v in history.history.items()} | {"epoch": i + 1}
            for i in range(n)]


# --- scoring -------------------------------------------------------------------------------


def predict(model: keras.Model, x: np.ndarray, tta: bool = False, batch_size: int = 32
            ) -> np.ndarray:
    """Scores of ``x`` (uint8 levels or [0, 1] floats) by the saved-form ``model`` (float
    input in [0, 1]); with ``tta`` the mean with the mirror image's score."""
    out = np.zeros(len(x), np.float64)
    for i in range(0, len(x), batch_size):
        xb = np.asarray(x[i:i + batch_size], np.float32)
        if x.dtype == np.uint8:
            xb = xb / 255.0
        s = np.asarray(model.predict_on_batch(xb), np.float64).reshape(-1)
        if tta:
            s = 0.5 * (s + np.asarray(model.predict_on_batch(
                np.ascontiguousarray(xb[:, :, ::-1])), np.float64).reshape(-1))
        out[i:i + len(xb)] = s
    return out


# --- callbacks -----------------------------------------------------------------------------


class ValidationScores(keras.callbacks.Callback):
    """Score the validation split after each epoch and put ``val_loss``, ``val_accuracy`` and
    an exact (rank-based) ``val_auc`` into the epoch's logs, for the callbacks after it.

    Keras's own AUC metric bins scores into fixed thresholds, which is badly off while a young
    model's scores still crowd together near 0.5; the checkpoint choice deserves the exact one.

    ``model``: the bare network (float input in [0, 1]); None scores with the model being fit
    itself, fed ``x`` as is (a training wrapper that takes uint8 and augments only while
    training).
    """

    def __init__(self, model: keras.Model | None, x: np.ndarray, y: np.ndarray,
                 batch_size: int = 32) -> None:
        super().__init__()
        self.bare, self.x, self.batch_size = model, x, batch_size
        self.y = np.asarray(y, np.float64)

    def _scores(self) -> np.ndarray:
        if self.bare is not None:
            return predict(self.bare, self.x, batch_size=self.batch_size)
        b = self.batch_size
        return np.concatenate([
            np.asarray(self.model.predict_on_batch(self.x[i:i + b]), np.float64).reshape(-1)
            for i in range(0, len(self.x), b)])

    def on_epoch_end(self, epoch: int, logs: dict[str, float] | None = None) -> None:
        scores = self._scores()
        p = np.clip(scores, 1e-7, 1 - 1e-7)
        if logs is not None:
            logs["val_loss"] = float(-np.mean(self.y * np.log(p) + (1 - self.y) * np.log(1 - p)))
            logs["val_accuracy"] = float(np.mean((scores >= 0.5) == (self.y == 1)))
            logs["val_auc"] = float(roc_auc(self.y, scores) or float("nan"))


class BestCheckpoint(keras.callbacks.Callback):
    """Save ``model`` (the bare network, not the augmenting wrapper being fit) when the
    monitored validation figure improves."""

    def __init__(self, model: keras.Model, path: Path, monitor: str = "val_auc") -> None:
        super().__init__()
        self.bare, self.path, self.monitor = model, path, monitor
        self.best = -np.inf
        self.best_epoch = -1

    def on_epoch_end(self, epoch: int, logs: dict[str, float] | None = None) -> None:
        value = (logs or {}).get(self.monitor)
        if value is None or not np.isfinite(value):
            return
        if value > self.best:
            self.best, self.best_epoch = float(value), epoch + 1
            self.bare.save(self.path)
