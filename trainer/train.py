"""Train the CNN on a labelled folder or CSV, keep the best epoch, and write validation figures.

Read top to bottom, like a keras-io example:

1. find the images and split them by patient (:mod:`trainer.dataset`);
2. preprocess every image once with the worker's own function, and cache the arrays;
3. build the CNN and its training-only augmentation (:mod:`trainer.model`);
4. fit with class-weighted binary cross-entropy, keeping the epoch with the best validation AUC;
5. score the validation split with that epoch, pick the threshold, and write
   ``metrics.json``, ``history.csv``, ``val_predictions.csv``, ``confusion.png`` and ``roc.png``.

Backend-agnostic Keras 3: NumPy arrays and a ``keras.utils.PyDataset``, no TensorFlow import.
"""

from __future__ import annotations

import csv
import json
import os
import platform
import time
import warnings
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import keras
import numpy as np

from trainer.dataset import (
    CLASS_NAMES,
    DatasetError,
    Sample,
    describe,
    discover,
    limit_samples,
    split_by_patient,
    split_strategy,
)
from trainer.model import build_augmentation, build_model, default_lr, with_augmentation
from trainer.plots import plot_confusion, plot_roc
from trainer.probe import PROBE_ARCH, fit_probe_model
from worker.metrics import roc_auc, summary, threshold_for_sensitivity
from worker.preprocess import ImageError, PreprocessSettings, preprocess_file

BEST_MODEL = "best.keras"
METRICS_FILE = "metrics.json"
HISTORY_FILE = "history.csv"
PREDICTIONS_FILE = "val_predictions.csv"


@dataclass
class TrainConfig:
    source: str | Path
    out_dir: str | Path
    size: int = 256
    epochs: int = 20
    batch_size: int = 32
    lr: float | None = None  # None: 1e-3 from scratch, 3e-4 when fine-tuning pretrained lite0
    arch: str = "cnn"  # "cnn" (small, from scratch), "lite0" (EfficientNet-Lite0, fine-tuned)
    # or "lite0-probe" (frozen Lite0 ImageNet features + logistic regression, no epochs)
    weights: str | None = "pretrained"  # lite0 only: ImageNet weights, or None for random init
    crop: bool = False  # preprocessing: crop to the breast first
    orient: str = "none"  # preprocessing: "left" mirrors so the breast faces one way
    intensity: str = "percentile"  # preprocessing: worker.preprocess.INTENSITY_MODES
    val_fraction: float = 0.2
    seed: int = 0
    sensitivity_target: float = 0.9
    limit: int | None = None  # about this many images (whole patients): for tests and dry runs
    patience: int | None = None  # early stopping on validation AUC; None trains every epoch
    augment: bool = True
    patient_regex: str | None = None  # folder layouts: patient id from the file name
    pooling: str = "avg"  # lite0-probe only: pooled features the logistic head reads
    taps: tuple[str, ...] = ()  # lite0-probe only: pool these backbone layers instead
    verbose: int | str = 1  # Keras fit verbosity: 1 progress bar, 2 one line per epoch
    preprocess_threads: int = 2
    command: str = ""  # the command line that started the run, recorded in metrics.json


@dataclass
class TrainResult:
    out_dir: Path
    model_path: Path
    metrics: dict[str, Any]
    history: list[dict[str, float]] = field(default_factory=list)

    @property
    def threshold(self) -> float:
        return float(self.metrics["threshold"])


# --- step 2: preprocess once -------------------------------------------------------------


