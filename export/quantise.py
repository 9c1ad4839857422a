"""int8: ONNX Runtime static quantisation of an exported model, checked against the float one.

Steps: `quant_pre_process` (shape inference and graph optimisation), then `quantize_static`
in the QDQ format with per-channel int8 weights and uint8 activations, calibrated on real
images preprocessed by the worker's own `preprocess_file` with the model's own settings, then
(unless turned off) bias correction on the same images (`export.bias_correction`). The
int8 model carries the float model's metadata with `-int8` appended to its model_version, so
the two are never confused in the database. It is written only if its ROC AUC on held-out
labelled images (the run's validation split when known, else a seeded draw) is within
`max_auc_drop` of the float model's on the same images, and if, at each of its operating
points' thresholds (which it carries over from the float model), sensitivity, specificity and
recall rate on those images move by at most `max_rate_change`: AUC alone ignores a shift of
every score. Without bias correction the shipped model's int8 forms shifted scores by +0.03
to +0.10 on average, which took specificity at sens90 from 0.32 to 0.10-0.14, one of them with
its validation AUC within 0.005 (models/EXPERIMENTS.md); bias correction takes the shift to
within 0.01.

Needs onnx and onnxruntime only (no TensorFlow), so it can quantise any exported model.
"""

from __future__ import annotations

import os
import random
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from export.bias_correction import BiasShift, correct_biases
from trainer.dataset import DatasetError, Sample, discover, read_predictions, source_folder
from worker.audit.metrics import confusion_at, rates, roc_auc
from worker.imaging.preprocess import preprocess_file
from worker.scoring.model_file import ModelLoadError
from worker.scoring.model_metadata import (
    KEY_MODEL_VERSION,
    ModelMetadata,
    ModelMetadataError,
    OperatingPoint,
)
from worker.scoring.scorer import Scorer

INT8_SUFFIX = "-int8"
# Rates compared at each operating point's threshold, float against int8.
POINT_RATES = ("sensitivity", "specificity", "recall_rate")


class QuantiseError(RuntimeError):
    """The int8 model cannot be made or is not good enough; one line for the operator."""


@dataclass(frozen=True)
class RateChange:
    """One rate at one operating point's threshold, float and int8, on the same images."""

    point: str
    rate: str  # one of POINT_RATES
    float_value: float | None
    int8_value: float | None

    @property
    def change(self) -> float:
        if self.float_value is None or self.int8_value is None:
            return 0.0
        return abs(self.int8_value - self.float_value)

    def describe(self) -> str:
        def fmt(v: float | None) -> str:
            return "n/a" if v is None else f"{v:.3f}"

        return f"{self.point} {self.rate} {fmt(self.float_value)} -> {fmt(self.int8_value)}"


def rate_changes(y: np.ndarray, s_float: np.ndarray, s_int8: np.ndarray,
                 points: dict[str, OperatingPoint]) -> list[RateChange]:
    """Sensitivity, specificity and recall rate at each point's threshold, float and int8."""
    out = []
    for name, point in points.items():
        before = rates(confusion_at(y, s_float, point.threshold))
        after = rates(confusion_at(y, s_int8, point.threshold))
        out += [RateChange(name, r, before[r], after[r]) for r in POINT_RATES]
    return out


@dataclass(frozen=True)
class QuantiseReport:
    out_path: Path
    model_version: str
    n_calibration: int
    n_evaluation: int
    evaluation_source: str
    auc_float: float | None
    auc_int8: float | None
    max_abs_score_diff: float
    ms_float_batch1: float
    ms_int8_batch1: float
    rate_changes: tuple[RateChange, ...] = ()
    bias_shifts: tuple[BiasShift, ...] = ()  # empty: no bias correction

    @property
    def largest_rate_change(self) -> RateChange | None:
        return max(self.rate_changes, key=lambda c: c.change, default=None)

    @property
    def auc_drop(self) -> float:
        if self.auc_float is None or self.auc_int8 is None:
            return 0.0
        return self.auc_float - self.auc_int8

    def describe(self) -> str:
        def fmt(v: float | None) -> str:
            return "n/a" if v is None else f"{v:.4f}"

        return (
            f"wrote {self.out_path} (model_version {self.model_version}): calibrated on "
            f"{self.n_calibration} images{self._bias_correction()}; on {self.n_evaluation} "
            f"{self.evaluation_source} "
            f"images AUC float {fmt(self.auc_float)}, int8 {fmt(self.auc_int8)} "
            f"(drop {self.auc_drop:+.4f}), largest score difference "
            f"{self.max_abs_score_diff:.4f}{self._largest_rate_change()}; "
            f"batch 1: float {self.ms_float_batch1:.1f} ms, "
            f"int8 {self.ms_int8_batch1:.1f} ms per image "
            f"({self.ms_float_batch1 / max(self.ms_int8_batch1, 1e-9):.2f}x)"
        )

    def _bias_correction(self) -> str:
        if not self.bias_shifts:
            return ""
        largest = max(self.bias_shifts, key=lambda b: b.shift)
        n = len(self.bias_shifts)
        return (f", the biases of {n} convolution{'s' if n != 1 else ''} corrected on them "
                f"(largest mean shift {largest.shift:.4f}, {largest.conv})")

    def _largest_rate_change(self) -> str:
        largest = self.largest_rate_change
        return "" if largest is None else f", largest rate change {largest.describe()}"


