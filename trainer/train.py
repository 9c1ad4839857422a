"""``screen train``: train one recipe on a labelled folder or CSV and record the run.

Read top to bottom, like a keras-io example:

1. find the images and split them by patient (:mod:`trainer.dataset`);
2. preprocess every image once with the worker's own function (:mod:`trainer.arrays`);
3. fit the recipe (named in :mod:`trainer.recipes`, fitted by :mod:`trainer.fits`) on the
   training split: ``lite0-probe``: frozen EfficientNet-Lite0 features + logistic regression
   (:mod:`trainer.probe`); ``lite0-ft``: Lite0 fine-tuned with :mod:`trainer.finetune`'s
   recipe for a fixed number of epochs; ``lite0-top`` (shipped): the frozen Lite0 front's maps
   cached and an attention head (and the last blocks) trained on them (:mod:`trainer.top`);
   ``cnn`` / ``lite0``: a network fitted with :mod:`trainer.fitting`, keeping the epoch with
   the best validation AUC;
4. score the validation split with the saved model and choose on it what the worker needs:
   the operating points and the view-combination rule (:mod:`trainer.evaluation`);
5. write ``metrics.json``, ``val_predictions.csv``, ``confusion.png``, ``roc.png`` and
   ``calibration.png``
   (:mod:`trainer.record`, :mod:`trainer.plots`).
"""

from __future__ import annotations

import time
import warnings
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

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
    source_folder,
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
from trainer.fits import Fitted, Split
from trainer.fitting import predict
from trainer.layers import load_trained
from trainer.panel import machine_balanced_rows
from trainer.plots import plot_calibration, plot_confusion, plot_roc
from trainer.record import (
    METRICS_FILE,
    PREDICTIONS_FILE,
    format_summary,
    hardware,
    relative,
    write_metrics,
    write_predictions,
)
from trainer.train_config import TrainConfig
from worker.audit.metrics import summary
from worker.imaging.preprocess import PreprocessSettings

BEST_MODEL = "best.keras"


@dataclass
class TrainResult:
    out_dir: Path
    model_path: Path
    metrics: dict[str, Any]
    history: list[dict[str, float]] = field(default_factory=list)

    @property
    def threshold(self) -> float:
        return float(self.metrics["threshold"])


# --- steps 1 and 2: the images, preprocessed and split ------------------------------------


def preprocess_source(cfg: TrainConfig, settings: PreprocessSettings
                      ) -> tuple[np.ndarray, list[Sample], list[tuple[Sample, str]]]:
    """The source's images (a folder's own test split stays sealed; --limit takes whole
    patients) preprocessed once, before splitting, so an unreadable file simply drops out:
    (arrays, the samples kept, those skipped and why). Network fine-tuning reads uint8 (cast
    in the graph); the probe's features read float16."""
    samples = [s for s in discover(cfg.source, cfg.patient_regex) if s.split != "test"]
    if cfg.limit:
        samples = limit_samples(samples, cfg.limit, cfg.seed)
    if cfg.verbose:
        print(f"preprocessing {len(samples)} images at {cfg.size} px")
    progress = cfg.verbose if cfg.verbose else False
    if cfg.recipe.uint8:
        cache = Path(cfg.cache_dir) if cfg.cache_dir else None
        x_all, kept = cached_arrays(samples, settings, cache, cfg.preprocess_threads, progress)
        paths = {s.path for s in kept}
        return x_all, kept, [(s, "did not preprocess") for s in samples if s.path not in paths]
    return preprocess_samples(samples, settings, cfg.preprocess_threads, progress)


def split_images(cfg: TrainConfig, samples: list[Sample], x_all: np.ndarray
                 ) -> tuple[Split, str]:
    """Split by patient, each side with both classes; and the strategy's name."""
    strategy = split_strategy(samples)
    train_s, val_s = split_by_patient(samples, cfg.val_fraction, cfg.seed)
    for name, part in (("training", train_s), ("validation", val_s)):
        if len({s.label for s in part}) < 2:
            raise DatasetError(f"the {name} split lacks one class ({len(part)} images); "
                               "use more images or another --val-fraction")
    index = {s.path: i for i, s in enumerate(samples)}
    split = Split(x_all[[index[s.path] for s in train_s]], np.array([s.label for s in train_s]),
                  train_s, x_all[[index[s.path] for s in val_s]],
                  np.array([s.label for s in val_s]), val_s)
    return split, strategy


