"""Levers of the top recipe under measurement (models/EXPERIMENTS.md), outside the shipped
recipe: :mod:`trainer.top` trains what ships, and these plug into its extension points
(:func:`trainer.top.fit`'s ``member``, :func:`trainer.top.top_fit_score`'s ``fit_top``).

* ``intensity_views``: intensity-augmented copies of every image (random gamma, contrast and
  noise, as :class:`trainer.layers.RandomIntensity` draws them), whose maps are cached beside
  the plain ones: the frozen front cannot be augmented per step, so the views are fixed draws.
* ``ema``: score with an exponential moving average of the weights.
* ``label_smoothing``.
* ``auxiliary_*``: a second head learning a reading of the image (e.g. breast density) or,
  reversed, a target the features should not carry (e.g. the machine); the fitted top keeps
  the score output alone.

Also what the lever scripts share: :func:`fits_done` and :func:`summary` (their pool:
:func:`trainer.panel_recipes.load_pool`).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import keras
import numpy as np
from keras import layers, ops

from trainer.fitting import balanced_sample_weights, compile_and_fit
from trainer.layers import RandomIntensity
from trainer.panel import FitScore
from trainer.top import (
    MapBatches,
    TopConfig,
    build_top,
    compute_maps,
    maps_paths,
    mirror,
    top_fit_score,
    top_optimizer,
)
from trainer.top import fit as fit_shipped
from worker.scoring.model_metadata import OUTPUT_NAME


@dataclass(frozen=True)
class LeverConfig(TopConfig):
    """The shipped :class:`~trainer.top.TopConfig` and the levers; their defaults leave them
    off, so ``LeverConfig()`` is the shipped recipe."""

    intensity_views: int = 0
    ema: bool = False  # score with an exponential moving average of the weights
    label_smoothing: float = 0.0
    # Weight of an auxiliary target's loss: a reading of the image (e.g. breast density)
    # predicted from the same pooled features where it is known, never a model input; the
    # saved model keeps the score output alone. 0: no auxiliary target.
    auxiliary_weight: float = 0.0
    # The auxiliary target is one the features should *not* carry (e.g. the machine): its
    # head still learns it, but its gradient reaches the shared layers reversed (domain-
    # adversarial training, Ganin & Lempitsky 2015), pushing them to forget it.
    auxiliary_reversed: bool = False
    # The reversed head reads the pooled features scaled to unit length: otherwise the shared
    # layers can raise its loss without bound just by growing the features, and training
    # comes apart. Normalised, they can only turn the features away from the machine.
    auxiliary_normalised: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.intensity_views < 0:
            raise ValueError("intensity_views must be at least 0")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ValueError("label_smoothing must be in [0, 0.5)")
        if self.auxiliary_weight < 0:
            raise ValueError("auxiliary_weight must be at least 0")
        if self.auxiliary_reversed and not self.auxiliary_weight:
            raise ValueError("auxiliary_reversed needs an auxiliary_weight above 0")
        if self.auxiliary_normalised and not self.auxiliary_reversed:
            raise ValueError("auxiliary_normalised is for an auxiliary_reversed target")


class GradientReversal(layers.Layer):
    """Identity forwards; the gradient backwards times -1. Written with ``stop_gradient`` (2x
    held constant, minus x) so that it needs no backend's custom-gradient API. Never in a
    saved model: the fitted top keeps the score output alone."""

    def call(self, x: keras.KerasTensor) -> keras.KerasTensor:
        return ops.stop_gradient(2.0 * x) - x


def build_lever_top(cfg: LeverConfig, in_shape: tuple[int, int, int],
                    weights: str | Path | None = "pretrained", seed: int | None = None,
                    name: str = "top", auxiliary_classes: int = 0) -> keras.Model:
    """:func:`trainer.top.build_top`; with ``auxiliary_classes``, a second output: that
    target's class probabilities, read from the pooled features the score reads."""
    top = build_top(cfg, in_shape, weights, seed, name)
    if not auxiliary_classes:
        return top
    score = top.get_layer(OUTPUT_NAME)
    pooled = score.input
    if cfg.auxiliary_reversed:
        pooled = GradientReversal(name="gradient_reversal")(pooled)
    if cfg.auxiliary_normalised:
        pooled = layers.UnitNormalization(name="auxiliary_unit_length")(pooled)
    auxiliary = layers.Dense(auxiliary_classes, activation="softmax",
                             kernel_initializer=score.kernel_initializer,
                             dtype="float32", name="auxiliary")(pooled)
    return keras.Model(top.inputs, [top.outputs[0], auxiliary], name=name)


