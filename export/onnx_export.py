"""Keras model -> ONNX file the worker can serve: graph, metadata, parity check, load check.

1. convert with tf2onnx (explicit input signature: the route that works with Keras 3), input
   named ``image`` with a free batch dimension, output renamed to ``score``;
2. version the model by a hash of the graph's bytes *before* metadata is added, so the same
   weights get the same version whatever metadata (metrics, command line) travels with them;
3. write :class:`worker.scoring.model_metadata.ModelMetadata` into ``metadata_props``;
4. add the attention head's weights as a second output, ``attention``, when the model has
   the head (export/attention.py; after the version, which therefore names the scoring graph
   whether or not the output was added; the score checked bit-identical);
5. check parity: Keras and ONNX Runtime (through the worker's own :class:`Scorer`) on real
   preprocessed images must agree within ``tolerance``, or the export fails.

tf2onnx converts TensorFlow graphs, so this module needs the TensorFlow backend; a ``.keras``
file trained under another backend loads into it unchanged.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from export.onnx_file import save_atomically
from trainer.dataset import read_predictions
from worker.imaging.preprocess import PreprocessSettings, preprocess_file
from worker.scoring.model_file import file_sha256
from worker.scoring.model_metadata import (
    AGGREGATION_LEVELS,
    DEFAULT_AGGREGATION,
    DEFAULT_CLASS_NAMES,
    INPUT_NAME,
    OUTPUT_NAME,
    ModelMetadata,
    OperatingPoint,
)
from worker.scoring.scorer import Scorer

OPSET = 17
TOLERANCE = 1e-4


class ExportError(RuntimeError):
    """The model cannot be exported as asked; the message is one line."""


def _keras() -> Any:
    """Keras on the TensorFlow backend (tf2onnx needs TensorFlow graphs)."""
    if "keras" not in sys.modules:
        os.environ["KERAS_BACKEND"] = "tensorflow"
    import keras

    if keras.backend.backend() != "tensorflow":
        raise ExportError(
            f"ONNX export needs KERAS_BACKEND=tensorflow, this process runs "
            f"{keras.backend.backend()}; run the export in a fresh process"
        )
    return keras


@dataclass(frozen=True)
class ExportReport:
    path: Path
    model_version: str
    sha256: str  # of the written file: what a worker config may pin
    size_bytes: int
    opset: int
    parity_images: int
    max_abs_diff: float | None  # Keras vs ONNX Runtime on the parity images
    seconds: float

    def describe(self) -> str:
        parity = (f"max |keras - onnx| = {self.max_abs_diff:.2e} on {self.parity_images} images"
                  if self.max_abs_diff is not None else "no parity images")
        return (f"wrote {self.path} ({self.size_bytes / 1e6:.2f} MB, opset {self.opset})\n"
                f"  model version {self.model_version}\n  sha256 {self.sha256}\n  {parity}")


def convert(model: Any, opset: int = OPSET) -> Any:
    """A Keras (TensorFlow backend) model -> ``onnx.ModelProto`` with I/O named image/score."""
    import tensorflow as tf
    import tf2onnx

    size = model.input_shape[1]
    spec = [tf.TensorSpec((None, size, size, 1), tf.float32, name=INPUT_NAME)]
    proto, _ = tf2onnx.convert.from_keras(model, input_signature=spec, opset=opset)
    graph = proto.graph
    if len(graph.input) != 1 or len(graph.output) != 1:
        raise ExportError(f"expected one input and one output, got {len(graph.input)} and "
                          f"{len(graph.output)}")
    if graph.input[0].name != INPUT_NAME:
        _rename_value(graph, graph.input[0].name, INPUT_NAME)
    if graph.output[0].name != OUTPUT_NAME:
        _rename_value(graph, graph.output[0].name, OUTPUT_NAME)
    canonicalise(proto)
    return proto


def _rename_value(graph: Any, old: str, new: str) -> None:
    """Rename a graph input/output and every node edge that refers to it."""
    for node in graph.node:
        node.input[:] = [new if name == old else name for name in node.input]
        node.output[:] = [new if name == old else name for name in node.output]
    for value in list(graph.input) + list(graph.output) + list(graph.value_info):
        if value.name == old:
            value.name = new


def canonicalise(proto: Any) -> None:
    """Name every node and internal tensor by its position, and the batch dimension "N".

    tf2onnx numbers names from a process-wide counter, so converting the same weights twice
    gives different bytes; after this, equal graphs serialise equally and hash equally.
    """
    graph = proto.graph
    keep = {v.name for v in graph.input} | {v.name for v in graph.output}
    names: dict[str, str] = {}

    def canon(name: str) -> str:
        if not name or name in keep:
            return name
        return names.setdefault(name, f"t{len(names)}")

    for i, node in enumerate(graph.node):
        node.input[:] = [canon(n) for n in node.input]
        node.output[:] = [canon(n) for n in node.output]
        node.name = f"n{i}_{node.op_type}"
    inits = sorted(graph.initializer, key=lambda t: int(canon(t.name)[1:]))
    for tensor in inits:
        tensor.name = canon(tensor.name)
    del graph.initializer[:]
    graph.initializer.extend(inits)
    for value in graph.value_info:
        value.name = canon(value.name)
    for value in list(graph.input) + list(graph.output):
        for dim in value.type.tensor_type.shape.dim:
            if dim.HasField("dim_param"):
                dim.dim_param = "N"


def model_version(model_name: str, graph_bytes: bytes) -> str:
    """``<name>-<first 12 hex of sha256(graph without metadata)>``: content-addressed."""
    name = re.sub(r"[^a-z0-9_.-]+", "-", model_name.lower()).strip("-") or "model"
    return f"{name}-{hashlib.sha256(graph_bytes).hexdigest()[:12]}"


def load_parity_images(paths: Sequence[str | Path], settings: PreprocessSettings) -> np.ndarray:
    """Preprocess image files exactly as the worker will (N, size, size, 1) float32."""
    if not paths:
        return np.zeros((0, settings.size, settings.size, 1), dtype=np.float32)
    return np.stack([preprocess_file(p, settings) for p in paths]).astype(np.float32)


def export_to_onnx(
    keras_model_path: str | Path,
    out_path: str | Path,
    *,
    threshold: float,
    threshold_rule: str = "",
    preprocess: PreprocessSettings | None = None,
    metrics: dict[str, Any] | None = None,
    training: dict[str, Any] | None = None,
    class_names: tuple[str, str] = DEFAULT_CLASS_NAMES,
    operating_points: dict[str, OperatingPoint] | None = None,
    default_operating_point: str = "default",
    aggregation: dict[str, str] | None = None,
    parity_images: Sequence[str | Path] | np.ndarray = (),
    tolerance: float = TOLERANCE,
    opset: int = OPSET,
) -> ExportReport:
    """Convert ``keras_model_path`` to ``out_path`` with metadata, and prove it scores alike.

    ``preprocess`` defaults to the model's input size with default settings; it must match the
    preprocessing the model was trained with (``metrics.json`` records it). ``parity_images``:
    image files (preprocessed here with ``preprocess``) or an array already preprocessed.
    Raises :class:`ExportError` if the Keras and ONNX scores differ by more than ``tolerance``.
    """
    started = time.time()
    _keras()  # before any Keras import below: the TensorFlow backend, or a clear error
    src, out = Path(keras_model_path), Path(out_path)
    if not src.is_file():
        raise ExportError(f"Keras model not found: {src}")
    from trainer.layers import load_trained

    model = load_trained(src)
    size = model.input_shape[1]
    if model.input_shape[1:] != (size, size, 1):
        raise ExportError(f"model input {model.input_shape} is not (None, S, S, 1)")
    settings = preprocess or PreprocessSettings(size=size)
    if settings.size != size:
        raise ExportError(f"preprocessing size {settings.size} != model input size {size}")

    proto = convert(model, opset)
    version = model_version(model.name, proto.SerializeToString())
    from export.attention import AttentionExportError, add_attention_checked

    try:
        add_attention_checked(proto, required=False)
    except AttentionExportError as exc:
        raise ExportError(f"attention output: {exc}") from exc
    info = dict(training or {})
    info.setdefault("exported_utc", datetime.now(UTC).isoformat(timespec="seconds"))
    info.setdefault("keras_model", src.name)
    meta = ModelMetadata(
        preprocess=settings, threshold=float(threshold), model_version=version,
        class_names=class_names, threshold_rule=threshold_rule, metrics=dict(metrics or {}),
        training=info, operating_points=dict(operating_points or {}),
        default_operating_point=default_operating_point,
        aggregation=dict(aggregation or DEFAULT_AGGREGATION),
    )
    _save_checked(proto, meta, out)
    n, max_diff = _parity(model, out, parity_images, settings, tolerance)
    return ExportReport(
        path=out, model_version=version, sha256=file_sha256(out), size_bytes=out.stat().st_size,
        opset=opset, parity_images=n, max_abs_diff=max_diff,
        seconds=round(time.time() - started, 1),
    )


def _save_checked(proto: Any, meta: ModelMetadata, out: Path) -> None:
    """``proto`` with ``meta`` as its properties, checked, written to ``out`` in one step."""
    import onnx

    onnx.helper.set_model_props(proto, meta.to_props())
    proto.doc_string = ("mammo-screen research model (not a medical device): "
                        "P(malignant) from one preprocessed mammogram")
    onnx.checker.check_model(proto)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_atomically(proto, out)


def _parity(model: Any, out: Path, parity_images: Sequence[str | Path] | np.ndarray,
            settings: PreprocessSettings, tolerance: float) -> tuple[int, float | None]:
    """(images compared, the largest |Keras - ONNX| score difference on them; None: no
    images), the ONNX model read by the worker's own loader; :class:`ExportError` above
    ``tolerance``."""
    scorer = Scorer(out)  # the worker's loader: metadata, input shape, session
    images = (np.asarray(parity_images, dtype=np.float32)
              if isinstance(parity_images, np.ndarray)
              else load_parity_images(parity_images, settings))
    if not len(images):
        return 0, None
    ref = np.asarray(model.predict(images, verbose=0), dtype=np.float64).reshape(-1)
    got = scorer.score_batch(list(images)).astype(np.float64)
    max_diff = float(np.max(np.abs(ref - got)))
    if not max_diff <= tolerance:
        raise ExportError(f"parity check failed: max |keras - onnx| = {max_diff:.3e} "
                          f"> {tolerance:g} on {len(images)} images")
    return len(images), max_diff


# --- from a training run folder -------------------------------------------------------------


def read_run_metrics(metrics_path: str | Path) -> dict[str, Any]:
    """``metrics.json`` written by :func:`trainer.train.train`."""
    path = Path(metrics_path)
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ExportError(f"cannot read {path}: {exc}") from exc
    for key in ("threshold", "preprocess", "validation"):
        if key not in data:
            raise ExportError(f"{path} has no '{key}': is it a training run's metrics.json?")
    return data


def metadata_from_run(run: dict[str, Any]) -> dict[str, Any]:
    """Keyword arguments for :func:`export_to_onnx` from a run's metrics.json."""
    validation = run["validation"]
    metrics: dict[str, Any] = {"validation_image": validation.get("image")}
    if validation.get("breast"):
        metrics["validation_breast"] = validation["breast"]
    metrics["best_epoch"] = run.get("best_epoch")
    training = dict(run.get("training", {}))
    training["split"] = run.get("split", {})
    # Operating points and the view-combination rule, when the trainer chose them on
    # validation data; a run without them exports one "default" point and the default rule.
    points = {name: OperatingPoint.from_dict(p)
              for name, p in run.get("operating_points", {}).items()}
    default_point = run.get("default_operating_point", "default")
    if points and default_point not in points:
        raise ExportError(f"default operating point {default_point!r} is not among "
                          f"{sorted(points)}")
    if points and points[default_point].threshold != float(run["threshold"]):
        raise ExportError("metrics.json: 'threshold' is not the default operating point's")
    aggregation = run.get("aggregation")
    return {
        "operating_points": points,
        "default_operating_point": default_point,
        "aggregation": ({k: aggregation[k] for k in AGGREGATION_LEVELS} if aggregation
                        else None),
        "threshold": float(run["threshold"]),
        "threshold_rule": run.get("threshold_rule", ""),
        "preprocess": PreprocessSettings(**run["preprocess"]),
        "metrics": metrics,
        "training": training,
        "class_names": tuple(run.get("class_names", DEFAULT_CLASS_NAMES)),
    }


def validation_image_paths(run_dir: str | Path, images_base: str | Path, n: int) -> list[Path]:
    """Up to ``n`` of the run's validation images (``val_predictions.csv``), both classes
    interleaved, resolved against ``images_base`` (the training source's folder)."""
    if n <= 0:
        return []
    rows = read_predictions(Path(run_dir) / "val_predictions.csv", images_base)
    if not rows:
        raise ExportError(f"{Path(run_dir) / 'val_predictions.csv'} not found; pass parity "
                          "images explicitly")
    by_class = [[r for r in rows if r.label == c] for c in (0, 1)]
    picked: list[Path] = []
    for i in range(max(len(c) for c in by_class)):
        for rows_of_class in by_class:
            if i < len(rows_of_class) and len(picked) < n:
                picked.append(rows_of_class[i].path)
    missing = [p for p in picked if not p.is_file()]
    if missing:
        raise ExportError(f"validation image not found: {missing[0]} (pass --images)")
    return picked
