"""The recipe registry (trainer/recipes.py) is what `screen train`, TrainConfig and
`screen panel` read: names, defaults and the options only some recipes take."""

from __future__ import annotations

import click
import pytest

from trainer.commands import panel, train
from trainer.recipes import PANEL_RECIPES, RECIPES, SHIPPED, TOP
from trainer.train_config import TrainConfig


def _choices(command: click.Command, name: str) -> list[str]:
    param = next(p for p in command.params if p.name == name)
    assert isinstance(param.type, click.Choice)
    return list(param.type.choices)


def test_the_commands_offer_the_registered_recipes() -> None:
    assert _choices(train, "arch") == list(RECIPES) == ["lite0-probe", "lite0-ft", "lite0-top",
                                                        "cnn", "lite0"]
    assert _choices(panel, "finetune_arch") == list(PANEL_RECIPES) == ["lite0", "cnn",
                                                                       "lite0-top"]
    assert TrainConfig("labels.csv", "run").arch == SHIPPED.name == TOP.name


def test_train_config_fills_in_each_recipes_defaults() -> None:
    for recipe in RECIPES.values():
        cfg = TrainConfig("labels.csv", "run", arch=recipe.name)
        assert cfg.size == recipe.size
        assert cfg.trainable_blocks == recipe.trainable_blocks
        # TrainConfig takes a recipe's trainable_blocks as they are: only those taking
        # the option may train any.
        assert recipe.trainable_blocks == 0 or "trainable_blocks" in recipe.options
        assert cfg.resolved() == (recipe.epochs, recipe.batch_size, recipe.lr)
    top = TrainConfig("labels.csv", "run")
    assert (top.size, top.trainable_blocks, top.resolved()) == (384, 1, (6, 32, 1e-3))
    assert TrainConfig("labels.csv", "run", arch="lite0", weights=None).resolved()[2] == 1e-3
    assert TrainConfig("labels.csv", "run", arch="lite0").resolved()[2] == 3e-4
    given = TrainConfig("labels.csv", "run", arch="cnn", size=128, epochs=3, lr=0.1)
    assert (given.size, given.resolved()) == (128, (3, 32, 0.1))


def test_train_config_refuses_options_its_recipe_does_not_take() -> None:
    with pytest.raises(ValueError, match="unknown arch 'resnet': use one of lite0-probe, "
                                         "lite0-ft, lite0-top, cnn, lite0"):
        TrainConfig("labels.csv", "run", arch="resnet")
    with pytest.raises(ValueError, match="^--trainable-blocks and --members are for --arch "
                                         "lite0-top$"):
        TrainConfig("labels.csv", "run", arch="lite0-ft", members=2)
    with pytest.raises(ValueError, match="^--machine-balanced-by is for --arch lite0-ft and "
                                         "lite0-top$"):
        TrainConfig("labels.csv", "run", arch="cnn", machine_column="machine")
    TrainConfig("labels.csv", "run", arch="lite0-ft", machine_column="machine")


def test_every_recipe_names_a_builder_that_exists() -> None:
    pytest.importorskip("keras")
    for recipe in RECIPES.values():
        assert callable(recipe.build()), recipe.name