def auxiliary_codes(values: Sequence[str]) -> tuple[np.ndarray, list[str]]:
    """Class codes of an auxiliary target's column (sorted classes; -1 where blank)."""
    classes = sorted({v for v in values if v})
    index = {c: i for i, c in enumerate(classes)}
    return np.array([index.get(v, -1) for v in values], np.int64), classes


def intensity_view_maps(front: keras.Model, x: np.ndarray, cfg: LeverConfig,
                        cache_dir: Path | None, tag: str = "", batch_size: int = 16,
                        progress: bool = True) -> list[np.ndarray]:
    """Maps of ``cfg.intensity_views`` intensity-augmented copies of the images (view k:
    its own fixed draw of gamma, contrast and noise; odd views mirrored), cached like
    :func:`trainer.top.cached_maps`."""
    kinds = [f"intensity{k}" for k in range(cfg.intensity_views)]
    paths = maps_paths(cfg, x, tag, cache_dir, kinds)
    out = []
    for k, kind in enumerate(kinds):
        augment = RandomIntensity(seed=k, dtype="float32")

        def transform(xb: np.ndarray, k: int = k, augment: RandomIntensity = augment
                      ) -> np.ndarray:
            xb = np.asarray(augment(xb, training=True), np.float32)
            return mirror(xb) if k % 2 else xb

        out.append(compute_maps(front, x, paths[k] if paths else None,
                                f"{kind} {cfg.size}px", transform, batch_size, progress))
    return out


class LeverBatches(MapBatches):
    """:class:`trainer.top.MapBatches` with more sources (plain, mirrored, then any
    intensity views, one drawn at random per image and epoch) and an auxiliary target."""

    def __init__(self, sources: Sequence[np.ndarray], rows: np.ndarray, y: np.ndarray,
                 weights: np.ndarray, batch_size: int, seed: int,
                 auxiliary: np.ndarray | None = None,
                 auxiliary_weights: np.ndarray | None = None) -> None:
        self.aux = None if auxiliary is None else np.asarray(auxiliary, np.int64)
        # Per-image weights of the auxiliary loss where its target is known (None: 1).
        self.aux_w = (np.ones(len(rows), np.float32) if auxiliary_weights is None
                      else np.asarray(auxiliary_weights, np.float32))
        super().__init__(sources, rows, y, weights, batch_size, seed)

    def draw_sources(self) -> np.ndarray:
        if len(self.sources) == 2:  # the draw the recorded plain/mirrored fits made
            return super().draw_sources()
        return self.rng.integers(0, len(self.sources), len(self.rows))

    def __getitem__(self, index: int) -> tuple[np.ndarray, Any, Any]:
        if self.aux is None:
            return super().__getitem__(index)
        pick = self.picked(index)
        # The auxiliary loss counts only where its target is known.
        aux = self.aux[pick]
        return (self.maps(pick), (self.y[pick], np.maximum(aux, 0)),
                (self.w[pick], (aux >= 0) * self.aux_w[pick]))


def fit_lever_member(cfg: LeverConfig, plain: np.ndarray, mirrored: np.ndarray,
                     rows: np.ndarray, y: np.ndarray, seed: int, name: str,
                     sample_weight: np.ndarray | None, verbose: int | str,
                     views: Sequence[np.ndarray] = (), auxiliary: np.ndarray | None = None
                     ) -> tuple[keras.Model, list[dict[str, float]]]:
    """:func:`trainer.top.fit_member` with the levers (a :class:`trainer.top.FitMember`)."""
    classes = 0 if auxiliary is None else max(2, int(np.max(auxiliary)) + 1)
    top = build_lever_top(cfg, plain.shape[1:], seed=seed, name=name,
                          auxiliary_classes=classes)
    # A reversed target learns under the machine-balancing weights when they are given:
    # the label then tells nothing about the machine in the adversary's data, so
    # forgetting the machine cannot take the label's own signal with it.
    adversary_weights = (sample_weight / np.mean(sample_weight)
                         if cfg.auxiliary_reversed and sample_weight is not None else None)
    data = LeverBatches([plain, mirrored, *views], rows, y,
                        balanced_sample_weights(y, sample_weight), cfg.batch_size, seed,
                        auxiliary, adversary_weights)
    loss = keras.losses.BinaryCrossentropy(label_smoothing=cfg.label_smoothing)
    logs = compile_and_fit(
        top, data, cfg.epochs, top_optimizer(cfg, len(data), use_ema=cfg.ema),
        [loss, keras.losses.SparseCategoricalCrossentropy()] if classes else loss,
        verbose=verbose, loss_weights=[1.0, cfg.auxiliary_weight] if classes else None)
    if classes:  # the score alone is kept
        top = keras.Model(top.inputs, top.outputs[0], name=name)
    return top, logs


