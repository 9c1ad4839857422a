"""AdaBN (trainer/adapt.py): a frozen front's batch-norm statistics re-estimated on a site's
own images, nothing else touched."""

from __future__ import annotations

import numpy as np
import pytest

keras = pytest.importorskip("keras", reason="the [train] extra")

from trainer.adapt import adapt_batch_norm  # noqa: E402
from trainer.top import TopConfig, build_front  # noqa: E402


def test_statistics_are_the_site_images_and_the_rest_is_untouched() -> None:
    front = build_front(TopConfig(size=64), weights=None)
    bns = [la for la in front._flatten_layers() if isinstance(la, keras.layers.BatchNormalization)]
    drops = [la for la in front._flatten_layers() if isinstance(la, keras.layers.Dropout)]
    first = front.get_layer("lite0_front").get_layer("stem_bn")
    # The first BN layer's input: the stem convolution of the images made RGB (the outer
    # model's first layers, then the inner front's stem).
    inner = front.get_layer("lite0_front")
    to_rgb = keras.Model(front.input, front.get_layer("lite_normalise").output)
    stem = keras.Model(inner.input, first.input)
    images = np.random.default_rng(0).integers(0, 256, (48, 64, 64, 1)).astype(np.uint8)
    kernels = [w.copy() for la in front._flatten_layers()
               if isinstance(la, keras.layers.Conv2D) for w in la.get_weights()]
    gamma = first.gamma.numpy()
    before = front.predict_on_batch(images[:4] / 255.0)

    assert adapt_batch_norm(front, images, batch_size=16, limit=None) == len(bns)

    x = np.asarray(stem.predict_on_batch(to_rgb.predict_on_batch(images / 255.0)), np.float64)
    np.testing.assert_allclose(first.moving_mean.numpy(), x.mean(axis=(0, 1, 2)),
                               rtol=1e-3, atol=1e-4)
    batch_vars = [x[i:i + 16].var(axis=(0, 1, 2)) for i in range(0, 48, 16)]
    np.testing.assert_allclose(first.moving_variance.numpy(), np.mean(batch_vars, axis=0),
                               rtol=1e-3, atol=1e-4)
    assert not np.allclose(front.predict_on_batch(images[:4] / 255.0), before)
    np.testing.assert_array_equal(first.gamma.numpy(), gamma)  # learned weights kept
    after = [w for la in front._flatten_layers()
             if isinstance(la, keras.layers.Conv2D) for w in la.get_weights()]
    assert all(np.array_equal(a, b) for a, b in zip(kernels, after, strict=True))
    assert all(not b.trainable and b.momentum == 0.99 for b in bns)  # restored
    assert drops and all(d.rate > 0 for d in drops)