def preprocess_samples(
    samples: Sequence[Sample], settings: PreprocessSettings, threads: int = 2,
    verbose: bool | int = True,
) -> tuple[np.ndarray, list[Sample], list[tuple[Sample, str]]]:
    """float16 array (N, size, size, 1) of the images that preprocess, those samples, and the
    (sample, reason) pairs that failed. float16 halves memory against float32 (2,855 images at
    256 px: 0.37 GB) and keeps ~3 significant digits, finer than the 8-bit source pixels.

    ``verbose``: False silent, True/1 a progress bar, 2 one line at the end (for log files)."""
    out = np.empty((len(samples), settings.size, settings.size, 1), dtype=np.float16)
    ok = np.zeros(len(samples), dtype=bool)
    failed: list[tuple[Sample, str]] = []
    bar = (keras.utils.Progbar(len(samples), unit_name="image", verbose=2 if verbose == 2 else 1)
           if verbose else None)

    def load(i: int) -> tuple[int, str | None]:
        try:
            out[i] = preprocess_file(samples[i].path, settings)
            return i, None
        except (ImageError, OSError) as exc:
            return i, str(exc)

    # OpenCV releases the GIL while decoding and resizing, so threads use both cores.
    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        for n, (i, error) in enumerate(pool.map(load, range(len(samples))), start=1):
            if error is None:
                ok[i] = True
            else:
                failed.append((samples[i], error))
            if bar is not None and (n % 50 == 0 or n == len(samples)):
                bar.update(n)
    kept = [s for s, good in zip(samples, ok, strict=True) if good]
    return out[ok], kept, failed


class ArrayBatches(keras.utils.PyDataset):
    """Batches from cached float16 arrays, cast to float32, optionally weighted and shuffled."""

    def __init__(self, x: np.ndarray, y: np.ndarray, batch_size: int,
                 class_weight: dict[int, float] | None = None, shuffle: bool = False,
                 seed: int = 0) -> None:
        super().__init__()
        self.x, self.y, self.batch_size = x, y.astype(np.float32), batch_size
        self.weights = (
            np.array([class_weight[int(v)] for v in y], dtype=np.float32) if class_weight else None
        )
        self.shuffle = shuffle
        self.rng = np.random.default_rng(seed)
        self.order = self.rng.permutation(len(x)) if shuffle else np.arange(len(x))

    def __len__(self) -> int:
        return int(np.ceil(len(self.x) / self.batch_size))

    def __getitem__(self, index: int) -> tuple[np.ndarray, ...]:
        idx = np.sort(self.order[index * self.batch_size : (index + 1) * self.batch_size])
        xb = self.x[idx].astype(np.float32)
        if self.weights is None:
            return xb, self.y[idx]
        return xb, self.y[idx], self.weights[idx]

    def on_epoch_end(self) -> None:
        if self.shuffle:
            self.order = self.rng.permutation(len(self.x))


def class_weights(y: np.ndarray) -> dict[int, float]:
    """Balanced weights n / (2 n_c), so each class contributes half of the loss."""
    counts = np.bincount(y.astype(int), minlength=2).astype(np.float64)
    return {c: float(len(y) / (2.0 * counts[c])) for c in (0, 1)}


# --- step 4: validate every epoch, keep the best -------------------------------------------


class ValidationScores(keras.callbacks.Callback):
    """Score the validation split after each epoch and put ``val_loss``, ``val_accuracy`` and
    an exact (rank-based) ``val_auc`` into the epoch's logs, for the callbacks after it.

    Keras's own AUC metric bins scores into fixed thresholds, which is badly off while a young
    model's scores still crowd together near 0.5; the checkpoint choice deserves the exact one.
    """

    def __init__(self, model: keras.Model, data: ArrayBatches) -> None:
        super().__init__()
        self.bare, self.data = model, data
        self.y = data.y.astype(np.float64)

    def on_epoch_end(self, epoch: int, logs: dict[str, float] | None = None) -> None:
        scores = np.asarray(self.bare.predict(self.data, verbose=0), np.float64).reshape(-1)
        p = np.clip(scores, 1e-7, 1 - 1e-7)
        if logs is not None:
            logs["val_loss"] = float(-np.mean(self.y * np.log(p) + (1 - self.y) * np.log(1 - p)))
            logs["val_accuracy"] = float(np.mean((scores >= 0.5) == (self.y == 1)))
            logs["val_auc"] = float(roc_auc(self.y, scores) or float("nan"))


class BestCheckpoint(keras.callbacks.Callback):
    """Save ``model`` (the bare CNN, not the augmenting wrapper being fit) when the monitored
    validation figure improves."""

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


# --- step 5: validation figures -------------------------------------------------------------


