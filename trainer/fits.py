"""Step 3 of :func:`trainer.train.train`: each recipe's builder (named in
:mod:`trainer.recipes`), fitting it on the training split and saving the model to ``path``.

Every builder takes ``(cfg, split, path, out, sample_weight)`` and returns :class:`Fitted`.
"""

from __future__ import annotations

import csv
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import keras
import numpy as np

from trainer.dataset import Sample
from trainer.finetune import FinetuneConfig
from trainer.finetune import fit as fit_finetune_model
from trainer.fitting import (
    ArrayBatches,
    BestCheckpoint,
    ValidationScores,
    balanced_sample_weights,
    class_weights,
    compile_and_fit,
    cosine_schedule,
)
from trainer.model import build_augmentation, build_model, with_augmentation
from trainer.probe import fit_probe_model
from trainer.recipes import LITE0
from trainer.record import HISTORY_FILE
from trainer.top import TopConfig, build_front, cached_maps, compose
from trainer.top import fit as fit_top_model
from trainer.train_config import TrainConfig


@dataclass
class Split:
    """The images, split by patient: arrays, labels and samples of each side."""

    x_train: np.ndarray
    y_train: np.ndarray
    train: list[Sample]
    x_val: np.ndarray
    y_val: np.ndarray
    val: list[Sample]


@dataclass
class Fitted:
    """What step 3 leaves behind (beside the saved model): how it was made."""

    history: list[dict[str, float]]
    best_epoch: int
    seconds: float
    training: dict[str, Any]  # the recipe's own entries for metrics.json's "training"


def fit_probe(cfg: TrainConfig, split: Split, path: Path, out: Path,
              sample_weight: np.ndarray | None = None) -> Fitted:
    """Frozen features and a logistic head: no epochs to choose."""
    _, batch_size, _ = cfg.resolved()
    what = f"avg+max of {', '.join(cfg.taps)}" if cfg.taps else cfg.pooling
    if cfg.verbose:
        print(f"fitting a linear probe on frozen Lite0 features ({what} pooling"
              f"{', with mirrored copies' if cfg.augment else ''})")
    started = time.time()
    fit = fit_probe_model(split.x_train, split.y_train,
                          [s.patient_id or str(s.path) for s in split.train], cfg.size,
                          cfg.pooling, mirrored=cfg.augment, seed=cfg.seed,
                          batch_size=batch_size, progress=bool(cfg.verbose),
                          taps=cfg.taps or None)
    fit.model.save(path)
    probe = {"pooling": what, "mirrored_copies": cfg.augment, "l2": fit.probe.l2,
             "l2_inner_cv_auc": {str(k): v for k, v in fit.l2_auc.items()},
             "penalty_rule": "best mean AUC over a 3-fold patient-grouped CV of the training "
                             "split alone"}
    return Fitted([], 0, time.time() - started,
                  {"probe": probe, "weights": "pretrained",
                   "schedule": "none: logistic regression by Newton's method",
                   "loss": "binary cross-entropy, balanced class weights, L2 penalty"})


def fit_network(cfg: TrainConfig, split: Split, path: Path, out: Path,
                sample_weight: np.ndarray | None = None) -> Fitted:
    """A network trained from its initial weights, keeping the epoch with the best
    validation AUC (Adam, cosine decay, class-weighted binary cross-entropy)."""
    epochs, batch_size, lr = cfg.resolved()
    x, y = split.x_train, split.y_train
    keras.utils.set_random_seed(cfg.seed)
    model = build_model(cfg.arch, cfg.size, cfg.weights)
    # Augmentation exists only in the training wrapper; the bare model is saved.
    fit_model = with_augmentation(model, build_augmentation(cfg.seed)) if cfg.augment else model
    data = ArrayBatches(x, y, batch_size, balanced_sample_weights(y), shuffle=True,
                        seed=cfg.seed)
    checkpoint = BestCheckpoint(model, path)
    # Order matters: the validation callback fills the logs the others read.
    callbacks: list[keras.callbacks.Callback] = [
        ValidationScores(model, split.x_val, split.y_val, batch_size), checkpoint,
        keras.callbacks.CSVLogger(str(out / HISTORY_FILE))]
    if cfg.patience:
        callbacks.append(keras.callbacks.EarlyStopping(monitor="val_auc", mode="max",
                                                       patience=cfg.patience))
    started = time.time()
    history = compile_and_fit(
        fit_model, data, epochs, keras.optimizers.Adam(cosine_schedule(lr, epochs * len(data))),
        callbacks=callbacks, verbose=cfg.verbose,
        # binned, so approximate: a training-progress hint only
        metrics=[keras.metrics.BinaryAccuracy(name="accuracy"),
                 keras.metrics.AUC(num_thresholds=1000, name="auc")])
    if checkpoint.best_epoch < 0:  # AUC never finite (e.g. NaN loss): keep the last weights
        model.save(path)
    best = checkpoint.best_epoch if checkpoint.best_epoch > 0 else len(history)
    return Fitted(history, best, time.time() - started,
                  {"weights": cfg.weights if cfg.arch == LITE0.name else None,
                   "schedule": "Adam, cosine decay to 2% over all epochs",
                   "loss": "binary cross-entropy, balanced class weights",
                   "class_weights": class_weights(y)})