# ---- which images ----------------------------------------------------------------------------


def choose_images(
    pool: list[Sample],
    validation: list[Sample],
    n_calibration: int,
    n_evaluation: int,
    seed: int,
) -> tuple[list[Sample], list[Sample], str]:
    """Seeded draws: evaluation from the validation split when known (else from the pool, by
    patient), calibration from the rest of the pool, never sharing a patient with it."""
    rng = random.Random(seed)
    if validation:
        evaluation = rng.sample(validation, min(n_evaluation, len(validation)))
        source = "validation-split"
    else:
        patients = sorted({im.patient_id or str(im.path) for im in pool})
        rng.shuffle(patients)
        evaluation = []
        for patient in patients:
            if len(evaluation) >= n_evaluation:
                break
            evaluation += [im for im in pool if (im.patient_id or str(im.path)) == patient]
        evaluation = evaluation[:n_evaluation]
        source = "seeded patient-grouped"
    held = {im.patient_id for im in (validation or evaluation) if im.patient_id}
    held_paths = {im.path for im in evaluation}
    rest = [im for im in pool if im.path not in held_paths and im.patient_id not in held]
    calibration = rng.sample(rest, min(n_calibration, len(rest)))
    if not calibration:
        raise QuantiseError("no calibration images left outside the evaluation images")
    return calibration, evaluation, source


def check_accuracy(report: QuantiseReport, max_auc_drop: float,
                   max_rate_change: float = 1.0) -> None:
    """Refuse an int8 model whose AUC falls more than `max_auc_drop` below the float one's, or
    at one of whose operating points a rate moves by more than `max_rate_change`."""
    if report.auc_float is None or report.auc_int8 is None:
        raise QuantiseError(
            f"cannot check the int8 model: its {report.n_evaluation} evaluation images "
            "need both classes"
        )
    if report.auc_drop > max_auc_drop:
        raise QuantiseError(
            f"int8 AUC {report.auc_int8:.4f} is {report.auc_drop:.4f} below float "
            f"{report.auc_float:.4f} on {report.n_evaluation} images "
            f"(more than --max-auc-drop {max_auc_drop}); nothing written"
        )
    largest = report.largest_rate_change
    if largest is not None and largest.change > max_rate_change:
        raise QuantiseError(
            f"int8 moves {largest.describe()} on {report.n_evaluation} images at the "
            f"threshold it keeps from the float model (more than --max-rate-change "
            f"{max_rate_change}); nothing written"
        )


# ---- quantisation ----------------------------------------------------------------------------


# Images per calibration run. ONNX Runtime's calibration session (the model plus a ReduceMin
# and ReduceMax on every tensor) holds a batch's activations at once, and the ranges (min and
# max over all images) do not depend on the batch: one image a run keeps the memory low.
CALIBRATION_BATCH = 1


def _reader(input_name: str, arrays: Sequence[np.ndarray], batch: int = CALIBRATION_BATCH):  # type: ignore[no-untyped-def]
    from onnxruntime.quantization import CalibrationDataReader

    class _Batches(CalibrationDataReader):  # type: ignore[misc]
        def __init__(self) -> None:
            self._it = iter(range(0, len(arrays), batch))

        def get_next(self) -> dict[str, np.ndarray] | None:
            start = next(self._it, None)
            if start is None:
                return None
            return {input_name: np.stack(arrays[start : start + batch]).astype(np.float32)}

    return _Batches()


