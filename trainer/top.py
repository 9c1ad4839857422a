"""The top recipe: a frozen Lite0 front run once per image, its spatial maps cached, and only
the top of the network trained on them.

Full fine-tuning costs 25-45 min per fit at 256 px on two CPU cores, so a panel of twelve fits
takes most of a day, and higher resolution is out of reach. Frozen features pooled over the
whole image are cheap but lose a small lesion in the average, and resolution did not help them
(256 -> 512 px: 0.647 -> 0.636 pooled AUC). Here the expensive front (stem and the first
``16 - trainable_blocks`` MBConv blocks, ImageNet weights, frozen) runs once per image and
once more mirrored; what is trained is:

* the last ``trainable_blocks`` MBConv blocks (0: none), from their ImageNet weights, and
* a gated-attention pooling head (Ilse et al., 2018) over the 320-channel maps of block 15:
  every map position gets a learned weight, so the head can look at the few positions where
  a lesion is, at a resolution where it spans more than one position.

Each fit then costs seconds (head only) to minutes, so the panel runs at 512-640 px here.
The model that ships is :func:`compose`: front and top in one Keras model, image in, score out,
exported like any other.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import keras
import numpy as np
from keras import layers, ops

from trainer.efficientnet_lite import (
    LITE0_BLOCKS,
    block_output_name,
    build_lite0_blocks,
    copy_weights,
    grey_to_normalised_rgb,
    lite0_backbone,
)
from trainer.fitting import balanced_sample_weights, compile_and_fit, cosine_schedule
from trainer.panel import FitScore, network_fit_score
from worker.scoring.model_metadata import INPUT_NAME, OUTPUT_NAME


@dataclass(frozen=True)
class TopConfig:
    # The defaults are the shipped recipe (models/MODEL_CARD.md): its panel has the best worst case.
    size: int = 384
    trainable_blocks: int = 1  # of the 16 MBConv blocks, counted from the last
    epochs: int = 6
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 1e-4
    attention_dim: int = 128
    dropout: float = 0.25
    tta: bool = True  # score = mean over the image and its mirror image
    machine_balanced: bool = False  # weight training images so machines carry no label signal
    # Tops trained on the same maps with different seeds, their scores averaged: one fit's
    # new-site AUC moves by ~0.03 with the seed; the front is shared, so a member costs
    # only its trained blocks and head.
    members: int = 1
    # Levers under measurement (models/EXPERIMENTS.md); the defaults leave them off.
    # Intensity-augmented copies of every image (random gamma, contrast and noise, as
    # :class:`trainer.finetune.RandomIntensity` draws them), whose maps are cached beside the
    # plain ones: the frozen front cannot be augmented per step, so the views are fixed draws.
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
    # layers can raise its loss without bound just by growing the features (measured: its
    # loss 100-360 against ln 6 = 1.8 at chance, and the score's own loss 25), and training
    # comes apart. Normalised, they can only turn the features away from the machine.
    auxiliary_normalised: bool = False

    def __post_init__(self) -> None:
        if not 0 <= self.trainable_blocks < LITE0_BLOCKS:
            raise ValueError(f"trainable_blocks must be 0..{LITE0_BLOCKS - 1}")
        if self.members < 1:
            raise ValueError("members must be at least 1")
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

    @property
    def first_trained(self) -> int:
        """Index of the first trained MBConv block (16: none, the head alone)."""
        return LITE0_BLOCKS - self.trainable_blocks

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


# --- the network, split --------------------------------------------------------------------


def build_front(cfg: TopConfig, weights: str | Path | None = "pretrained") -> keras.Model:
    """image (size, size, 1) in [0, 1] -> the maps entering the first trained block (or, with
    no trained blocks, block 15's 320-channel output). Frozen."""
    backbone = lite0_backbone(cfg.size, weights)
    cut = backbone.get_layer(block_output_name(backbone, cfg.first_trained - 1)).output
    front = keras.Model(backbone.input, cut, name="lite0_front")
    front.trainable = False
    inputs = keras.Input(shape=(cfg.size, cfg.size, 1), name=INPUT_NAME)
    return keras.Model(inputs, front(grey_to_normalised_rgb(inputs)), name="front")


@keras.saving.register_keras_serializable(package="mammo_screen")
class AttentionPool(layers.Layer):
    """Softmax-weighted sum over map positions: (B, H, W, C) values and (B, H, W, 1) logits
    -> (B, C). The weights sum to 1 per image, so the head can attend to a single position."""

    def call(self, values: keras.KerasTensor, logits: keras.KerasTensor) -> keras.KerasTensor:
        shape = ops.shape(values)
        v = ops.reshape(values, (shape[0], -1, shape[3]))
        w = ops.softmax(ops.reshape(logits, (shape[0], -1, 1)), axis=1)
        return ops.sum(v * w, axis=1)


@keras.saving.register_keras_serializable(package="mammo_screen")
class GradientReversal(layers.Layer):
    """Identity forwards; the gradient backwards times -1. Written with ``stop_gradient`` (2x
    held constant, minus x) so that it needs no backend's custom-gradient API."""

    def call(self, x: keras.KerasTensor) -> keras.KerasTensor:
        return ops.stop_gradient(2.0 * x) - x


def build_top(cfg: TopConfig, in_shape: tuple[int, int, int],
              weights: str | Path | None = "pretrained", seed: int | None = None,
              name: str = "top", auxiliary_classes: int = 0) -> keras.Model:
    """maps -> score: the trained blocks (ImageNet-initialised) and the gated-attention head;
    with ``auxiliary_classes``, a second output: that target's class probabilities."""
    inputs = keras.Input(shape=in_shape, name="maps")
    x = inputs
    if cfg.trainable_blocks:
        blocks = build_lite0_blocks(in_shape, cfg.first_trained)
        copy_weights(lite0_backbone(cfg.size, weights), blocks)
        x = blocks(x)
    init = keras.initializers.GlorotUniform(seed)
    h = layers.Conv2D(cfg.attention_dim, 1, activation="relu", kernel_initializer=init,
                      name="attention_embed")(x)
    h = layers.Dropout(cfg.dropout, seed=seed, name="attention_dropout")(h)
    v = layers.Conv2D(cfg.attention_dim // 2, 1, activation="tanh", kernel_initializer=init,
                      name="attention_v")(h)
    u = layers.Conv2D(cfg.attention_dim // 2, 1, activation="sigmoid", kernel_initializer=init,
                      name="attention_u")(h)
    logits = layers.Conv2D(1, 1, kernel_initializer=init, name="attention_logits")(
        layers.Multiply(name="attention_gate")([v, u]))
    pooled = AttentionPool(name="attention_pool")(h, logits)
    pooled = layers.Dropout(cfg.dropout, seed=seed, name="dropout")(pooled)
    # Seeded like every other layer: an unseeded initializer draws from Keras's global seed
    # generator, so a fit would depend on what the process drew before it.
    outputs = layers.Dense(1, activation="sigmoid", kernel_initializer=init, dtype="float32",
                           name=OUTPUT_NAME)(pooled)
    if not auxiliary_classes:
        return keras.Model(inputs, outputs, name=name)
    if cfg.auxiliary_reversed:
        pooled = GradientReversal(name="gradient_reversal")(pooled)
    if cfg.auxiliary_normalised:
        pooled = layers.UnitNormalization(name="auxiliary_unit_length")(pooled)
    auxiliary = layers.Dense(auxiliary_classes, activation="softmax", kernel_initializer=init,
                             dtype="float32", name="auxiliary")(pooled)
    return keras.Model(inputs, [outputs, auxiliary], name=name)


def auxiliary_codes(values: Sequence[str]) -> tuple[np.ndarray, list[str]]:
    """Class codes of an auxiliary target's column (sorted classes; -1 where blank)."""
    classes = sorted({v for v in values if v})
    index = {c: i for i, c in enumerate(classes)}
    return np.array([index.get(v, -1) for v in values], np.int64), classes


@keras.saving.register_keras_serializable(package="mammo_screen")
class WithMirrorImages(layers.Layer):
    """(B, H, W, C) -> (2B, H, W, C): the images, then the same images mirrored left-right."""

    def call(self, x: keras.KerasTensor) -> keras.KerasTensor:
        return ops.concatenate([x, ops.flip(x, axis=2)], axis=0)


@keras.saving.register_keras_serializable(package="mammo_screen")
class MeanOfHalves(layers.Layer):
    """(2B, 1) -> (B, 1): the mean of row i and row B + i (an image and its mirror image)."""

    def call(self, s: keras.KerasTensor) -> keras.KerasTensor:
        half = ops.shape(s)[0] // 2
        return 0.5 * (s[:half] + s[half:])


def compose(front: keras.Model, top: keras.Model, tta: bool = False) -> keras.Model:
    """The model that is saved and exported: image in [0, 1] -> score; with ``tta`` the mean
    of the image's and its mirror image's scores (as the panel scores with ``tta``). The
    mirror images ride in the same batch, so the graph holds each layer once (ONNX Runtime's
    quantiser failed on a graph that ran the network twice side by side)."""
    size = front.input_shape[1]
    inputs = keras.Input(shape=(size, size, 1), name=INPUT_NAME)
    if not tta:
        return keras.Model(inputs, top(front(inputs)), name=f"lite0_top_{size}")
    scores = top(front(WithMirrorImages(name="with_mirror_images")(inputs)))
    return keras.Model(inputs, MeanOfHalves(name=OUTPUT_NAME)(scores),
                       name=f"lite0_top_{size}")


# --- maps, computed once -------------------------------------------------------------------


def _maps_key(cfg: TopConfig, x: np.ndarray, tag: str) -> str:
    h = hashlib.sha256(f"{cfg.size}:{cfg.first_trained}:{tag}:{x.shape}".encode())
    # A strided sample of the pixels identifies the images without hashing gigabytes.
    h.update(np.ascontiguousarray(x.reshape(len(x), -1)[:, ::4099]).tobytes())
    return h.hexdigest()[:16]


def _maps(front: keras.Model, x: np.ndarray, path: Path | None, what: str,
          transform: Callable[[np.ndarray], np.ndarray], batch_size: int,
          progress: bool) -> np.ndarray:
    """float16 maps of ``transform``(images in [0, 1]): read from ``path`` when it is there,
    else computed and, with a ``path``, written there (via a partial file, so that a run cut
    short leaves no cache that looks whole)."""
    if path is not None and path.is_file():
        return np.load(path, mmap_mode="r")
    shape = (len(x), *front.output_shape[1:])
    tmp = path.with_suffix(".partial.npy") if path else None
    arr = (np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float16, shape=shape)
           if tmp else np.empty(shape, np.float16))
    started, step = time.time(), max(1, len(x) // 10)
    for i in range(0, len(x), batch_size):
        xb = transform(np.asarray(x[i:i + batch_size], np.float32) / 255.0)
        arr[i:i + len(xb)] = np.asarray(front.predict_on_batch(xb), np.float16)
        done = i + len(xb)
        if progress and (done // step != i // step or done == len(x)):
            rate = done / max(time.time() - started, 1e-9)
            print(f"maps {what}: {done}/{len(x)} ({rate:.1f} img/s)", flush=True)
    if tmp is None or path is None:
        return arr
    arr.flush()
    del arr
    tmp.rename(path)
    return np.load(path, mmap_mode="r")


def _mirror(xb: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(xb[:, :, ::-1])


def _maps_paths(cfg: TopConfig, x: np.ndarray, tag: str, cache_dir: Path | None,
                kinds: Sequence[str]) -> list[Path] | None:
    if cache_dir is None:
        return None
    key = _maps_key(cfg, x, tag)
    cache_dir.mkdir(parents=True, exist_ok=True)
    return [cache_dir / f"maps-{cfg.size}-b{cfg.first_trained}-{key}-{k}.npy" for k in kinds]


def cached_maps(front: keras.Model, x: np.ndarray, cfg: TopConfig, cache_dir: Path | None,
                tag: str = "", batch_size: int = 16, progress: bool = True
                ) -> tuple[np.ndarray, np.ndarray]:
    """float16 maps of the uint8 images ``x`` and of their mirror images, computed once and
    kept (memory-mapped .npy) in ``cache_dir`` per (images, size, cut); None: not kept."""
    paths = _maps_paths(cfg, x, tag, cache_dir, ("plain", "mirrored"))
    out = []
    for k, (kind, transform) in enumerate((("plain", lambda b: b), ("mirrored", _mirror))):
        out.append(_maps(front, x, paths[k] if paths else None, f"{kind} {cfg.size}px",
                         transform, batch_size, progress))
    return out[0], out[1]


def intensity_view_maps(front: keras.Model, x: np.ndarray, cfg: TopConfig,
                        cache_dir: Path | None, tag: str = "", batch_size: int = 16,
                        progress: bool = True) -> list[np.ndarray]:
    """Maps of ``cfg.intensity_views`` intensity-augmented copies of the images (view k:
    its own fixed draw of gamma, contrast and noise; odd views mirrored), cached like
    :func:`cached_maps`."""
    from trainer.finetune import RandomIntensity

    kinds = [f"intensity{k}" for k in range(cfg.intensity_views)]
    paths = _maps_paths(cfg, x, tag, cache_dir, kinds)
    out = []
    for k, kind in enumerate(kinds):
        augment = RandomIntensity(seed=k, dtype="float32")

        def transform(xb: np.ndarray, k: int = k, augment: RandomIntensity = augment
                      ) -> np.ndarray:
            xb = np.asarray(augment(xb, training=True), np.float32)
            return _mirror(xb) if k % 2 else xb

        out.append(_maps(front, x, paths[k] if paths else None, f"{kind} {cfg.size}px",
                         transform, batch_size, progress))
    return out


# --- fit and score -------------------------------------------------------------------------


class MapBatches(keras.utils.PyDataset):
    """Training batches of cached maps: every image once per epoch, from one of ``sources``
    at random (plain or mirrored: the flip augmentation, precomputed; then any intensity
    views), with per-image weights."""

    def __init__(self, sources: Sequence[np.ndarray], rows: np.ndarray, y: np.ndarray,
                 weights: np.ndarray, batch_size: int, seed: int,
                 auxiliary: np.ndarray | None = None,
                 auxiliary_weights: np.ndarray | None = None) -> None:
        super().__init__()
        self.sources, self.rows = list(sources), np.asarray(rows)
        self.y, self.w = np.asarray(y, np.float32), np.asarray(weights, np.float32)
        self.aux = None if auxiliary is None else np.asarray(auxiliary, np.int64)
        # Per-image weights of the auxiliary loss where its target is known (None: 1).
        self.aux_w = (np.ones(len(self.rows), np.float32) if auxiliary_weights is None
                      else np.asarray(auxiliary_weights, np.float32))
        self.batch_size = batch_size
        self.rng = np.random.default_rng(seed)
        self._shuffle()

    def _shuffle(self) -> None:
        self.order = self.rng.permutation(len(self.rows))
        if len(self.sources) == 2:  # the draw the recorded plain/mirrored fits made
            self.source = (self.rng.random(len(self.rows)) < 0.5).astype(np.int64)
        else:
            self.source = self.rng.integers(0, len(self.sources), len(self.rows))

    def __len__(self) -> int:
        return max(len(self.rows) // self.batch_size, 1)

    def __getitem__(self, index: int) -> tuple[np.ndarray, Any, Any]:
        pick = np.sort(self.order[index * self.batch_size:(index + 1) * self.batch_size])
        rows, source = self.rows[pick], self.source[pick]
        xb = np.empty((len(pick), *self.sources[0].shape[1:]), np.float32)
        for j, (r, k) in enumerate(zip(rows, source, strict=True)):
            xb[j] = self.sources[k][r]
        if self.aux is None:
            return xb, self.y[pick], self.w[pick]
        # The auxiliary loss counts only where its target is known.
        aux = self.aux[pick]
        return (xb, (self.y[pick], np.maximum(aux, 0)),
                (self.w[pick], (aux >= 0) * self.aux_w[pick]))

    def on_epoch_end(self) -> None:
        self._shuffle()


def member_seeds(seed: int, members: int) -> list[int]:
    """The seeds of an ensemble's members; the first is ``seed`` itself, so that one member
    is exactly the single top."""
    return [seed + 1_000_003 * k for k in range(members)]


def fit(cfg: TopConfig, plain: np.ndarray, mirrored: np.ndarray, rows: np.ndarray,
        y: np.ndarray, seed: int, sample_weight: np.ndarray | None = None,
        verbose: int | str = 0, views: Sequence[np.ndarray] = (),
        auxiliary: np.ndarray | None = None,
        logs: list[dict[str, float]] | None = None) -> keras.Model:
    """A fresh top trained for ``cfg.epochs`` on the maps of ``rows`` (labels ``y`` of those
    rows; ``views``: :func:`intensity_view_maps`; ``auxiliary``: the auxiliary target's codes
    of those rows, :func:`auxiliary_codes`): AdamW, cosine decay after a 10% warm-up,
    balanced class weights (times ``sample_weight``). With ``cfg.members`` > 1, that many
    tops (seeds :func:`member_seeds`) in one model that scores the mean of theirs. ``logs``,
    when given, receives one row per epoch and member."""
    if len(views) != cfg.intensity_views:
        raise ValueError(f"the recipe trains on {cfg.intensity_views} intensity views, "
                         f"{len(views)} given")
    if (auxiliary is not None) != (cfg.auxiliary_weight > 0):
        raise ValueError("an auxiliary target goes with auxiliary_weight > 0, and only then")
    classes = 0 if auxiliary is None else max(2, int(np.max(auxiliary)) + 1)
    loss = keras.losses.BinaryCrossentropy(label_smoothing=cfg.label_smoothing)
    tops = []
    for k, member_seed in enumerate(member_seeds(seed, cfg.members)):
        keras.utils.set_random_seed(member_seed)
        name = "top" if cfg.members == 1 else f"top_{k}"
        top = build_top(cfg, plain.shape[1:], seed=member_seed, name=name,
                        auxiliary_classes=classes)
        # A reversed target learns under the machine-balancing weights when they are given:
        # the label then tells nothing about the machine in the adversary's data, so
        # forgetting the machine cannot take the label's own signal with it.
        adversary_weights = (sample_weight / np.mean(sample_weight)
                             if cfg.auxiliary_reversed and sample_weight is not None else None)
        data = MapBatches([plain, mirrored, *views], rows, y,
                          balanced_sample_weights(y, sample_weight), cfg.batch_size,
                          member_seed, auxiliary, adversary_weights)
        schedule = cosine_schedule(cfg.lr, cfg.epochs * len(data), warmup_fraction=0.1,
                                   alpha=0.01)
        epoch_logs = compile_and_fit(
            top, data, cfg.epochs,
            keras.optimizers.AdamW(schedule, weight_decay=cfg.weight_decay, use_ema=cfg.ema),
            [loss, keras.losses.SparseCategoricalCrossentropy()] if classes else loss,
            verbose=verbose, loss_weights=[1.0, cfg.auxiliary_weight] if classes else None)
        if logs is not None:
            logs.extend(row | {"member": k} for row in epoch_logs)
        if classes:  # the score alone is kept
            top = keras.Model(top.inputs, top.outputs[0], name=name)
        tops.append(top)
    if len(tops) == 1:
        return tops[0]
    maps = keras.Input(shape=plain.shape[1:], name="maps")
    mean = layers.Average(name="members_mean")([t(maps) for t in tops])
    return keras.Model(maps, mean, name="top")


def score(top: keras.Model, plain: np.ndarray, mirrored: np.ndarray, rows: np.ndarray,
          tta: bool = True, batch_size: int = 64) -> np.ndarray:
    """Scores of ``rows``; with ``tta`` the mean with their mirror images' scores."""
    out = np.zeros(len(rows), np.float64)
    sources: Sequence[np.ndarray] = (plain, mirrored) if tta else (plain,)
    for i in range(0, len(rows), batch_size):
        r = np.asarray(rows[i:i + batch_size])
        out[i:i + len(r)] = np.mean([
            np.asarray(top.predict_on_batch(np.asarray(src[r], np.float32)),
                       np.float64).reshape(-1) for src in sources], axis=0)
    return out


def top_fit_score(cfg: TopConfig, plain: np.ndarray, mirrored: np.ndarray, y: np.ndarray,
                  log: Path | None = None, machines: np.ndarray | None = None,
                  views: Sequence[np.ndarray] = (), auxiliary: np.ndarray | None = None
                  ) -> FitScore:
    """The recipe as a panel ``fit_score`` (:func:`trainer.panel.network_fit_score`: each
    fit's test scores appended to ``log``; ``cfg.machine_balanced`` weights by ``machines``)."""

    def fit_and_score(tr: np.ndarray, te: np.ndarray, weight: np.ndarray | None,
                      seed: int) -> np.ndarray:
        started = time.time()
        top = fit(cfg, plain, mirrored, tr, y[tr], seed, sample_weight=weight, views=views,
                  auxiliary=None if auxiliary is None else auxiliary[tr])
        scores = score(top, plain, mirrored, te, cfg.tta)
        print(f"fit on {len(tr)} images in {time.time() - started:.0f}s", flush=True)
        keras.backend.clear_session()
        return scores

    return network_fit_score(fit_and_score, y, machines, cfg.machine_balanced, log)
