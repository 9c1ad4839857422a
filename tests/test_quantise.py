"""`screen export --int8` on a tiny real conv model (onnx.helper, no TensorFlow): ONNX Runtime
static QDQ quantisation, the float model's metadata carried over, the AUC check."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from export.quantise import (
    INT8_SUFFIX,
    QuantiseError,
    QuantiseReport,
    check_accuracy,
    rate_changes,
    run_validation,
)
from tests.conftest import write_mammo_like
from worker.cli import cli
from worker.imaging.preprocess import PreprocessSettings, preprocess_file
from worker.scoring.model_metadata import INPUT_NAME, OUTPUT_NAME, ModelMetadata
from worker.scoring.scorer import Scorer

SIZE = 32


def make_conv_model(path: Path) -> Path:
    """NHWC input -> 3x3 conv (8 channels) -> ReLU -> global average -> dense -> sigmoid."""
    rng = np.random.default_rng(0)
    w = rng.normal(0, 0.5, (8, 1, 3, 3)).astype(np.float32)
    dense = rng.normal(0, 1.0, (8, 1)).astype(np.float32)
    nodes = [
        helper.make_node("Transpose", [INPUT_NAME], ["nchw"], perm=[0, 3, 1, 2]),
        helper.make_node("Conv", ["nchw", "w", "wb"], ["conv"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["conv"], ["relu"]),
        helper.make_node("GlobalAveragePool", ["relu"], ["gap"]),
        helper.make_node("Flatten", ["gap"], ["flat"]),
        helper.make_node("MatMul", ["flat", "dense"], ["logit0"]),
        helper.make_node("Add", ["logit0", "bias"], ["logit"]),
        helper.make_node("Sigmoid", ["logit"], [OUTPUT_NAME]),
    ]
    inits = [
        numpy_helper.from_array(w, "w"),
        numpy_helper.from_array(np.zeros(8, np.float32), "wb"),
        numpy_helper.from_array(dense, "dense"),
        numpy_helper.from_array(np.array([-0.5], np.float32), "bias"),
    ]
    graph = helper.make_graph(
        nodes, "conv_model",
        [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, ["N", SIZE, SIZE, 1])],
        [helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, ["N", 1])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    meta = ModelMetadata(preprocess=PreprocessSettings(size=SIZE), threshold=0.5,
                         model_version="test-conv-1", threshold_rule="fixed for tests")
    for k, v in meta.to_props().items():
        model.metadata_props.add(key=k, value=v)
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def make_pool(folder: Path, n: int = 40) -> Path:
    """A labelled pool: labels.csv with filename, label, patient_id (two images a patient)."""
    rows = []
    for i in range(n):
        label = "malignant" if i % 4 < 2 else "benign"
        name = f"images/{label}/p{i // 2}_{i}.png"
        write_mammo_like(folder / name, size=(72, 60), seed=i, bright=0.4 + 0.01 * (i % 7))
        rows.append({"filename": name, "label": label, "patient_id": str(i // 2)})
    labels = folder / "labels.csv"
    with labels.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["filename", "label", "patient_id"])
        writer.writeheader()
        writer.writerows(rows)
    return labels


def test_export_int8_quantises_a_conv_model_and_keeps_its_metadata(tmp_path: Path) -> None:
    model = make_conv_model(tmp_path / "conv.onnx")
    labels = make_pool(tmp_path / "pool")
    out = tmp_path / "out" / "conv-int8.onnx"
    result = CliRunner().invoke(cli, [
        "export", str(model), "--int8", "--out", str(out), "--images", str(labels),
        "--calibration-images", "12", "--evaluation-images", "20", "--max-auc-drop", "1",
        "--max-rate-change", "1",
    ])
    assert result.exit_code == 0, result.output
    assert "AUC float" in result.output and "test-conv-1-int8" in result.output
    assert "the biases of 1 convolution corrected" in result.output  # on by default

    q = onnx.load(str(out))
    ops = {n.op_type for n in q.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear", "Conv"} <= ops
    # Per-channel int8 weights: one scale for each of the conv's 8 output channels.
    int8_weights = [t for t in q.graph.initializer if t.data_type == TensorProto.INT8]
    assert any(numpy_helper.to_array(t).shape == (8, 1, 3, 3) for t in int8_weights)
    assert any(numpy_helper.to_array(t).shape == (8,) for t in q.graph.initializer
               if t.data_type == TensorProto.FLOAT and "scale" in t.name)

    float_scorer, int8_scorer = Scorer(model), Scorer(out)
    assert int8_scorer.version == "test-conv-1" + INT8_SUFFIX
    assert int8_scorer.metadata.preprocess == float_scorer.metadata.preprocess
    assert int8_scorer.threshold == float_scorer.threshold
    # Scores close to the float model's on images like the calibration ones.
    x = [preprocess_file(p, float_scorer.metadata.preprocess)
         for p in sorted((tmp_path / "pool" / "images").rglob("*.png"))[:10]]
    np.testing.assert_allclose(int8_scorer.score_batch(x), float_scorer.score_batch(x),
                               atol=0.05)
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".int8-")]


def test_export_int8_refuses_in_one_line(tmp_path: Path) -> None:
    model = make_conv_model(tmp_path / "conv.onnx")
    labels = make_pool(tmp_path / "pool", n=8)
    (tmp_path / "pool" / "labels.csv").write_text(
        "filename,label\n" + "".join(f"images/benign/p{i // 2}_{i}.png,benign\n"
                                     for i in (2, 3, 6, 7)))
    out = tmp_path / "conv-int8.onnx"
    # A pool of one class only: no AUC to compare, so it is refused before anything is written.
    result = CliRunner().invoke(cli, ["export", str(model), "--int8", "--out", str(out),
                                      "--images", str(labels), "--calibration-images", "2",
                                      "--evaluation-images", "2"])
    assert result.exit_code == 1 and "no malignant images" in result.output
    assert len(result.output.strip().splitlines()) == 1 and not out.exists()
    # An ONNX model without --int8 is a mistake, not a silent re-export.
    result = CliRunner().invoke(cli, ["export", str(model), "--out", str(out)])
    assert result.exit_code == 1 and "--int8" in result.output


def test_accuracy_check_refuses_a_drop_over_the_limit() -> None:
    def report(auc_float: float, auc_int8: float) -> QuantiseReport:
        return QuantiseReport(Path("m.onnx"), "v-int8", 64, 400, "validation-split",
                              auc_float, auc_int8, 0.01, 10.0, 4.0)

    check_accuracy(report(0.80, 0.796), 0.005)
    check_accuracy(report(0.80, 0.81), 0.005)  # int8 better: fine
    with pytest.raises(QuantiseError, match="below float"):
        check_accuracy(report(0.80, 0.79), 0.005)


def test_accuracy_check_refuses_scores_that_shift_at_an_operating_point() -> None:
    """A shift of every score keeps the AUC and moves every rate at a kept threshold: measured
    on the shipped model's int8 form (mean shift +0.10, specificity at sens90 0.32 -> 0.10)."""
    from worker.audit.metrics import roc_auc
    from worker.scoring.model_metadata import OperatingPoint

    rng = np.random.default_rng(0)
    y = np.arange(200) % 4 == 0
    s_float = np.clip(rng.normal(0.3, 0.15, 200) + 0.2 * y, 0.0, 0.9)
    s_int8 = s_float + 0.1  # every score up: the same order
    assert roc_auc(y, s_float) == roc_auc(y, s_int8)
    points = {"sens90": OperatingPoint(0.3), "recall10": OperatingPoint(0.6)}

    def report(shifted: np.ndarray) -> QuantiseReport:
        return QuantiseReport(Path("m.onnx"), "v-int8", 64, 200, "validation-split",
                              roc_auc(y, s_float), roc_auc(y, shifted), 0.1, 10.0, 4.0,
                              tuple(rate_changes(y, s_float, shifted, points)))

    check_accuracy(report(s_float + 1e-6), 0.005, 0.02)  # the same calls
    shifted = report(s_int8)
    assert {c.point for c in shifted.rate_changes} == {"sens90", "recall10"}
    with pytest.raises(QuantiseError, match="at the threshold it keeps"):
        check_accuracy(shifted, 0.005, 0.02)
    check_accuracy(shifted, 0.005, 1.0)  # the limit is the operator's
    assert "largest rate change" in shifted.describe()
    one_class = rate_changes(~y[y], s_float[y], s_int8[y], points)  # no cancers: no sensitivity
    assert "n/a" in " ".join(c.describe() for c in one_class)