def quantise_graph(float_model: Path, pre: Path, out: Path, input_name: str,
                   arrays: Sequence[np.ndarray]) -> None:
    """The export's quantisation, without its checks: `float_model` pre-processed to `pre`
    (shape inference, graph optimisation), then quantised to `out` (static QDQ, per-channel
    int8 weights, uint8 activations, min-max ranges over `arrays`)."""
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    # ONNX shape inference suffices for a CNN (symbolic inference is for transformers'
    # dynamic dims, and would need sympy).
    quant_pre_process(str(float_model), str(pre), skip_symbolic_shape=True)
    quantize_static(str(pre), str(out), _reader(input_name, arrays),
                    quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)


def _ms_per_image(scorer: Scorer, arrays: Sequence[np.ndarray], repeats: int = 15) -> float:
    scorer.score_batch(arrays[:1])  # warm-up
    times = []
    for i in range(repeats):
        t = time.perf_counter()
        scorer.score_batch([arrays[i % len(arrays)]])
        times.append(time.perf_counter() - t)
    return 1000 * statistics.median(times)


def _scores(scorer: Scorer, arrays: Sequence[np.ndarray], batch: int = 16) -> np.ndarray:
    return np.concatenate(
        [scorer.score_batch(arrays[i : i + batch]) for i in range(0, len(arrays), batch)]
    )


def _int8_model(float_model: Path, float_scorer: Scorer, tmp: Path,
                cal_arrays: Sequence[np.ndarray], bias_correction: bool,
                progress: Callable[[int, int], None] | None
                ) -> tuple[Path, str, list[BiasShift]]:
    """The int8 graph (in ``tmp``), bias-corrected when asked, carrying the float model's
    metadata under the int8 version: (its path, the version, the bias shifts)."""
    import onnx

    pre = tmp / "pre.onnx"
    q = tmp / "int8.onnx"
    final = tmp / "final.onnx"
    try:
        quantise_graph(float_model, pre, q, float_scorer.input_name, cal_arrays)
    except Exception as exc:  # ORT's quantiser raises many kinds
        raise QuantiseError(f"quantisation failed: {str(exc).splitlines()[0]}") from exc
    model = onnx.load(str(q))
    try:
        shifts = (correct_biases(onnx.load(str(pre)), model, float_scorer.input_name,
                                 cal_arrays, progress) if bias_correction else [])
    except Exception as exc:  # ONNX Runtime raises its own types
        raise QuantiseError(f"bias correction failed: {str(exc).splitlines()[0]}") from exc
    props = dict(float_scorer.session.get_modelmeta().custom_metadata_map)
    version = props[KEY_MODEL_VERSION] + INT8_SUFFIX
    props[KEY_MODEL_VERSION] = version
    try:
        ModelMetadata.from_props(props)
    except ModelMetadataError as exc:
        raise QuantiseError(str(exc)) from exc
    del model.metadata_props[:]
    for key, value in sorted(props.items()):
        model.metadata_props.add(key=key, value=value)
    onnx.save(model, str(final))
    return final, version, shifts


