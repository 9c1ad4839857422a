"""Is the attention map faithful? Blank the most-attended region of each malignant validation
image and a random region of the same size, and compare how much the score drops.

On the model's own validation split (by patient, ``--val-fraction`` and ``--seed`` read from
the model's training record, else 0.2 and 0), each malignant image is preprocessed by the
worker's function and scored with its attention map (the ``attention`` output, see
export/attention.py; added in memory when the file lacks it). Then, in the preprocessed input,
the ``k`` map cells (each ``size / 12`` pixels square at 384 px) with the most attention are
set to 0 (the background level), and so are ``k`` random cells:

- ``anywhere``: the top-k cells of the whole map, against k cells drawn from all the others;
- ``breast``: the top-k cells among the cells that are at least half breast (non-zero input),
  against k cells drawn from the other breast cells (blanking background changes no pixel, so
  this is the fairer comparison when the map puts weight outside the breast).

It prints, for each, the mean score drop of the top and of the random blanking and their
paired difference, with 95% intervals from a patient bootstrap (patients resampled with
replacement), and the share of images whose top drop is the larger. ONNX Runtime only, one
thread by default.

    python research/heatmap_faithfulness.py ../shared/data/mammo-3383/labels.csv \\
        --model models/mammo-lite0-top-384.onnx
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trainer.dataset import discover, split_by_patient  # noqa: E402
from worker.imaging.preprocess import preprocess_file  # noqa: E402
from worker.scoring.model_metadata import (  # noqa: E402
    ATTENTION_NAME,
    INPUT_NAME,
    OUTPUT_NAME,
    ModelMetadata,
)

MODES = ("anywhere", "breast")


def session(model: Path, threads: int):  # noqa: ANN201  (onnxruntime.InferenceSession)
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    data = model.read_bytes()
    sess = ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
    if ATTENTION_NAME not in {o.name for o in sess.get_outputs()}:
        import onnx

        from export.attention import add_attention_output

        proto = onnx.load_from_string(data)
        add_attention_output(proto)
        sess = ort.InferenceSession(proto.SerializeToString(), options,
                                    providers=["CPUExecutionProvider"])
    return sess


def blanked(x: np.ndarray, cells: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """``x`` (S, S, 1) with the given flat cell indices of a ``grid`` map set to 0."""
    out = x.copy()
    rows, cols = grid
    side_r, side_c = x.shape[0] / rows, x.shape[1] / cols
    for cell in cells:
        r, c = divmod(int(cell), cols)
        out[int(round(r * side_r)):int(round((r + 1) * side_r)),
            int(round(c * side_c)):int(round((c + 1) * side_c))] = 0.0
    return out


def breast_cells(x: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """Flat indices of the cells at least half covered by breast (non-zero input)."""
    rows, cols = grid
    s = x.shape[0]
    tissue = (x[:, :, 0] > 0).astype(np.float32)
    share = tissue[: s // rows * rows, : s // cols * cols].reshape(
        rows, s // rows, cols, s // cols).mean(axis=(1, 3))
    return np.flatnonzero(share.ravel() >= 0.5)


def variants(x: np.ndarray, attention: np.ndarray, k: int, rng: np.random.Generator,
             draws: int) -> list[np.ndarray]:
    """Blankings of ``x``, for each of MODES: the top-k cells, then ``draws`` random draws."""
    grid = attention.shape
    flat = attention.ravel()
    out = []
    for mode in MODES:
        allowed = np.arange(flat.size) if mode == "anywhere" else breast_cells(x, grid)
        if len(allowed) < 2 * k:  # too little breast to compare: blank the whole map's top
            allowed = np.arange(flat.size)
        top = allowed[np.argsort(-flat[allowed], kind="stable")[:k]]
        others = np.setdiff1d(allowed, top)
        out.append(blanked(x, top, grid))
        out += [blanked(x, rng.choice(others, k, replace=False), grid) for _ in range(draws)]
    return out


def patient_bootstrap(values: np.ndarray, patients: np.ndarray, n: int = 2000,
                      seed: int = 0) -> tuple[float, float]:
    """95% percentile interval of the mean of ``values``, resampling whole patients."""
    keys, index = np.unique(patients, return_inverse=True)
    sums = np.bincount(index, weights=values, minlength=len(keys))
    counts = np.bincount(index, minlength=len(keys)).astype(np.float64)
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, len(keys), size=(n, len(keys)))
    means = sums[draws].sum(axis=1) / counts[draws].sum(axis=1)
    lo, hi = np.percentile(means, [2.5, 97.5])
    return float(lo), float(hi)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("labels", type=Path, help="the pool's labels.csv")
    p.add_argument("--model", type=Path, default=Path("models/mammo-lite0-top-384.onnx"))
    p.add_argument("--cells", type=int, nargs="+", default=[1, 4],
                   help="how many map cells to blank (each size is a separate comparison)")
    p.add_argument("--limit", type=int, default=0, help="at most this many images (0: all)")
    p.add_argument("--threads", type=int, default=1, help="ONNX Runtime threads")
    p.add_argument("--seed", type=int, default=0, help="seed of the random regions")
    p.add_argument("--draws", type=int, default=3,
                   help="random regions per image (their drops averaged)")
    p.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = p.parse_args()

    sess = session(args.model, args.threads)
    meta = ModelMetadata.from_props(sess.get_modelmeta().custom_metadata_map)
    split = meta.training.get("split", {})
    val_fraction, seed = float(split.get("val_fraction", 0.2)), int(split.get("seed", 0))
    _, val = split_by_patient(discover(args.labels), val_fraction, seed)
    malignant = [s for s in val if s.label == 1]
    print(f"model {meta.model_version}; validation split (val_fraction {val_fraction}, seed "
          f"{seed}): {len(val)} images, {len(malignant)} malignant", flush=True)
    malignant = malignant[: args.limit or None]
    rng = np.random.default_rng(args.seed)
    drops: dict[str, list[float]] = {}
    patients: list[str] = []
    top_in_breast: list[bool] = []
    started = time.time()
    for i, sample in enumerate(malignant):
        x = preprocess_file(sample.path, meta.preprocess)
        (score,), (attention,) = sess.run([OUTPUT_NAME, ATTENTION_NAME], {INPUT_NAME: x[None]})
        batch = [v for k in args.cells for v in variants(x, attention, k, rng, args.draws)]
        (scores,) = sess.run([OUTPUT_NAME], {INPUT_NAME: np.stack(batch)})
        scores = scores.reshape(len(args.cells), len(MODES), 1 + args.draws)
        for ki, k in enumerate(args.cells):
            for mi, mode in enumerate(MODES):
                drop = float(score[0]) - scores[ki, mi]
                drops.setdefault(f"{mode}/{k}/top", []).append(float(drop[0]))
                drops.setdefault(f"{mode}/{k}/random", []).append(float(drop[1:].mean()))
        patients.append(str(sample.patient_id))
        top_in_breast.append(int(np.argmax(attention)) in breast_cells(x, attention.shape))
        if (i + 1) % 20 == 0:
            print(f"{i + 1}/{len(malignant)} images, {time.time() - started:.0f} s", flush=True)
    pat = np.array(patients)
    figures: dict[str, object] = {"top_cell_in_breast_share": float(np.mean(top_in_breast))}
    print(f"\nthe most-attended cell is a breast cell (at least half breast) in "
          f"{100 * np.mean(top_in_breast):.0f}% of the images")
    print(f"mean score drop on {len(malignant)} malignant validation images of {len(set(pat))} "
          f"patients (95% patient-bootstrap interval):")
    for k in args.cells:
        for mode in MODES:
            top = np.array(drops[f"{mode}/{k}/top"])
            rand = np.array(drops[f"{mode}/{k}/random"])
            row = {"n": len(top), "top": float(top.mean()), "random": float(rand.mean()),
                   "difference": float((top - rand).mean()),
                   "top_larger_share": float(np.mean(top > rand))}
            row["top_ci"] = patient_bootstrap(top, pat)
            row["random_ci"] = patient_bootstrap(rand, pat)
            row["difference_ci"] = patient_bootstrap(top - rand, pat)
            figures[f"{mode}/{k}"] = row
            print(f"  {k} cell(s), {mode:8s}: top {row['top']:+.4f} "
                  f"[{row['top_ci'][0]:+.4f}, {row['top_ci'][1]:+.4f}]  random "
                  f"{row['random']:+.4f} [{row['random_ci'][0]:+.4f}, {row['random_ci'][1]:+.4f}]"
                  f"  top - random {row['difference']:+.4f} [{row['difference_ci'][0]:+.4f}, "
                  f"{row['difference_ci'][1]:+.4f}]  top larger in "
                  f"{100 * row['top_larger_share']:.0f}%")
    if args.json:
        args.json.write_text(json.dumps({"model_version": meta.model_version,
                                         "figures": figures}, indent=1) + "\n")


if __name__ == "__main__":
    main()