def _adamw_last_epoch(weight_decay: float) -> dict[str, str]:
    """The record of a fixed-length AdamW schedule (lite0-ft, lite0-top)."""
    return {"schedule": f"AdamW (weight decay {weight_decay:g}), linear warm-up over 10% of "
                        "steps, cosine decay to 1%; the last epoch kept",
            "loss": "binary cross-entropy, balanced class weights"}


def fit_finetuned(cfg: TrainConfig, split: Split, path: Path, out: Path,
                  sample_weight: np.ndarray | None = None) -> Fitted:
    """Lite0 fine-tuned by :mod:`trainer.finetune`'s recipe for a fixed number of epochs; the
    last epoch is kept (validation AUC is logged per epoch, never used to choose)."""
    epochs, batch_size, lr = cfg.resolved()
    ft = FinetuneConfig(arch="lite0", size=cfg.size, epochs=epochs, batch_size=batch_size,
                        lr=lr, intensity_augment=cfg.intensity_augment, tta=False,
                        mixed_bfloat16=cfg.mixed_bfloat16)
    log = keras.callbacks.CSVLogger(str(out / HISTORY_FILE))
    started = time.time()
    model = fit_finetune_model(ft, split.x_train, split.y_train, cfg.seed, verbose=cfg.verbose,
                sample_weight=sample_weight,
                callbacks=[ValidationScores(None, split.x_val, split.y_val, batch_size), log])
    model.save(path)
    history = _read_history(out / HISTORY_FILE)
    return Fitted(history, epochs, time.time() - started,
                  {"weights": "pretrained", "finetune": ft.to_dict(),
                   **_adamw_last_epoch(ft.weight_decay),
                   "augmentation": "geometric and intensity (gamma, contrast, noise) in the graph"
                   if cfg.intensity_augment else "geometric in the graph"})


def fit_top(cfg: TrainConfig, split: Split, path: Path, out: Path,
            sample_weight: np.ndarray | None = None) -> Fitted:
    """:mod:`trainer.top`: the frozen front's maps of the training images (and their mirror
    images) computed once, the top trained on them for a fixed number of epochs, and the
    two saved as one model that scores an image as the mean over it and its mirror image."""
    epochs, batch_size, lr = cfg.resolved()
    x, y = split.x_train, split.y_train
    top_cfg = TopConfig(size=cfg.size, trainable_blocks=cfg.trainable_blocks, epochs=epochs,
                        batch_size=batch_size, lr=lr, members=cfg.members)
    started = time.time()
    front = build_front(top_cfg)
    cache = Path(cfg.cache_dir) if cfg.cache_dir else None
    plain, mirrored = cached_maps(front, x, top_cfg, cache, progress=bool(cfg.verbose))
    history: list[dict[str, float]] = []
    top = fit_top_model(top_cfg, plain, mirrored, np.arange(len(y)), y, cfg.seed,
              sample_weight=sample_weight, verbose=cfg.verbose, logs=history)
    compose(front, top, tta=True).save(path)
    return Fitted(history, epochs, time.time() - started,
                  {"weights": "pretrained", "top": top_cfg.to_dict(),
                   **_adamw_last_epoch(top_cfg.weight_decay),
                   "augmentation": "each image plain or mirrored at random per epoch; the "
                                   "saved model scores the mean of both"})


def _read_history(path: Path) -> list[dict[str, float]]:
    with path.open(newline="") as fh:
        return [{k: float(v) for k, v in row.items()} | {"epoch": int(row["epoch"]) + 1}
                for row in csv.DictReader(fh)]
