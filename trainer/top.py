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
from typing import Any, Protocol

import keras
import numpy as np
from keras import layers

from trainer.efficientnet_lite import (
    LITE0_BLOCKS,
    block_output_name,
    build_lite0_blocks,
    copy_weights,
    grey_to_normalised_rgb,
    lite0_backbone,
)
from trainer.fitting import balanced_sample_weights, compile_and_fit, cosine_schedule
from trainer.layers import AttentionPool, MeanOfHalves, WithMirrorImages
from trainer.panel import FitScore, network_fit_score
from trainer.recipes import TOP
from worker.scoring.model_metadata import INPUT_NAME, OUTPUT_NAME


@dataclass(frozen=True)
class TopConfig:
    # The defaults are the shipped recipe (models/MODEL_CARD.md): its panel has the best worst case.
    size: int = TOP.size
    trainable_blocks: int = TOP.trainable_blocks  # of the 16 MBConv blocks, counted from the last
    epochs: int = TOP.epochs
    batch_size: int = TOP.batch_size
    lr: float = TOP.lr
    weight_decay: float = 1e-4
    attention_dim: int = 128
    dropout: float = 0.25
    tta: bool = True  # score = mean over the image and its mirror image
    machine_balanced: bool = False  # weight training images so machines carry no label signal
    # Tops trained on the same maps with different seeds, their scores averaged: one fit's
    # new-site AUC moves by ~0.03 with the seed; the front is shared, so a member costs
    # only its trained blocks and head.
    members: int = 1

    def __post_init__(self) -> None:
        if not 0 <= self.trainable_blocks < LITE0_BLOCKS:
            raise ValueError(f"trainable_blocks must be 0..{LITE0_BLOCKS - 1}")
        if self.members < 1:
            raise ValueError("members must be at least 1")

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


def build_top(cfg: TopConfig, in_shape: tuple[int, int, int],
              weights: str | Path | None = "pretrained", seed: int | None = None,
              name: str = "top") -> keras.Model:
    """maps -> score: the trained blocks (ImageNet-initialised) and the gated-attention head.
    The score layer's input is the pooled features (a research head can read them too)."""
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
    return keras.Model(inputs, outputs, name=name)


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