def fit(cfg: LeverConfig, plain: np.ndarray, mirrored: np.ndarray, rows: np.ndarray,
        y: np.ndarray, seed: int, sample_weight: np.ndarray | None = None,
        verbose: int | str = 0, views: Sequence[np.ndarray] = (),
        auxiliary: np.ndarray | None = None,
        logs: list[dict[str, float]] | None = None) -> keras.Model:
    """:func:`trainer.top.fit` with the levers (``views``: :func:`intensity_view_maps`;
    ``auxiliary``: the auxiliary target's codes of ``rows``, :func:`auxiliary_codes`)."""
    if len(views) != cfg.intensity_views:
        raise ValueError(f"the recipe trains on {cfg.intensity_views} intensity views, "
                         f"{len(views)} given")
    if (auxiliary is not None) != (cfg.auxiliary_weight > 0):
        raise ValueError("an auxiliary target goes with auxiliary_weight > 0, and only then")
    return fit_shipped(cfg, plain, mirrored, rows, y, seed, sample_weight, verbose, logs,
                       member=partial(fit_lever_member, views=views, auxiliary=auxiliary))


def lever_fit_score(cfg: LeverConfig, plain: np.ndarray, mirrored: np.ndarray, y: np.ndarray,
                    log: Path | None = None, machines: np.ndarray | None = None,
                    views: Sequence[np.ndarray] = (), auxiliary: np.ndarray | None = None
                    ) -> FitScore:
    """:func:`trainer.top.top_fit_score` with the levers (``auxiliary``: codes of every
    image)."""

    def fit_rows(cfg: LeverConfig, plain: np.ndarray, mirrored: np.ndarray, rows: np.ndarray,
                 y: np.ndarray, seed: int, sample_weight: np.ndarray | None = None
                 ) -> keras.Model:
        return fit(cfg, plain, mirrored, rows, y, seed, sample_weight=sample_weight,
                   views=views, auxiliary=None if auxiliary is None else auxiliary[rows])

    return top_fit_score(cfg, plain, mirrored, y, log, machines, fit_top=fit_rows)


# --- what the lever scripts share ---------------------------------------------------------


def fits_done(path: Path) -> set[tuple[str, int]]:
    """(lever, seed) of the fits already appended to ``path`` (JSON lines), so that a rerun
    skips them; none when there is no such file."""
    if not path.is_file():
        return set()
    return {(r["lever"], r["seed"]) for r in map(json.loads, path.read_text().splitlines())}


def summary(path: Path) -> str:
    """Markdown: per lever and held-out site, the image (and breast) AUC's mean over seeds
    and its range, and the mean over seeds of each seed's worse direction."""
    rows: dict[str, list[dict]] = {}
    for r in map(json.loads, path.read_text().splitlines()):
        rows.setdefault(r["lever"], []).append(r)
    sites = sorted({s for rs in rows.values() for r in rs for s in r["leave_one_site_out"]})
    head = ["lever", "seeds", *(f"site {s}: image mean (min-max) / breast mean"
                                for s in sites), "worse direction, mean"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for lever, rs in rows.items():
        cells = [lever, str(len(rs))]
        for s in sites:
            img = np.array([r["leave_one_site_out"][s]["image_auc"] for r in rs])
            br = np.array([r["leave_one_site_out"][s]["breast_auc"] for r in rs])
            cells.append(f"{img.mean():.3f} ({img.min():.3f}-{img.max():.3f}) / {br.mean():.3f}")
        worse = [min(r["leave_one_site_out"][s]["image_auc"] for s in sites) for r in rs]
        cells.append(f"{np.mean(worse):.3f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
