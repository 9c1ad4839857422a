"""``screen train``: train one recipe on a labelled folder or CSV and record the run.

Read top to bottom, like a keras-io example:

1. find the images and split them by patient (:mod:`trainer.dataset`);
2. preprocess every image once with the worker's own function (:mod:`trainer.arrays`);
3. fit the recipe on the training split:
   ``lite0-probe`` (shipped): frozen EfficientNet-Lite0 features + logistic regression
   (:mod:`trainer.probe`); ``lite0-ft``: Lite0 fine-tuned with :mod:`trainer.finetune`'s
   recipe for a fixed number of epochs; ``lite0-top``: the frozen Lite0 front's maps cached
   and an attention head (and the last blocks) trained on them (:mod:`trainer.top`);
   ``cnn`` / ``lite0``: a network fitted with
   :mod:`trainer.fitting`, keeping the epoch with the best validation AUC;
4. score the validation split with the saved model and choose on it what the worker needs:
   the operating points and the view-combination rule (:mod:`trainer.evaluation`);
5. write ``metrics.json``, ``val_predictions.csv``, ``confusion.png``, ``roc.png`` and
   ``calibration.png``
   (:mod:`trainer.record`, :mod:`trainer.plots`).
"""

from __future__ import annotations

import csv
import time
import warnings
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import keras
import numpy as np

from trainer.arrays import cached_arrays, preprocess_samples
from trainer.dataset import (
    CLASS_NAMES,
    DatasetError,
    Sample,
    describe,
    discover,
    limit_samples,
    read_columns,
    split_by_patient,
    split_strategy,
)
from trainer.evaluation import (
    RECALL_RATE_POINTS,
    SENSITIVITY_POINTS,
    breast_scores,
    choose_aggregation,
    exam_of_breasts,
    group_scores,
    operating_points,
)
from trainer.finetune import FinetuneConfig
from trainer.fitting import (
    ArrayBatches,
    BestCheckpoint,
    ValidationScores,
    balanced_sample_weights,
    class_weights,
    compile_and_fit,
    cosine_schedule,
    predict,
)
from trainer.layers import load_trained
from trainer.model import (
    build_augmentation,
    build_model,
    default_lr,
    with_augmentation,
)
from trainer.panel import machine_balanced_rows
from trainer.plots import plot_calibration, plot_confusion, plot_roc
from trainer.probe import PROBE_ARCH, fit_probe_model
from trainer.record import (
    HISTORY_FILE,
    METRICS_FILE,
    PREDICTIONS_FILE,
    format_summary,
    hardware,
    relative,
    write_metrics,
    write_predictions,
)
from trainer.top import TopConfig
from worker.metrics import summary
from worker.preprocess import PreprocessSettings

BEST_MODEL = "best.keras"
FINETUNE_ARCH = "lite0-ft"
TOP_ARCH = "lite0-top"
ARCHES = (PROBE_ARCH, FINETUNE_ARCH, TOP_ARCH, "cnn", "lite0")
# Recipes that train on uint8 arrays (the cast happens in the graph).
_UINT8_ARCHES = (FINETUNE_ARCH, TOP_ARCH)
SHIPPED_TAPS = ("block15_project_bn",)
# (epochs, batch size) of the recipes without a config of their own; the probe has no epochs
# (its batch is for features). lite0-ft and lite0-top take theirs from their configs.
_DEFAULTS = {"cnn": (20, 32), "lite0": (20, 32), PROBE_ARCH: (1, 16)}
DEFAULT_SIZE = 256  # every recipe but lite0-top, whose config has its own