def test_bias_correction_removes_each_convolutions_mean_shift(tmp_path: Path) -> None:
    """Quantised as the export does, the conv's output mean moves off the float one's; after
    correction, what is left on the same images is the rounding to the bias's int32 steps."""
    from export.bias_correction import channel_means, correct_biases
    from export.quantise import quantise_graph

    pre, q = tmp_path / "pre.onnx", tmp_path / "q.onnx"
    labels = make_pool(tmp_path / "pool", n=12)
    settings = PreprocessSettings(size=SIZE)
    arrays = [preprocess_file(p, settings) for p in sorted(labels.parent.rglob("*.png"))]
    quantise_graph(make_conv_model(tmp_path / "conv.onnx"), pre, q, INPUT_NAME, arrays)
    float_graph, model = onnx.load(str(pre)), onnx.load(str(q))
    (conv,) = [n for n in model.graph.node if n.op_type == "Conv"]
    (float_conv,) = [n for n in float_graph.graph.node if n.op_type == "Conv"]
    bias_dq = next(n for n in model.graph.node if n.output[0] == conv.input[2])
    step = numpy_helper.to_array(
        next(i for i in model.graph.initializer if i.name == bias_dq.input[1]))
    expected = channel_means(float_graph, INPUT_NAME, [float_conv.output[0]], arrays)

    def shift() -> np.ndarray:
        return (channel_means(model, INPUT_NAME, [conv.output[0]], arrays)[conv.output[0]]
                - expected[float_conv.output[0]])

    before = shift()
    assert np.abs(before).max() > 5 * step.max()  # a shift worth correcting
    done: list[tuple[int, int]] = []
    shifts = correct_biases(float_graph, model, INPUT_NAME, arrays,
                            lambda i, n: done.append((i, n)))
    assert [s.conv for s in shifts] == [conv.name] and done == [(1, 1)]
    assert shifts[0].shift == pytest.approx(np.abs(before).mean())
    np.testing.assert_array_less(np.abs(shift()), step / 2 + 1e-6)


