"""The training recipes, each named once: what `screen train --arch` offers, what
:class:`trainer.train_config.TrainConfig` defaults and checks, which builder fits it, and what
`screen panel --finetune` can judge.

Standard library only: `screen --help` reads the choices from here without Keras. A
recipe's builder (step 3 of :func:`trainer.train.train`) is named as ``module:function`` and
imported when a run uses it.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Recipe:
    name: str  # the --arch value
    summary: str  # what it trains, for `screen train --help`
    builder: str  # "module:function" fitting it: (TrainConfig, Split, path, out, weight) -> Fitted
    epochs: int  # defaults, where the run does not say
    batch_size: int
    lr: float
    lr_random_init: float | None = None  # the lr without the ImageNet weights (None: lr)
    size: int = 256
    trainable_blocks: int = 0  # MBConv blocks trained, for the recipes that take the option
    # Trains on uint8 arrays (the cast to float in the graph), cached with --cache.
    uint8: bool = False
    # The TrainConfig options only some recipes take, that this one does.
    options: frozenset[str] = frozenset()

    def default_lr(self, weights: str | None) -> float:
        """Fine-tuning pretrained weights wants a gentler start than training from scratch."""
        return self.lr if weights or self.lr_random_init is None else self.lr_random_init

    def build(self) -> Callable[..., Any]:
        module, function = self.builder.split(":")
        return getattr(importlib.import_module(module), function)


PROBE = Recipe(
    "lite0-probe",
    "frozen Lite0 ImageNet features + logistic regression, no epochs (--no-augment drops "
    "the mirrored copies)",
    "trainer.fits:fit_probe", epochs=1, batch_size=16, lr=1e-3)
FINETUNE = Recipe(
    "lite0-ft",
    "Lite0 fine-tuned with in-graph augmentation, AdamW with warm-up and cosine decay, a "
    "fixed number of epochs, the last one kept",
    "trainer.fits:fit_finetuned", epochs=4, batch_size=16, lr=3e-4, uint8=True,
    options=frozenset({"machine_column"}))
TOP = Recipe(
    "lite0-top",
    "the frozen Lite0 front's maps computed once, the last --trainable-blocks blocks and an "
    "attention head trained on them",
    "trainer.fits:fit_top", epochs=6, batch_size=32, lr=1e-3, size=384, trainable_blocks=1,
    uint8=True,
    options=frozenset({"machine_column", "trainable_blocks", "members"}))
CNN = Recipe("cnn", "small CNN from scratch", "trainer.fits:fit_network", epochs=20,
             batch_size=32, lr=1e-3)
LITE0 = Recipe("lite0", "Lite0 fine-tuned, the epoch with the best validation AUC kept",
               "trainer.fits:fit_network", epochs=20, batch_size=32, lr=3e-4,
               lr_random_init=1e-3)

RECIPES = {r.name: r for r in (PROBE, FINETUNE, TOP, CNN, LITE0)}
SHIPPED = TOP

# `screen panel --finetune NAME`: the recipe judged, and the network it trains (its
# FinetuneConfig arch; None: the recipe has one network).
PANEL_RECIPES: dict[str, tuple[Recipe, str | None]] = {
    "lite0": (FINETUNE, "lite0"), "cnn": (FINETUNE, "cnn"), TOP.name: (TOP, None)}


def recipe(name: str) -> Recipe:
    """The recipe called ``name``; ValueError naming the others when there is none."""
    if name not in RECIPES:
        raise ValueError(f"unknown arch {name!r}: use one of {', '.join(RECIPES)}")
    return RECIPES[name]


def taking(option: str) -> list[str]:
    """The names of the recipes that take ``option`` (a TrainConfig field)."""
    return [r.name for r in RECIPES.values() if option in r.options]


def arch_help() -> str:
    """`screen train --arch`'s help: the shipped recipe first, then the others."""
    others = [r for r in RECIPES.values() if r is not SHIPPED]
    return "; ".join([f"{SHIPPED.name} (shipped): {SHIPPED.summary}",
                      *(f"{r.name}: {r.summary}" for r in others)]) + "."
