"""Where the shipped model's int8 error comes from: quantise it with one span of graph nodes
left in float, and measure each form against the float model.

    python research/int8_float_spans.py 12:29 0:12 ...   (node index spans, end exclusive;
                                                         0:0 quantises every node)
        [--variant reduce-range|int8-symmetric|per-tensor|entropy] [--no-bias-correction]

`--variant` changes the quantiser's settings (`VARIANTS`); `--no-bias-correction` leaves out
the export's bias correction (`export/bias_correction.py`).

For each span: `screen export --int8`'s own measurement on the run's validation split (AUC
drop, batch-1 speed; both limits lifted so that every form is measured), then, on 562 pool
images outside the validation split (the float model trained on them: the drop and the score
changes count, not the AUC), the AUC drop, the mean score change (signed and absolute) and
sensitivity and specificity at each operating point's threshold, float -> int8 (the export's
own `rate_changes`). Node indices
are those of `quant_pre_process`'s graph. Prints one line per span; writes nothing outside a
temporary folder.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import onnx  # noqa: E402
import onnxruntime.quantization as oq  # noqa: E402

import export.quantise as eq  # noqa: E402
from trainer.dataset import discover, read_predictions  # noqa: E402
from worker.audit.metrics import roc_auc  # noqa: E402
from worker.imaging.preprocess import preprocess_file  # noqa: E402
from worker.scoring.scorer import Scorer  # noqa: E402

MODEL = REPO / "models" / "mammo-lite0-top-384.onnx"
POOL = REPO.parent / "shared" / "data" / "mammo-3383"
RUN = REPO / "runs" / "top384s"  # the shipped model's training run (its validation split)


# Quantiser settings other than the export's (min-max ranges, uint8 activations, per-channel
# int8 weights), for `--variant`; entropy calibration keeps every tensor's histogram and is
# run on 16 calibration images (percentile ran out of 24 GB at 64).
VARIANTS: dict[str, dict] = {
    "minmax": {},
    "reduce-range": {"reduce_range": True},
    "int8-symmetric": {"activation_type": oq.QuantType.QInt8,
                       "extra_options": {"ActivationSymmetric": True}},
    "per-tensor": {"per_channel": False},
    "entropy": {"calibrate_method": oq.CalibrationMethod.Entropy},
}


def quantise_as(start: int, end: int, variant: str) -> None:
    """Make export.quantise leave nodes [start, end) of its pre-processed graph in float and
    use `variant`'s settings."""
    quantize_static = oq.quantize_static

    def patched(pre: str, out: str, reader: object, **kwargs: object) -> None:
        nodes = list(onnx.load(pre).graph.node)
        kwargs.update(VARIANTS[variant])
        quantize_static(pre, out, reader, nodes_to_exclude=[n.name for n in nodes[start:end]],
                        **kwargs)

    oq.quantize_static = patched


def other_images(n: int = 562, seed: int = 7) -> list:
    validation = {im.path for im in read_predictions(RUN / "val_predictions.csv", POOL)}
    rest = [im for im in discover(POOL / "labels.csv") if im.path not in validation]
    return random.Random(seed).sample(rest, n)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("spans", nargs="*", default=["0:0"])
    parser.add_argument("--variant", choices=sorted(VARIANTS), default="minmax")
    parser.add_argument("--no-bias-correction", dest="bias_correction", action="store_false",
                        help="as `screen export --int8 --no-bias-correction`")
    args = parser.parse_args()
    spans = [tuple(int(v) for v in arg.split(":")) for arg in args.spans]
    float_scorer = Scorer(MODEL)
    images = other_images()
    arrays = [preprocess_file(im.path, float_scorer.metadata.preprocess) for im in images]
    y = np.array([im.label == 1 for im in images])
    s_float = eq._scores(float_scorer, arrays)
    real = oq.quantize_static
    for start, end in spans:
        oq.quantize_static = real
        quantise_as(start, end, args.variant)
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "int8.onnx"
            report = eq.quantise_from_run(MODEL, out, POOL / "labels.csv", RUN / "metrics.json",
                                          n_evaluation=562, max_auc_drop=1.0,
                                          n_calibration=16 if args.variant == "entropy" else 64,
                                          max_rate_change=1.0,
                                          bias_correction=args.bias_correction)
            s_int8 = eq._scores(Scorer(out), arrays)
        change = s_int8 - s_float
        corrected = "" if args.bias_correction else " no-bias-correction"
        line = (f"float {start}:{end} {args.variant}{corrected}  validation: drop "
                f"{report.auc_drop:+.4f}, largest rate change "
                f"{report.largest_rate_change.describe()}, "
                f"{report.ms_float_batch1 / report.ms_int8_batch1:.2f}x  |  other 562: drop "
                f"{roc_auc(y, s_float) - roc_auc(y, s_int8):+.4f}, mean change "
                f"{change.mean():+.3f}, mean |change| {np.abs(change).mean():.3f}")
        # The export's own comparison, at every operating point's threshold.
        changes = eq.rate_changes(y, s_float, s_int8, float_scorer.metadata.points)
        line += "".join(f"; {c.describe()}" for c in changes if c.rate != "recall_rate")
        print(line, flush=True)


if __name__ == "__main__":
    main()