@dataclass
class TrainConfig:
    source: str | Path
    out_dir: str | Path
    arch: str = TOP_ARCH  # one of ARCHES; the default is the shipped recipe
    size: int | None = None  # None: lite0-top's config default, else DEFAULT_SIZE
    epochs: int | None = None  # None: per arch (_DEFAULTS); lite0-probe has no epochs
    batch_size: int | None = None
    lr: float | None = None  # None: 1e-3 from scratch, 3e-4 when fine-tuning pretrained lite0
    weights: str | None = "pretrained"  # lite0 only: ImageNet weights, or None for random init
    crop: bool = False  # preprocessing: crop to the breast first
    orient: str = "none"  # preprocessing: "left" mirrors so the breast faces one way
    intensity: str = "percentile"  # preprocessing: worker.preprocess.INTENSITY_MODES
    val_fraction: float = 0.2
    seed: int = 0
    sensitivity_target: float = 0.9  # the default operating point
    limit: int | None = None  # about this many images (whole patients): for tests and dry runs
    patience: int | None = None  # cnn/lite0: early stopping on validation AUC
    augment: bool = True
    intensity_augment: bool = True  # lite0-ft: random gamma, contrast and noise
    mixed_bfloat16: bool = False  # lite0-ft: faster on CPUs with AVX-512 BF16
    cache_dir: str | Path | None = None  # lite0-ft, lite0-top: keep the arrays (and maps) here
    trainable_blocks: int | None = None  # lite0-top: blocks trained (None: its config's)
    members: int = 1  # lite0-top: tops trained with different seeds, scores averaged
    # lite0-ft, lite0-top: this CSV column names each image's machine, and training weights
    # images so that every machine has the same malignant share (None: not balanced)
    machine_column: str | None = None
    patient_regex: str | None = None  # folder layouts: patient id from the file name
    exam_column: str | None = None  # CSV column naming each image's exam (default: patient)
    pooling: str = "avg"  # lite0-probe only: pooled features the logistic head reads
    taps: tuple[str, ...] = SHIPPED_TAPS  # lite0-probe only: pool these backbone layers
    verbose: int | str = 1  # Keras fit verbosity: 1 progress bar, 2 one line per epoch
    preprocess_threads: int = 2
    command: str = ""  # the command line that started the run, recorded in metrics.json

    def __post_init__(self) -> None:
        if self.arch not in ARCHES:
            raise ValueError(f"unknown arch {self.arch!r}: use one of {', '.join(ARCHES)}")
        # The options each recipe takes, checked here once (the CLI shows these messages).
        if (self.trainable_blocks or self.members != 1) and self.arch != TOP_ARCH:
            raise ValueError("--trainable-blocks and --members are for --arch lite0-top")
        if self.machine_column and self.arch not in _UINT8_ARCHES:
            raise ValueError("--machine-balanced-by is for --arch "
                             + " and ".join(_UINT8_ARCHES))
        if self.arch == TOP_ARCH:
            top = TopConfig()
            self.size = self.size or top.size
            if self.trainable_blocks is None:
                self.trainable_blocks = top.trainable_blocks
        self.size = self.size or DEFAULT_SIZE
        self.trainable_blocks = self.trainable_blocks or 0

    def resolved(self) -> tuple[int, int, float]:
        """(epochs, batch size, learning rate) with the per-arch defaults filled in."""
        if self.arch in (FINETUNE_ARCH, TOP_ARCH):
            own = TopConfig() if self.arch == TOP_ARCH else FinetuneConfig()
            epochs, batch, lr = own.epochs, own.batch_size, own.lr
        else:
            epochs, batch = _DEFAULTS[self.arch]
            lr = default_lr(self.arch, self.weights)
        return self.epochs or epochs, self.batch_size or batch, self.lr or lr


@dataclass
class TrainResult:
    out_dir: Path
    model_path: Path
    metrics: dict[str, Any]
    history: list[dict[str, float]] = field(default_factory=list)

    @property
    def threshold(self) -> float:
        return float(self.metrics["threshold"])


@dataclass
class Fitted:
    """What step 3 leaves behind (beside the saved model): how it was made."""

    history: list[dict[str, float]]
    best_epoch: int
    seconds: float
    training: dict[str, Any]  # the recipe's own entries for metrics.json's "training"


# --- step 3: the recipes -------------------------------------------------------------------


