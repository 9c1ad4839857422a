"""What `screen panel` judges, set up for :func:`trainer.panel.run_panel`: a linear probe on
cached frozen features (:func:`probe_panel`), or a network recipe of
:data:`trainer.recipes.PANEL_RECIPES` trained afresh for every fit (:func:`network_panel`).
Each returns the pool's panel data, the recipe as a ``fit_score`` and its record."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from trainer.dataset import DatasetError, discover
from trainer.panel import FitScore, PanelData
from trainer.recipes import PANEL_RECIPES, TOP

if TYPE_CHECKING:
    from worker.imaging.preprocess import PreprocessSettings

Judged = tuple[PanelData, FitScore, dict[str, Any]]


def probe_panel(source: Path, feature_files: Sequence[Path], site_column: str | None,
                machine_column: str | None, flip_train: bool, tta: bool) -> Judged:
    """A linear probe on the cached features (:mod:`trainer.features`), several files' columns
    side by side."""
    from trainer.features import load_feature_sets
    from trainer.probe import probe_fit_score

    samples, feats, settings = load_feature_sets(feature_files, source)
    if (flip_train or tta) and "flipped" not in feats:
        raise DatasetError("--flip-train and --tta need features extracted with --flip")
    data = PanelData.from_csv(source, samples, site_column, machine_column)
    patients = np.array([s.patient_id or str(s.path) for s in samples])
    fit_score = probe_fit_score(feats, data.y, patients, flip_train, tta)
    recipe = {"kind": "linear probe on frozen features",
              "features": [str(f) for f in feature_files],
              "preprocessing": [json.loads(s) for s in settings],
              "flip_train": flip_train, "tta": tta}
    return data, fit_score, recipe


def load_pool(source: str | Path, site_column: str | None, machine_column: str | None,
              cache: Path, preprocess: PreprocessSettings) -> tuple[np.ndarray, PanelData]:
    """The pool's images (uint8, preprocessed once and cached; the test split left out) and
    their panel data."""
    from trainer.arrays import cached_arrays

    samples = [s for s in discover(source) if s.split != "test"]
    x, samples = cached_arrays(samples, preprocess, cache)
    return x, PanelData.from_csv(source, samples, site_column, machine_column)


def network_panel(source: Path, name: str, *, size: int, intensity: str, cache: Path,
                  site_column: str | None, machine_column: str | None,
                  machine_balanced: bool, tta: bool, log: Path | None,
                  epochs: int | None = None, lr: float | None = None,
                  trainable_blocks: int = 0, members: int = 1,
                  intensity_augment: bool = True, bf16: bool = False) -> Judged:
    """The network recipe ``name`` (a key of :data:`~trainer.recipes.PANEL_RECIPES`) on the
    pool's images, preprocessed once (cached in ``cache``); each fit's test scores appended
    to ``log``. ``epochs`` and ``lr`` None: the recipe's own."""
    from worker.imaging.preprocess import PreprocessSettings

    recipe, network = PANEL_RECIPES[name]
    preprocess = PreprocessSettings(size=size, intensity=intensity)
    x, data = load_pool(source, site_column, machine_column, cache, preprocess)
    if log is not None:
        log.parent.mkdir(parents=True, exist_ok=True)
    given = {k: v for k, v in (("epochs", epochs), ("lr", lr)) if v is not None}
    preprocessing = json.loads(preprocess.to_json())
    if recipe is TOP:
        from trainer.top import TopConfig, build_front, cached_maps, top_fit_score

        top = TopConfig(size=size, trainable_blocks=trainable_blocks, tta=tta,
                        members=members, machine_balanced=machine_balanced, **given)
        plain, mirrored = cached_maps(build_front(top), x, top, cache,
                                      tag=preprocess.to_json())
        fit_score = top_fit_score(top, plain, mirrored, data.y, log, data.machines)
        return data, fit_score, {"kind": "top trained on cached maps", **top.to_dict(),
                                 "preprocessing": preprocessing}
    from trainer.finetune import FinetuneConfig, finetune_fit_score

    cfg = FinetuneConfig(arch=network or "lite0", size=size,
                         intensity_augment=intensity_augment, tta=tta, mixed_bfloat16=bf16,
                         machine_balanced=machine_balanced, **given)
    fit_score = finetune_fit_score(cfg, x, data.y, log, data.machines)
    return data, fit_score, {"kind": "network training", **cfg.to_dict(),
                             "preprocessing": preprocessing}