def machine_balance(cfg: TrainConfig, split: Split) -> np.ndarray | None:
    """With --machine-balanced-by: the training rows of machines lacking a class are dropped
    (from ``split``) and the weights that give every machine the same malignant share."""
    if not cfg.machine_column:
        return None
    machines = read_columns(cfg.source, split.train, [cfg.machine_column])[cfg.machine_column]
    keep, weight = machine_balanced_rows(split.y_train, machines)
    if cfg.verbose:
        print(f"machine-balanced: {int(keep.sum())} of {len(keep)} training images kept")
    split.x_train, split.y_train = split.x_train[keep], split.y_train[keep]
    return weight


# --- step 4: what the worker needs, chosen on the validation split -------------------------


def choose_on_validation(cfg: TrainConfig, split: Split, scores: np.ndarray
                         ) -> dict[str, Any]:
    """The operating points, the default threshold and how views combine, with the
    validation figures at image, breast and exam level."""
    y_val, val_s = split.y_val, split.val
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
    return {
        "threshold": threshold,
        "threshold_rule": f"highest threshold with validation sensitivity >= "
                          f"{cfg.sensitivity_target:.2f} (image level)",
        "operating_points": points,
        "default_operating_point": default_point,
        "aggregation": aggregation,
        "class_names": list(CLASS_NAMES),
        "validation": {
            "image": summary(y_val, scores, threshold),
            "breast": {**summary(by, bs, threshold),
                       "aggregate": f"{aggregation['breast']} score per breast"}
            if len(by) else None,
            "exam": {**summary(ey, es, threshold),
                     "aggregate": f"{aggregation['exam']} breast score per exam"}
            if len(ey) else None,
        },
    }


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

    # 1-2. The images, preprocessed once, and split by patient.
    x_all, samples, failed = preprocess_source(cfg, settings)
    for s, reason in failed:
        warnings.warn(f"skipped {s.path}: {reason}", stacklevel=2)
    split, strategy = split_images(cfg, samples, x_all)
    del x_all
    say(f"split by {strategy}: train {describe(split.train)}, "
        f"validation {describe(split.val)}")

    # 3. Fit the recipe; the model it leaves in best.keras is the one exported.
    best_path = out / BEST_MODEL
    weight = machine_balance(cfg, split)
    fitted: Fitted = cfg.recipe.build()(cfg, split, best_path, out, weight)

    # 4. Score the validation split with the saved model, as the worker will see it, and
    #    choose there the operating points and how views combine.
    best = load_trained(best_path)
    scores = predict(best, split.x_val, batch_size=batch_size)
    chosen = choose_on_validation(cfg, split, scores)
    threshold = chosen["threshold"]

    # 5. The record.
    base = source_folder(cfg.source)
    metrics: dict[str, Any] = {
        **chosen,
        "preprocess": asdict(settings),
        "best_epoch": fitted.best_epoch,
        "epochs_run": len({int(row["epoch"]) for row in fitted.history}),
        "split": {
            "strategy": strategy, "val_fraction": cfg.val_fraction, "seed": cfg.seed,
            "train": describe(split.train), "val": describe(split.val),
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
    write_predictions(out / PREDICTIONS_FILE, split.val, scores, threshold, base)
    plot_confusion(split.y_val, scores, threshold, out / "confusion.png")
    plot_roc(split.y_val, scores, threshold, out / "roc.png")
    plot_calibration(split.y_val, scores, out / "calibration.png")
    metrics["training"]["seconds"] = round(time.time() - started, 1)
    write_metrics(out / METRICS_FILE, metrics)
    say(format_summary(metrics))
    return TrainResult(out_dir=out, model_path=best_path, metrics=metrics,
                       history=fitted.history)