def breast_level(samples: Sequence[Sample], scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Labels and mean scores per breast (patient + laterality); empty when sides are unknown.

    A breast's label is its images' label (labels are consistent per breast in this pool; the
    max guards against a stray inconsistent one)."""
    groups: dict[str, list[int]] = {}
    for i, s in enumerate(samples):
        if s.breast_id is not None:
            groups.setdefault(s.breast_id, []).append(i)
    if not groups:
        return np.zeros(0, dtype=int), np.zeros(0)
    labels = np.array([max(samples[i].label for i in idx) for idx in groups.values()])
    means = np.array([float(np.mean(scores[idx])) for idx in groups.values()])
    return labels, means


def hardware() -> str:
    """CPU count and the Keras backend's devices, for the model card."""
    try:
        devices = ", ".join(keras.distribution.list_devices())
    except Exception:  # not every backend implements device listing
        devices = "unknown devices"
    cpu = platform.processor() or platform.machine()
    try:  # Linux names the CPU model; platform.processor() often says only "x86_64"
        with open("/proc/cpuinfo") as fh:
            cpu = next(line.split(":", 1)[1].strip() for line in fh
                       if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return (f"{cpu}, {os.cpu_count()} CPU core(s); Keras {keras.__version__}, "
            f"backend {keras.backend.backend()} on {devices}")


def _relative(path: Path, base: Path) -> str:
    try:
        return str(path.resolve().relative_to(base.resolve()))
    except ValueError:
        return str(path)


def write_predictions(path: Path, samples: Sequence[Sample], scores: np.ndarray,
                      threshold: float, base: Path) -> None:
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["filename", "label", "score", "predicted", "patient_id", "laterality"])
        for s, score in zip(samples, scores, strict=True):
            writer.writerow([_relative(s.path, base), CLASS_NAMES[s.label], f"{score:.6f}",
                             CLASS_NAMES[int(score >= threshold)], s.patient_id or "",
                             s.laterality or ""])


def _fmt(value: float | None, pct: bool = False) -> str:
    if value is None:
        return "n/a"
    return f"{value:.1%}" if pct else f"{value:.3f}"


def format_summary(metrics: dict[str, Any]) -> str:
    """A few readable lines for the end of a run."""
    img = metrics["validation"]["image"]
    lines = [
        f"validation: {img['n']} images, {metrics['split']['val']['patients']} patients "
        f"(split by {metrics['split']['strategy']}, seed {metrics['split']['seed']})",
        f"  image AUC {_fmt(img['auc'])}   accuracy {_fmt(img['accuracy'], True)}   "
        f"sensitivity {_fmt(img['sensitivity'], True)}   "
        f"specificity {_fmt(img['specificity'], True)}",
        f"  threshold {metrics['threshold']:.4f}: {metrics['threshold_rule']}",
        f"  confusion: TP {img['tp']}  FN {img['fn']}  FP {img['fp']}  TN {img['tn']}",
    ]
    breast = metrics["validation"].get("breast")
    if breast:
        lines.append(f"  breast-level AUC {_fmt(breast['auc'])} over {breast['n']} breasts")
    probe = metrics["training"].get("probe")
    if probe:
        lines.append(f"  linear probe ({probe['pooling']} pooling), penalty l2 {probe['l2']}, "
                     f"{metrics['training']['seconds']:.0f} s")
    else:
        lines.append(f"  best epoch {metrics['best_epoch']} of {metrics['epochs_run']}, "
                     f"{metrics['training']['seconds']:.0f} s")
    return "\n".join(lines)


# --- the whole run -------------------------------------------------------------------------


def train(cfg: TrainConfig) -> TrainResult:
    started = time.time()
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    verbose = cfg.verbose != 0
    settings = PreprocessSettings(size=cfg.size, crop=cfg.crop, orient=cfg.orient,
                                  intensity=cfg.intensity)
    lr = cfg.lr if cfg.lr is not None else default_lr(cfg.arch, cfg.weights)
    if cfg.epochs < 1 or cfg.batch_size < 1 or lr <= 0:
        raise ValueError("epochs and batch size must be at least 1 and lr positive")

    # 1. images and the patient split
    samples = discover(cfg.source, cfg.patient_regex)
    samples = [s for s in samples if s.split != "test"]  # a folder's test split stays sealed
    if cfg.limit:
        samples = limit_samples(samples, cfg.limit, cfg.seed)

    # 2. preprocess once (before splitting, so an unreadable file simply drops out)
    if verbose:
        print(f"preprocessing {len(samples)} images at {cfg.size} px")
    x_all, samples, failed = preprocess_samples(samples, settings, cfg.preprocess_threads,
                                                cfg.verbose if verbose else False)
    for s, reason in failed:
        warnings.warn(f"skipped {s.path}: {reason}", stacklevel=2)
    strategy = split_strategy(samples)
    train_s, val_s = split_by_patient(samples, cfg.val_fraction, cfg.seed)
    for name, part in (("training", train_s), ("validation", val_s)):
        if len({s.label for s in part}) < 2:
            raise DatasetError(f"the {name} split lacks one class ({len(part)} images); "
                             "use more images or another --val-fraction")
    index = {s.path: i for i, s in enumerate(samples)}
    x_train = x_all[[index[s.path] for s in train_s]]
    x_val = x_all[[index[s.path] for s in val_s]]
    del x_all
    y_train = np.array([s.label for s in train_s])
    y_val = np.array([s.label for s in val_s])
    if verbose:
        print(f"split by {strategy}: train {describe(train_s)}, validation {describe(val_s)}")

    best_path = out / BEST_MODEL
    weights: dict[int, float] = class_weights(y_train)
    if cfg.arch == PROBE_ARCH:
        # 3-4. frozen features and a logistic head: no epochs to choose
        if verbose:
            what = f"avg+max of {', '.join(cfg.taps)}" if cfg.taps else cfg.pooling
            print(f"fitting a linear probe on frozen Lite0 features ({what} pooling"
                  f"{', with mirrored copies' if cfg.augment else ''})")
        fit_started = time.time()
        probe_fit = fit_probe_model(
            x_train, y_train, [s.patient_id or str(s.path) for s in train_s], cfg.size,
            cfg.pooling, mirrored=cfg.augment, seed=cfg.seed, batch_size=cfg.batch_size,
            progress=verbose, taps=cfg.taps or None)
        probe_fit.model.save(best_path)
        model, epochs_run, best_epoch = probe_fit.model, 0, 0
        fit_seconds = time.time() - fit_started
        history_rows: list[dict[str, float]] = []
        probe_info: dict[str, Any] | None = {
            "pooling": "avg+max of " + ", ".join(cfg.taps) if cfg.taps else cfg.pooling,
            "mirrored_copies": cfg.augment,
            "l2": probe_fit.probe.l2,
            "l2_inner_cv_auc": {str(k): v for k, v in probe_fit.l2_auc.items()},
            "penalty_rule": "best mean AUC over a 3-fold patient-grouped CV of the training "
                            "split alone",
        }
    else:
        # 3. model, and augmentation that exists only in the training wrapper
        keras.utils.set_random_seed(cfg.seed)
        model = build_model(cfg.arch, cfg.size, cfg.weights)
        fit_model = (with_augmentation(model, build_augmentation(cfg.seed)) if cfg.augment
                     else model)
        train_data = ArrayBatches(x_train, y_train, cfg.batch_size, weights, shuffle=True,
                                  seed=cfg.seed)
        val_data = ArrayBatches(x_val, y_val, cfg.batch_size)
        schedule = keras.optimizers.schedules.CosineDecay(
            lr, decay_steps=cfg.epochs * len(train_data), alpha=0.02
        )
        fit_model.compile(
            optimizer=keras.optimizers.Adam(schedule),
            loss="binary_crossentropy",
            metrics=[keras.metrics.BinaryAccuracy(name="accuracy"),
                     # binned, so approximate: a training-progress hint only
                     keras.metrics.AUC(num_thresholds=1000, name="auc")],
        )

        # 4. fit, keeping the epoch with the best validation AUC
        checkpoint = BestCheckpoint(model, best_path)
        # Order matters: the validation callback fills the logs the others read.
        callbacks: list[keras.callbacks.Callback] = [
            ValidationScores(model, val_data), checkpoint,
            keras.callbacks.CSVLogger(str(out / HISTORY_FILE)),
        ]
        if cfg.patience:
            callbacks.append(keras.callbacks.EarlyStopping(monitor="val_auc", mode="max",
                                                           patience=cfg.patience))
        fit_started = time.time()
        history = fit_model.fit(train_data, epochs=cfg.epochs, callbacks=callbacks,
                                verbose=cfg.verbose)
        fit_seconds = time.time() - fit_started
        epochs_run = len(history.history.get("loss", []))
        if checkpoint.best_epoch < 0:  # AUC never finite (e.g. NaN loss): keep the last weights
            model.save(best_path)
        best_epoch = checkpoint.best_epoch if checkpoint.best_epoch > 0 else epochs_run
        history_rows = [
            {k: float(v[i]) for k, v in history.history.items()} | {"epoch": i + 1}
            for i in range(epochs_run)
        ]
        probe_info = None

    # 5. validation figures with the best epoch's weights
    best = keras.saving.load_model(best_path)
    scores = np.asarray(best.predict(x_val.astype(np.float32), batch_size=cfg.batch_size,
                                     verbose=0), dtype=np.float64).reshape(-1)
    threshold = threshold_for_sensitivity(y_val, scores, cfg.sensitivity_target)
    rule = (f"highest threshold with validation sensitivity >= {cfg.sensitivity_target:.2f} "
            "(image level)")
    breast_y, breast_s = breast_level(val_s, scores)
    breast = None
    if len(breast_y):
        breast = {**summary(breast_y, breast_s, threshold), "aggregate": "mean score per breast"}
    src = Path(cfg.source)
    base = src.parent if src.is_file() else src
    metrics: dict[str, Any] = {
        "threshold": threshold,
        "threshold_rule": rule,
        "class_names": list(CLASS_NAMES),
        "preprocess": asdict(settings),
        "validation": {
            "image": summary(y_val, scores, threshold),
            "breast": breast,
        },
        "best_epoch": best_epoch,
        "epochs_run": epochs_run,
        "split": {
            "strategy": strategy,
            "val_fraction": cfg.val_fraction,
            "seed": cfg.seed,
            "train": describe(train_s),
            "val": describe(val_s),
            "skipped_images": [_relative(s.path, base) for s, _ in failed],
        },
        "training": {
            "command": cfg.command,
            "source": str(cfg.source),
            "size": cfg.size,
            "epochs": cfg.epochs,
            "batch_size": cfg.batch_size,
            "lr": lr,
            "arch": cfg.arch,
            "weights": cfg.weights if cfg.arch == "lite0" else (
                "pretrained" if cfg.arch == PROBE_ARCH else None),
            "probe": probe_info,
            "schedule": ("none: logistic regression by Newton's method"
                         if probe_info else "Adam, cosine decay to 2% over all epochs"),
            "loss": "binary cross-entropy, balanced class weights"
                    + (", L2 penalty" if probe_info else ""),
            "class_weights": weights,
            "augment": cfg.augment,
            "seed": cfg.seed,
            "limit": cfg.limit,
            "patience": cfg.patience,
            "params": int(model.count_params()),
            "hardware": hardware(),
            "started_utc": datetime.fromtimestamp(started, UTC).isoformat(timespec="seconds"),
            "fit_seconds": round(fit_seconds, 1),
            "seconds": 0.0,  # filled in below, once the figures are written
        },
    }
    write_predictions(out / PREDICTIONS_FILE, val_s, scores, threshold, base)
    plot_confusion(y_val, scores, threshold, out / "confusion.png")
    plot_roc(y_val, scores, threshold, out / "roc.png")
    metrics["training"]["seconds"] = round(time.time() - started, 1)
    (out / METRICS_FILE).write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")
    if verbose:
        print(format_summary(metrics))
    return TrainResult(out_dir=out, model_path=best_path, metrics=metrics, history=history_rows)
