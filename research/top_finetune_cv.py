"""Does fine-tuning beat the probe? A CPU-sized test: fine-tune only Lite0's last block,
judged by the "new women, new sites" panel.

Full fine-tuning cannot be cross-validated on two cores (~13 min per epoch at 256 px). Training
only the last MBConv block (block 15) and a new head on cached block-14 feature maps costs
seconds per epoch, and answers the nearest question: does letting the top of the network adapt
to mammograms beat the frozen probe on the same folds?

    python research/top_finetune_cv.py ../shared/data/mammo-3383/labels.csv \\
        --cache runs/features/s256_b14maps.npz --epochs 6 \\
        --site-column rsna_site_id --machine-column rsna_machine_id
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import keras  # noqa: E402
from keras import layers  # noqa: E402

from trainer.arrays import preprocess_samples  # noqa: E402
from trainer.dataset import discover  # noqa: E402
from trainer.efficientnet_lite import grey_to_normalised_rgb, lite0_backbone  # noqa: E402
from trainer.features import extract  # noqa: E402
from trainer.fitting import class_weights  # noqa: E402
from trainer.panel import PanelData, format_panel, run_panel  # noqa: E402
from worker.imaging.preprocess import PreprocessSettings  # noqa: E402

SIZE = 256


def block14_maps(source: str, cache: Path) -> tuple[list, np.ndarray, np.ndarray]:
    samples = [s for s in discover(source) if s.split != "test"]
    if cache.is_file():
        d = np.load(cache)
        by = {str(s.path.resolve()): s for s in samples}
        return [by[str(Path(p).resolve())] for p in d["paths"]], d["plain"], d["flipped"]
    x, samples, _ = preprocess_samples(samples, PreprocessSettings(size=SIZE), 2, verbose=2)
    bb = lite0_backbone(SIZE)
    inputs = keras.Input((SIZE, SIZE, 1))
    maps = keras.Model(bb.input, bb.get_layer("block14_add").output)(
        grey_to_normalised_rgb(inputs))
    flat = layers.Reshape((-1,))(maps)
    model = keras.Model(inputs, flat)
    plain = extract(model, x, label=" block14 plain").astype(np.float16)
    flipped = extract(model, x, flip=True, label=" block14 mirrored").astype(np.float16)
    cache.parent.mkdir(parents=True, exist_ok=True)
    np.savez(cache, paths=np.array([str(s.path) for s in samples]), plain=plain,
             flipped=flipped)
    return samples, plain, flipped


def top_model() -> keras.Model:
    """block-14 maps (8, 8, 192) -> ImageNet-initialised block 15 (trainable) -> avg+max
    pooling -> dropout -> Dense(1, sigmoid)."""
    bb = lite0_backbone(SIZE)
    block15 = keras.Model(bb.get_layer("block14_add").output,
                          bb.get_layer("block15_project_bn").output)
    inputs = keras.Input((8 * 8 * 192,))
    x = block15(layers.Reshape((8, 8, 192))(inputs))
    x = layers.Concatenate()([layers.GlobalAveragePooling2D()(x),
                              layers.GlobalMaxPooling2D()(x)])
    x = layers.Dropout(0.3)(x)
    return keras.Model(inputs, layers.Dense(1, activation="sigmoid")(x))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("source")
    p.add_argument("--cache", type=Path, required=True)
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--holdouts", type=int, default=10)
    p.add_argument("--site-column", default=None)
    p.add_argument("--machine-column", default=None)
    p.add_argument("--out", type=Path)
    a = p.parse_args()
    samples, plain, flipped = block14_maps(a.source, a.cache)
    y = np.array([s.label for s in samples])

    def fit_score(tr: np.ndarray, te: np.ndarray, seed: int) -> np.ndarray:
        t = time.time()
        keras.utils.set_random_seed(seed)
        model = top_model()
        xtr = np.concatenate([plain[tr], flipped[tr]]).astype(np.float32)
        ytr = np.concatenate([y[tr], y[tr]]).astype(np.float32)
        steps = a.epochs * int(np.ceil(len(xtr) / 64))
        model.compile(keras.optimizers.AdamW(
            keras.optimizers.schedules.CosineDecay(a.lr, steps, alpha=0.02), weight_decay=1e-3),
            loss="binary_crossentropy")
        model.fit(xtr, ytr, batch_size=64, epochs=a.epochs, class_weight=class_weights(y[tr]),
                  verbose=2)
        scores = np.asarray(model.predict(plain[te].astype(np.float32), verbose=0)).ravel()
        print(f"fit on {len(tr)} images: {time.time() - t:.0f} s", flush=True)
        keras.backend.clear_session()
        return scores

    data = PanelData.from_csv(a.source, samples, a.site_column, a.machine_column)
    result = run_panel(data, fit_score, a.holdouts)
    result["recipe"] = {"name": "lite0 block 15 + head on block-14 maps", "epochs": a.epochs,
                        "lr": a.lr}
    print(format_panel("top-finetune", result))
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
