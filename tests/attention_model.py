"""A tiny real ONNX model with the shipped recipe's head pattern, for heatmap tests.

Like the shipped graph (trainer/top.py as tf2onnx writes it): the input concatenated with its
mirror image along the batch, a one-channel logits map flattened by a Reshape, a Softmax over
positions, a Reshape, a Mul with the values, a sum, a sigmoid, the mean of the two halves.
The logits are the mean brightness of each of ``cells x cells`` blocks times ``sharpness``:
its attention goes to the brightest block, so a test knows where it must point.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from worker.imaging.preprocess import PreprocessSettings
from worker.scoring.model_metadata import INPUT_NAME, OUTPUT_NAME, ModelMetadata


def make_attention_model(path: Path, size: int = 48, cells: int = 6, mirror: bool = True,
                         settings: PreprocessSettings | None = None, sharpness: float = 40.0,
                         version: str = "test-attention-1") -> Path:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    big = np.iinfo(np.int64)
    consts = {
        "flip_start": [-1], "flip_end": [int(big.min)], "axis2": [2], "step_back": [-1],
        "flat": [0, -1, 1], "sum_axis": [1], "zero": [0], "one": [1], "two": [2],
        "axis0": [0], "end": [int(big.max)],
    }
    inits = [numpy_helper.from_array(np.array(v, np.int64), k) for k, v in consts.items()]
    inits += [numpy_helper.from_array(np.array(sharpness, np.float32), "sharp"),
              numpy_helper.from_array(np.array(0.5, np.float32), "half"),
              numpy_helper.from_array(np.array(4.0, np.float32), "gain")]
    k = size // cells
    nodes = []
    x = INPUT_NAME
    if mirror:
        nodes += [
            helper.make_node("Slice", [INPUT_NAME, "flip_start", "flip_end", "axis2",
                                       "step_back"], ["flipped"]),
            helper.make_node("Concat", [INPUT_NAME, "flipped"], ["both"], axis=0),
        ]
        x = "both"
    nodes += [
        helper.make_node("Transpose", [x], ["nchw"], perm=[0, 3, 1, 2]),
        helper.make_node("AveragePool", ["nchw"], ["blocks"], kernel_shape=[k, k],
                         strides=[k, k]),
        helper.make_node("Mul", ["blocks", "sharp"], ["logits"]),
        helper.make_node("Reshape", ["logits", "flat"], ["flat_logits"]),
        helper.make_node("Softmax", ["flat_logits"], ["weights"], axis=1),
        helper.make_node("Reshape", ["blocks", "flat"], ["values"]),
        helper.make_node("Mul", ["values", "weights"], ["weighted"]),
        helper.make_node("ReduceSum", ["weighted", "sum_axis"], ["pooled"], keepdims=0),
        helper.make_node("Mul", ["pooled", "gain"], ["gained"]),
        helper.make_node("Sigmoid", ["gained"], ["scores"]),
    ]
    if mirror:
        nodes += [
            helper.make_node("Shape", ["scores"], ["shape"]),
            helper.make_node("Slice", ["shape", "zero", "one"], ["b"]),
            helper.make_node("Div", ["b", "two"], ["n"]),
            helper.make_node("Slice", ["scores", "zero", "n", "axis0"], ["first"]),
            helper.make_node("Slice", ["scores", "n", "end", "axis0"], ["second"]),
            helper.make_node("Add", ["first", "second"], ["pair"]),
            helper.make_node("Mul", ["pair", "half"], [OUTPUT_NAME]),
        ]
    else:
        nodes.append(helper.make_node("Identity", ["scores"], [OUTPUT_NAME]))
    graph = helper.make_graph(
        nodes, "attention_test",
        [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, ["N", size, size, 1])],
        [helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, ["N", 1])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    meta = ModelMetadata(preprocess=settings or PreprocessSettings(size=size), threshold=0.5,
                         model_version=version)
    onnx.helper.set_model_props(model, meta.to_props())
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path