def _run_on_folder(tmp_path: Path, trained_on: Path) -> Path:
    """A run's record as `screen train FOLDER` leaves it: metrics.json naming the folder, and
    val_predictions.csv with names relative to it (benign/..., malignant/...)."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.json").write_text(json.dumps({"training": {"source": str(trained_on)}}))
    names = [("benign/p1_2.png", "benign"), ("malignant/p0_0.png", "malignant")]
    (run / "val_predictions.csv").write_text(
        "filename,label,score\n" + "".join(f"{n},{lab},0.5\n" for n, lab in names))
    return run / "metrics.json"


def test_a_run_trained_on_a_folder_finds_its_validation_split_with_a_labels_csv(
        tmp_path: Path) -> None:
    labels = make_pool(tmp_path / "pool", n=8)  # names images/benign/..., relative to pool/
    metrics = _run_on_folder(tmp_path, tmp_path / "pool" / "images")
    run = json.loads(metrics.read_text())
    found = run_validation(metrics.parent / "val_predictions.csv", run, labels)
    assert [s.path for s in found] == [tmp_path / "pool" / "images" / "benign" / "p1_2.png",
                                       tmp_path / "pool" / "images" / "malignant" / "p0_0.png"]
    # The same run, its folder since moved: the names are looked up beside --images.
    moved = {"training": {"source": str(tmp_path / "gone")}}
    assert run_validation(metrics.parent / "val_predictions.csv", moved,
                          tmp_path / "pool" / "images") == found


def test_export_int8_says_when_the_validation_split_is_not_found(tmp_path: Path) -> None:
    model = make_conv_model(tmp_path / "conv.onnx")
    labels = make_pool(tmp_path / "pool", n=8)
    metrics = _run_on_folder(tmp_path, tmp_path / "gone")  # trained elsewhere, since moved
    result = CliRunner().invoke(cli, ["export", str(model), "--int8", "--out",
                                      str(tmp_path / "q.onnx"), "--images", str(labels),
                                      "--metrics", str(metrics), "--calibration-images", "2"])
    assert result.exit_code == 1
    (line,) = result.output.strip().splitlines()
    assert line.startswith(f"Error: the run's validation split ({metrics.parent}"), line
    assert (f"names 2 of 2 images not found under {tmp_path / 'gone'} or {tmp_path / 'pool'}, "
            "e.g. benign/p1_2.png") in line
    assert f"the source the run was trained on, {tmp_path / 'gone'}: pass" in line
    assert "cannot preprocess" not in line and not (tmp_path / "q.onnx").exists()