def quantise(
    float_model: Path,
    out_path: Path,
    calibration: Sequence[Path],
    evaluation: Sequence[Sample],
    max_auc_drop: float = 0.005,
    evaluation_source: str = "held-out",
    max_rate_change: float = 0.02,
    bias_correction: bool = True,
    progress: Callable[[int, int], None] | None = None,
) -> QuantiseReport:
    """Write the int8 model of `float_model` to `out_path` (atomically), or raise. With
    `bias_correction`, each int8 convolution's bias is corrected on the calibration images
    (`export.bias_correction`; `progress(done, total)` after each)."""

    try:
        float_scorer = Scorer(float_model)
    except ModelLoadError as exc:
        raise QuantiseError(str(exc)) from exc
    settings = float_scorer.metadata.preprocess

    def load(paths: Sequence[Path]) -> list[np.ndarray]:
        out = []
        for p in paths:
            try:
                out.append(preprocess_file(p, settings))
            except Exception as exc:  # a broken file in the pool: say which
                raise QuantiseError(f"cannot preprocess {p}: {exc}") from exc
        return out

    cal_arrays = load(calibration)
    eval_arrays = load([im.path for im in evaluation])
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_path.parent, prefix=".int8-") as tmp:
        final, version, shifts = _int8_model(float_model, float_scorer, Path(tmp), cal_arrays,
                                             bias_correction, progress)
        try:
            int8_scorer = Scorer(final)  # the worker's own loader must accept it
        except ModelLoadError as exc:
            raise QuantiseError(str(exc)) from exc

        y = np.array([im.label == 1 for im in evaluation], dtype=bool)
        s_float = _scores(float_scorer, eval_arrays) if eval_arrays else np.zeros(0)
        s_int8 = _scores(int8_scorer, eval_arrays) if eval_arrays else np.zeros(0)
        report = QuantiseReport(
            out_path=out_path,
            model_version=version,
            n_calibration=len(cal_arrays),
            n_evaluation=len(eval_arrays),
            evaluation_source=evaluation_source,
            auc_float=roc_auc(y, s_float) if len(y) else None,
            auc_int8=roc_auc(y, s_int8) if len(y) else None,
            max_abs_score_diff=float(np.max(np.abs(s_float - s_int8))) if len(y) else 0.0,
            ms_float_batch1=_ms_per_image(float_scorer, cal_arrays),
            ms_int8_batch1=_ms_per_image(int8_scorer, cal_arrays),
            rate_changes=tuple(rate_changes(y, s_float, s_int8, float_scorer.metadata.points))
            if len(y) else (),
            bias_shifts=tuple(shifts),
        )
        check_accuracy(report, max_auc_drop, max_rate_change)
        os.replace(final, out_path)
    return report


def run_validation(predictions: Path, run: dict, images_source: Path) -> list[Sample]:
    """The run's validation split ([] without its predictions file). Its file names are
    relative to the source the run was trained on (metrics.json `training.source`), which may
    be a folder while `--images` names a labels CSV elsewhere, or the reverse: they are looked
    up there first, then beside `images_source`; a split found in neither is one line."""
    trained = run.get("training", {}).get("source")
    bases = [source_folder(trained)] if trained else []
    bases += [b for b in [source_folder(images_source)] if b not in bases]
    samples: list[Sample] = []
    for base in bases:
        samples = read_predictions(predictions, base)
        missing = [s.path for s in samples if not s.path.is_file()]
        if not missing:
            return samples
    where = " or ".join(str(b) for b in bases)
    raise QuantiseError(
        f"the run's validation split ({predictions}) names {len(missing)} of {len(samples)} "
        f"images not found under {where}, e.g. {Path(*missing[0].parts[-2:])} (its names are "
        f"relative to the source the run was trained on, {trained or 'not recorded'}: pass "
        "that source as --images, or drop --metrics to evaluate on a seeded draw)")


def quantise_from_run(
    float_model: Path,
    out_path: Path,
    images_source: Path | None,
    metrics_path: Path | None = None,
    n_calibration: int = 64,
    n_evaluation: int = 400,
    seed: int = 0,
    max_auc_drop: float = 0.005,
    max_rate_change: float = 0.02,
    bias_correction: bool = True,
    progress: Callable[[int, int], None] | None = None,
) -> QuantiseReport:
    """`screen export --int8`: images from the labelled pool (`images_source`: its labels CSV
    or the folder holding labels.csv; default the training source recorded in metrics.json),
    evaluation on the run's validation split when `metrics_path` is given and has one."""
    import json

    run: dict = {}
    if metrics_path is not None:
        try:
            run = json.loads(metrics_path.read_text())
        except (OSError, ValueError) as exc:
            raise QuantiseError(f"cannot read {metrics_path}: {exc}") from exc
    source = images_source or Path(run.get("training", {}).get("source", ""))
    try:
        pool = [im for im in discover(source) if im.split != "test"]
    except DatasetError as exc:
        raise QuantiseError(f"{exc} (pass --images LABELS_CSV or its folder)") from exc
    validation = (run_validation(metrics_path.parent / "val_predictions.csv", run, source)
                  if metrics_path is not None else [])
    calibration, evaluation, source_name = choose_images(
        pool, validation, n_calibration, n_evaluation, seed
    )
    return quantise(
        float_model,
        out_path,
        [im.path for im in calibration],
        evaluation,
        max_auc_drop=max_auc_drop,
        evaluation_source=source_name,
        max_rate_change=max_rate_change,
        bias_correction=bias_correction,
        progress=progress,
    )
