"""A training run's settings (:class:`TrainConfig`), checked against its recipe
(:mod:`trainer.recipes`). Standard library only, so that the CLI checks them before Keras
is imported."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from trainer.recipes import SHIPPED, Recipe, recipe, taking

SHIPPED_TAPS = ("block15_project_bn",)


@dataclass
class TrainConfig:
    source: str | Path
    out_dir: str | Path
    arch: str = SHIPPED.name  # one of trainer.recipes.RECIPES
    size: int | None = None  # None: the recipe's
    epochs: int | None = None  # None: the recipe's; lite0-probe has no epochs
    batch_size: int | None = None
    lr: float | None = None  # None: the recipe's (Recipe.default_lr)
    weights: str | None = "pretrained"  # lite0 only: ImageNet weights, or None for random init
    crop: bool = False  # preprocessing: crop to the breast first
    orient: str = "none"  # preprocessing: "left" mirrors so the breast faces one way
    intensity: str = "percentile"  # preprocessing: worker.imaging.preprocess.INTENSITY_MODES
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
        own = recipe(self.arch)  # ValueError for an unknown one
        # The options each recipe takes, checked here once (the CLI shows these messages).
        if (self.trainable_blocks or self.members != 1) and "members" not in own.options:
            raise ValueError("--trainable-blocks and --members are for --arch "
                             + " and ".join(taking("members")))
        if self.machine_column and "machine_column" not in own.options:
            raise ValueError("--machine-balanced-by is for --arch "
                             + " and ".join(taking("machine_column")))
        self.size = self.size or own.size
        if self.trainable_blocks is None:  # recipes without the option have 0
            self.trainable_blocks = own.trainable_blocks

    @property
    def recipe(self) -> Recipe:
        return recipe(self.arch)

    def resolved(self) -> tuple[int, int, float]:
        """(epochs, batch size, learning rate) with the recipe's defaults filled in."""
        own = self.recipe
        return (self.epochs or own.epochs, self.batch_size or own.batch_size,
                self.lr or own.default_lr(self.weights))
