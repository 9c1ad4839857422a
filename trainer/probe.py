"""The ``lite0-probe`` recipe: frozen EfficientNet-Lite0 ImageNet features + a logistic head.

Fine-tuning Lite0 costs ~13 min per epoch at 256 px on two CPU cores; a linear probe costs one
forward pass per image (two with mirrored copies) and a few seconds of Newton steps, and in
patient-grouped cross-validation it is the best recipe measured here (``models/EXPERIMENTS.md``).

The result is one ordinary Keras model, image -> score: the feature model of
:mod:`trainer.features` followed by a ``Dense(1, sigmoid)`` holding the logistic regression
with its standardisation folded in, so it saves, exports and serves like any other.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np
from keras import layers

from trainer.features import build_feature_model, build_tap_model, extract
from trainer.logistic import L2_GRID, LinearProbe, choose_l2, fit_probe
from trainer.panel import FitScore
from worker.scoring.model_metadata import OUTPUT_NAME


@dataclass(frozen=True)
class ProbeFit:
    model: keras.Model
    probe: LinearProbe
    l2_auc: dict[float, float]  # inner-CV AUC of each penalty tried


def build_probe_model(size: int, pooling: str, probe: LinearProbe | None = None,
                      weights: str | Path | None = "pretrained",
                      taps: Sequence[str] | None = None) -> keras.Model:
    """image (size, size, 1) -> score: the frozen feature model with ``pooling`` (or, with
    ``taps``, average and max pooling of each named backbone layer), then Dense(1, sigmoid)
    (holding ``probe`` when given)."""
    features = (build_tap_model(size, taps, weights) if taps
                else build_feature_model(size, weights, pooling))
    head = layers.Dense(1, activation="sigmoid", name=OUTPUT_NAME)
    outputs = head(features.output)
    if probe is not None:
        head.set_weights(list(probe.dense_weights()))
    return keras.Model(features.input, outputs, name=f"lite0_probe_{size}")


def fit_probe_model(x_train: np.ndarray, y_train: np.ndarray, groups: Sequence[str],
                    size: int, pooling: str = "avg", mirrored: bool = True,
                    l2_grid: Sequence[float] = L2_GRID, inner_folds: int = 3, seed: int = 0,
                    batch_size: int = 16, progress: bool = True,
                    taps: Sequence[str] | None = None) -> ProbeFit:
    """Extract features of the training images (and of their mirror images when ``mirrored``:
    the probe's flip augmentation), choose the penalty by an inner patient-grouped CV of the
    training data alone, fit, and return the whole image -> score model."""
    model = build_probe_model(size, pooling, taps=taps)
    # The model minus its head is the feature extractor: the fitted features are exactly the
    # ones the saved model computes.
    extractor = keras.Model(model.input, model.get_layer(OUTPUT_NAME).input)
    feats = extract(extractor, x_train, batch_size, progress=progress, label=" train")
    y, g = np.asarray(y_train), np.asarray(groups)
    if mirrored:
        flipped = extract(extractor, x_train, batch_size, flip=True, progress=progress,
                          label=" train mirrored")
        feats = np.vstack([feats, flipped])
        y, g = np.concatenate([y, y]), np.concatenate([g, g])
    feats = feats.astype(np.float64)
    l2, aucs = choose_l2(feats, y, g, l2_grid, inner_folds, seed)
    probe = fit_probe(feats, y, l2)
    model.get_layer(OUTPUT_NAME).set_weights(list(probe.dense_weights()))
    return ProbeFit(model, probe, dict(zip(sorted(l2_grid), aucs, strict=True)))


def probe_fit_score(feats: dict[str, np.ndarray], y: np.ndarray, patients: np.ndarray,
                    flip_train: bool = True, tta: bool = False,
                    l2_grid: Sequence[float] = L2_GRID, inner_folds: int = 3) -> FitScore:
    """The probe recipe on cached features (:func:`trainer.features.load_features`) as a
    panel ``fit_score``: the penalty chosen by an inner patient-grouped CV of the training
    rows alone, fitted (with the mirrored rows too when ``flip_train``), and the test rows'
    decision values returned (averaged with the mirrored rows' when ``tta``)."""

    def fit_score(tr: np.ndarray, te: np.ndarray, seed: int) -> np.ndarray:
        x, yy, groups = feats["plain"][tr], y[tr], patients[tr]
        if flip_train:
            x = np.vstack([x, feats["flipped"][tr]])
            yy, groups = np.concatenate([yy, yy]), np.concatenate([groups, groups])
        l2, _ = choose_l2(x, yy, groups, l2_grid, inner_folds, seed)
        probe: LinearProbe = fit_probe(x, yy, l2)
        d = probe.decision(feats["plain"][te])
        if tta:
            d = 0.5 * (d + probe.decision(feats["flipped"][te]))
        return d

    return fit_score