def compute_maps(front: keras.Model, x: np.ndarray, path: Path | None, what: str,
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


def mirror(xb: np.ndarray) -> np.ndarray:
    """Images mirrored left-right."""
    return np.ascontiguousarray(xb[:, :, ::-1])


def maps_paths(cfg: TopConfig, x: np.ndarray, tag: str, cache_dir: Path | None,
               kinds: Sequence[str]) -> list[Path] | None:
    """Where the maps of each kind (plain, mirrored, ...) of ``x`` are cached; None: not."""
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
    paths = maps_paths(cfg, x, tag, cache_dir, ("plain", "mirrored"))
    out = []
    for k, (kind, transform) in enumerate((("plain", lambda b: b), ("mirrored", mirror))):
        out.append(compute_maps(front, x, paths[k] if paths else None, f"{kind} {cfg.size}px",
                                transform, batch_size, progress))
    return out[0], out[1]


# --- fit and score -------------------------------------------------------------------------


class MapBatches(keras.utils.PyDataset):
    """Training batches of cached maps: every image once per epoch, plain or mirrored at
    random (the flip augmentation, precomputed), with per-image weights."""

    def __init__(self, sources: Sequence[np.ndarray], rows: np.ndarray, y: np.ndarray,
                 weights: np.ndarray, batch_size: int, seed: int) -> None:
        super().__init__()
        self.sources, self.rows = list(sources), np.asarray(rows)
        self.y, self.w = np.asarray(y, np.float32), np.asarray(weights, np.float32)
        self.batch_size = batch_size
        self.rng = np.random.default_rng(seed)
        self._shuffle()

    def _shuffle(self) -> None:
        self.order = self.rng.permutation(len(self.rows))
        self.source = self.draw_sources()

    def draw_sources(self) -> np.ndarray:
        """Which source each image comes from this epoch: plain or mirrored, at even odds."""
        return (self.rng.random(len(self.rows)) < 0.5).astype(np.int64)

    def __len__(self) -> int:
        return max(len(self.rows) // self.batch_size, 1)

    def maps(self, pick: np.ndarray) -> np.ndarray:
        """The maps of the images at positions ``pick``, each from its drawn source."""
        rows, source = self.rows[pick], self.source[pick]
        xb = np.empty((len(pick), *self.sources[0].shape[1:]), np.float32)
        for j, (r, k) in enumerate(zip(rows, source, strict=True)):
            xb[j] = self.sources[k][r]
        return xb

    def picked(self, index: int) -> np.ndarray:
        return np.sort(self.order[index * self.batch_size:(index + 1) * self.batch_size])

    def __getitem__(self, index: int) -> tuple[np.ndarray, Any, Any]:
        pick = self.picked(index)
        return self.maps(pick), self.y[pick], self.w[pick]

    def on_epoch_end(self) -> None:
        self._shuffle()


def member_seeds(seed: int, members: int) -> list[int]:
    """The seeds of an ensemble's members; the first is ``seed`` itself, so that one member
    is exactly the single top."""
    return [seed + 1_000_003 * k for k in range(members)]


class FitMember(Protocol):
    """Trains one member top (built, its global seed already set) and returns it, score
    output alone, with its per-epoch logs: the extension point where research varies how a
    top is trained (research/top_levers.py)."""

    def __call__(self, cfg: TopConfig, plain: np.ndarray, mirrored: np.ndarray,
                 rows: np.ndarray, y: np.ndarray, seed: int, name: str,
                 sample_weight: np.ndarray | None, verbose: int | str
                 ) -> tuple[keras.Model, list[dict[str, float]]]: ...


def fit_member(cfg: TopConfig, plain: np.ndarray, mirrored: np.ndarray, rows: np.ndarray,
               y: np.ndarray, seed: int, name: str, sample_weight: np.ndarray | None,
               verbose: int | str) -> tuple[keras.Model, list[dict[str, float]]]:
    """The shipped recipe's member: AdamW, cosine decay after a 10% warm-up, balanced class
    weights (times ``sample_weight``), each image plain or mirrored at random per epoch."""
    top = build_top(cfg, plain.shape[1:], seed=seed, name=name)
    data = MapBatches([plain, mirrored], rows, y, balanced_sample_weights(y, sample_weight),
                      cfg.batch_size, seed)
    logs = compile_and_fit(top, data, cfg.epochs, top_optimizer(cfg, len(data)),
                           keras.losses.BinaryCrossentropy(), verbose=verbose)
    return top, logs


def top_optimizer(cfg: TopConfig, steps_per_epoch: int, use_ema: bool = False
                  ) -> keras.optimizers.Optimizer:
    """The recipe's optimiser over ``cfg.epochs`` of ``steps_per_epoch``: AdamW, cosine decay
    of ``cfg.lr`` after a 10% warm-up (``use_ema``: keep an exponential moving average of the
    weights, which is what scores)."""
    schedule = cosine_schedule(cfg.lr, cfg.epochs * steps_per_epoch, warmup_fraction=0.1,
                               alpha=0.01)
    return keras.optimizers.AdamW(schedule, weight_decay=cfg.weight_decay, use_ema=use_ema)


def fit(cfg: TopConfig, plain: np.ndarray, mirrored: np.ndarray, rows: np.ndarray,
        y: np.ndarray, seed: int, sample_weight: np.ndarray | None = None,
        verbose: int | str = 0, logs: list[dict[str, float]] | None = None,
        member: FitMember = fit_member) -> keras.Model:
    """A fresh top trained for ``cfg.epochs`` on the maps of ``rows`` (labels ``y`` of those
    rows) by ``member`` (:func:`fit_member`). With ``cfg.members`` > 1, that many tops (seeds
    :func:`member_seeds`) in one model that scores the mean of theirs. ``logs``, when given,
    receives one row per epoch and member."""
    tops = []
    for k, member_seed in enumerate(member_seeds(seed, cfg.members)):
        keras.utils.set_random_seed(member_seed)
        name = "top" if cfg.members == 1 else f"top_{k}"
        top, epoch_logs = member(cfg, plain, mirrored, rows, y, member_seed, name,
                                 sample_weight, verbose)
        if logs is not None:
            logs.extend(row | {"member": k} for row in epoch_logs)
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


class FitTop(Protocol):
    """:func:`fit`'s shape as :func:`top_fit_score` calls it (research wraps it)."""

    def __call__(self, cfg: TopConfig, plain: np.ndarray, mirrored: np.ndarray,
                 rows: np.ndarray, y: np.ndarray, seed: int,
                 sample_weight: np.ndarray | None = None) -> keras.Model: ...


def top_fit_score(cfg: TopConfig, plain: np.ndarray, mirrored: np.ndarray, y: np.ndarray,
                  log: Path | None = None, machines: np.ndarray | None = None,
                  fit_top: FitTop = fit) -> FitScore:
    """The recipe as a panel ``fit_score`` (:func:`trainer.panel.network_fit_score`: each
    fit's test scores appended to ``log``; ``cfg.machine_balanced`` weights by ``machines``);
    each fit by ``fit_top`` (:func:`fit`)."""

    def fit_and_score(tr: np.ndarray, te: np.ndarray, weight: np.ndarray | None,
                      seed: int) -> np.ndarray:
        started = time.time()
        top = fit_top(cfg, plain, mirrored, tr, y[tr], seed, sample_weight=weight)
        scores = score(top, plain, mirrored, te, cfg.tta)
        print(f"fit on {len(tr)} images in {time.time() - started:.0f}s", flush=True)
        keras.backend.clear_session()
        return scores

    return network_fit_score(fit_and_score, y, machines, cfg.machine_balanced, log)