def fit_probe(cfg: TrainConfig, x: np.ndarray, y: np.ndarray, train_s: list[Sample],
              path: Path, batch_size: int) -> Fitted:
    """Frozen features and a logistic head: no epochs to choose."""
    what = f"avg+max of {', '.join(cfg.taps)}" if cfg.taps else cfg.pooling
    if cfg.verbose:
        print(f"fitting a linear probe on frozen Lite0 features ({what} pooling"
              f"{', with mirrored copies' if cfg.augment else ''})")
    started = time.time()
    fit = fit_probe_model(x, y, [s.patient_id or str(s.path) for s in train_s], cfg.size,
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


def fit_network(cfg: TrainConfig, x: np.ndarray, y: np.ndarray, x_val: np.ndarray,
                y_val: np.ndarray, path: Path, out: Path) -> Fitted:
    """A network trained from its initial weights, keeping the epoch with the best
    validation AUC (Adam, cosine decay, class-weighted binary cross-entropy)."""
    epochs, batch_size, lr = cfg.resolved()
    keras.utils.set_random_seed(cfg.seed)
    model = build_model(cfg.arch, cfg.size, cfg.weights)
    # Augmentation exists only in the training wrapper; the bare model is saved.
    fit_model = with_augmentation(model, build_augmentation(cfg.seed)) if cfg.augment else model
    data = ArrayBatches(x, y, batch_size, balanced_sample_weights(y), shuffle=True,
                        seed=cfg.seed)
    checkpoint = BestCheckpoint(model, path)
    # Order matters: the validation callback fills the logs the others read.
    callbacks: list[keras.callbacks.Callback] = [
        ValidationScores(model, x_val, y_val, batch_size), checkpoint,
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
                  {"weights": cfg.weights if cfg.arch == "lite0" else None,
                   "schedule": "Adam, cosine decay to 2% over all epochs",
                   "loss": "binary cross-entropy, balanced class weights",
                   "class_weights": class_weights(y)})


def fit_finetuned(cfg: TrainConfig, x: np.ndarray, y: np.ndarray, x_val: np.ndarray,
                  y_val: np.ndarray, path: Path, out: Path,
                  sample_weight: np.ndarray | None = None) -> Fitted:
    """Lite0 fine-tuned by :mod:`trainer.finetune`'s recipe for a fixed number of epochs; the
    last epoch is kept (validation AUC is logged per epoch, never used to choose)."""
    from trainer.finetune import fit

    epochs, batch_size, lr = cfg.resolved()
    ft = FinetuneConfig(arch="lite0", size=cfg.size, epochs=epochs, batch_size=batch_size,
                        lr=lr, intensity_augment=cfg.intensity_augment, tta=False,
                        mixed_bfloat16=cfg.mixed_bfloat16)
    log = keras.callbacks.CSVLogger(str(out / HISTORY_FILE))
    started = time.time()
    model = fit(ft, x, y, cfg.seed, verbose=cfg.verbose, sample_weight=sample_weight,
                callbacks=[ValidationScores(None, x_val, y_val, batch_size), log])
    model.save(path)
    history = _read_history(out / HISTORY_FILE)
    return Fitted(history, epochs, time.time() - started,
                  {"weights": "pretrained", "finetune": ft.to_dict(),
                   "schedule": f"AdamW (weight decay {ft.weight_decay:g}), linear warm-up "
                               "over 10% of steps, cosine decay to 1%; the last epoch kept",
                   "loss": "binary cross-entropy, balanced class weights",
                   "augmentation": "geometric and intensity (gamma, contrast, noise) in the graph"
                   if cfg.intensity_augment else "geometric in the graph"})


def fit_top(cfg: TrainConfig, x: np.ndarray, y: np.ndarray, path: Path,
            sample_weight: np.ndarray | None = None) -> Fitted:
    """:mod:`trainer.top`: the frozen front's maps of the training images (and their mirror
    images) computed once, the top trained on them for a fixed number of epochs, and the
    two saved as one model that scores an image as the mean over it and its mirror image."""
    from trainer.top import build_front, cached_maps, compose, fit

    epochs, batch_size, lr = cfg.resolved()
    top_cfg = TopConfig(size=cfg.size, trainable_blocks=cfg.trainable_blocks, epochs=epochs,
                        batch_size=batch_size, lr=lr, members=cfg.members)
    started = time.time()
    front = build_front(top_cfg)
    cache = Path(cfg.cache_dir) if cfg.cache_dir else None
    plain, mirrored = cached_maps(front, x, top_cfg, cache, progress=bool(cfg.verbose))
    history: list[dict[str, float]] = []
    top = fit(top_cfg, plain, mirrored, np.arange(len(y)), y, cfg.seed,
              sample_weight=sample_weight, verbose=cfg.verbose, logs=history)
    compose(front, top, tta=True).save(path)
    return Fitted(history, epochs, time.time() - started,
                  {"weights": "pretrained", "top": top_cfg.to_dict(),
                   "schedule": f"AdamW (weight decay {top_cfg.weight_decay:g}), linear warm-up "
                               "over 10% of steps, cosine decay to 1%; the last epoch kept",
                   "loss": "binary cross-entropy, balanced class weights",
                   "augmentation": "each image plain or mirrored at random per epoch; the "
                                   "saved model scores the mean of both"})


def _read_history(path: Path) -> list[dict[str, float]]:
    with path.open(newline="") as fh:
        return [{k: float(v) for k, v in row.items()} | {"epoch": int(row["epoch"]) + 1}
                for row in csv.DictReader(fh)]


# --- the whole run -------------------------------------------------------------------------


def train(cfg: TrainConfig) -> TrainResult:
    started = time.time()
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    epochs, batch_size, lr = cfg.resolved()
    if epochs < 1 or batch_size < 1 or lr <= 0:
        raise ValueError("epochs and batch size must be at least 1 and lr positive")
    say = print if cfg.verbose else (lambda *_: None)
    settings = PreprocessSettings(size=cfg.size, crop=cfg.crop, orient=cfg.orient,
                                  intensity=cfg.intensity)

    # 1. The images: a folder's own test split stays sealed; --limit takes whole patients.
    samples = [s for s in discover(cfg.source, cfg.patient_regex) if s.split != "test"]
    if cfg.limit:
        samples = limit_samples(samples, cfg.limit, cfg.seed)

    # 2. Preprocess once, before splitting, so an unreadable file simply drops out. Network
    #    fine-tuning reads uint8 (cast in the graph); the probe's features read float16.
    say(f"preprocessing {len(samples)} images at {cfg.size} px")
    progress = cfg.verbose if cfg.verbose else False
    if cfg.arch in _UINT8_ARCHES:
        cache = Path(cfg.cache_dir) if cfg.cache_dir else None
        x_all, kept = cached_arrays(samples, settings, cache, cfg.preprocess_threads, progress)
        paths = {s.path for s in kept}
        failed = [(s, "did not preprocess") for s in samples if s.path not in paths]
        samples = kept
    else:
        x_all, samples, failed = preprocess_samples(samples, settings, cfg.preprocess_threads,
                                                    progress)
    for s, reason in failed:
        warnings.warn(f"skipped {s.path}: {reason}", stacklevel=2)

    # ...and split by patient, each side with both classes.
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
    say(f"split by {strategy}: train {describe(train_s)}, validation {describe(val_s)}")

    # 3. Fit the recipe; the model it leaves in best.keras is the one exported.
    best_path = out / BEST_MODEL
    weight = None
    if cfg.machine_column:
        machines = read_columns(cfg.source, train_s, [cfg.machine_column])[cfg.machine_column]
        keep, weight = machine_balanced_rows(y_train, machines)
        say(f"machine-balanced: {int(keep.sum())} of {len(keep)} training images kept")
        x_train, y_train = x_train[keep], y_train[keep]
    if cfg.arch == PROBE_ARCH:
        fitted = fit_probe(cfg, x_train, y_train, train_s, best_path, batch_size)
    elif cfg.arch == FINETUNE_ARCH:
        fitted = fit_finetuned(cfg, x_train, y_train, x_val, y_val, best_path, out, weight)
    elif cfg.arch == TOP_ARCH:
        fitted = fit_top(cfg, x_train, y_train, best_path, weight)
    else:
        fitted = fit_network(cfg, x_train, y_train, x_val, y_val, best_path, out)

    # 4. Score the validation split with the saved model, as the worker will see it, and
    #    choose there the operating points and how views combine.
    best = load_trained(best_path)
    scores = predict(best, x_val, batch_size=batch_size)
    sensitivities = tuple(sorted({*SENSITIVITY_POINTS, cfg.sensitivity_target}))
    points = operating_points(y_val, scores, sensitivities, RECALL_RATE_POINTS)
    default_point = f"sens{round(cfg.sensitivity_target * 100)}"
    threshold = points[default_point]["threshold"]
    exam_ids = (read_columns(cfg.source, val_s, [cfg.exam_column])[cfg.exam_column]
                if cfg.exam_column else None)
    aggregation = choose_aggregation(val_s, scores, exam_ids)
    by, bs, breast_ids = breast_scores(val_s, scores, aggregation["breast"])
    ey, es, _ = group_scores(exam_of_breasts(val_s, breast_ids, exam_ids), by, bs,
                             aggregation["exam"])

    # 5. The record.
    src = Path(cfg.source)
    base = src.parent if src.is_file() else src
    metrics: dict[str, Any] = {
        "threshold": threshold,
        "threshold_rule": f"highest threshold with validation sensitivity >= "
                          f"{cfg.sensitivity_target:.2f} (image level)",
        "operating_points": points,
        "default_operating_point": default_point,
        "aggregation": aggregation,
        "class_names": list(CLASS_NAMES),
        "preprocess": asdict(settings),
        "validation": {
            "image": summary(y_val, scores, threshold),
            "breast": {**summary(by, bs, threshold),
                       "aggregate": f"{aggregation['breast']} score per breast"}
            if len(by) else None,
            "exam": {**summary(ey, es, threshold),
                     "aggregate": f"{aggregation['exam']} breast score per exam"}
            if len(ey) else None,
        },
        "best_epoch": fitted.best_epoch,
        "epochs_run": len({int(row["epoch"]) for row in fitted.history}),
        "split": {
            "strategy": strategy, "val_fraction": cfg.val_fraction, "seed": cfg.seed,
            "train": describe(train_s), "val": describe(val_s),
            "skipped_images": [relative(s.path, base) for s, _ in failed],
        },
        "training": {
            "command": cfg.command, "source": str(cfg.source), "arch": cfg.arch,
            "size": cfg.size, "epochs": epochs, "batch_size": batch_size, "lr": lr,
            "probe": None, "augment": cfg.augment, "seed": cfg.seed, "limit": cfg.limit,
            "patience": cfg.patience, "params": int(best.count_params()),
            "machine_balanced_by": cfg.machine_column,
            "hardware": hardware(),
            "started_utc": datetime.fromtimestamp(started, UTC).isoformat(timespec="seconds"),
            "fit_seconds": round(fitted.seconds, 1),
            **fitted.training,
        },
    }
    write_predictions(out / PREDICTIONS_FILE, val_s, scores, threshold, base)
    plot_confusion(y_val, scores, threshold, out / "confusion.png")
    plot_roc(y_val, scores, threshold, out / "roc.png")
    plot_calibration(y_val, scores, out / "calibration.png")
    metrics["training"]["seconds"] = round(time.time() - started, 1)
    write_metrics(out / METRICS_FILE, metrics)
    say(format_summary(metrics))
    return TrainResult(out_dir=out, model_path=best_path, metrics=metrics,
                       history=fitted.history)
