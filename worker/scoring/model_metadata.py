"""The contract between the exporter and the worker: what an ONNX model carries about itself.

The exporter writes these keys into the ONNX ``metadata_props``; the worker reads them back
and refuses a model that lacks them. Plain Python so both sides can import it.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

from worker.imaging.preprocess import PREPROCESS_VERSION, PreprocessSettings

PREFIX = "mammo_screen."
KEY_PREPROCESS = PREFIX + "preprocess"
KEY_THRESHOLD = PREFIX + "threshold"
KEY_THRESHOLD_RULE = PREFIX + "threshold_rule"
KEY_CLASS_NAMES = PREFIX + "class_names"
KEY_MODEL_VERSION = PREFIX + "model_version"
KEY_METRICS = PREFIX + "metrics"
KEY_TRAINING = PREFIX + "training"
KEY_AGGREGATION = PREFIX + "aggregation"
KEY_OPERATING_POINTS = PREFIX + "operating_points"

INPUT_NAME = "image"
OUTPUT_NAME = "score"
# Optional second output: the attention head's weight per position of its feature map,
# (N, H, W), summing to 1 per image (export/attention.py adds it; worker/records/heatmaps.py
# stores it).
ATTENTION_NAME = "attention"
DEFAULT_CLASS_NAMES = ("benign", "malignant")
# How image scores make a breast score, and breast scores an exam score. Models exported
# before the key existed get the default.
AGGREGATION_LEVELS = ("breast", "exam")
AGGREGATION_RULES = ("mean", "max")
DEFAULT_AGGREGATION = {"breast": "mean", "exam": "max"}


def parse_aggregation(raw: Any) -> dict[str, str]:
    """A checked {"breast": rule, "exam": rule}, each rule one of AGGREGATION_RULES."""
    if not isinstance(raw, dict) or set(raw) != set(AGGREGATION_LEVELS):
        raise ValueError(f"aggregation must have exactly the keys {list(AGGREGATION_LEVELS)}")
    bad = {k: v for k, v in raw.items() if v not in AGGREGATION_RULES}
    if bad:
        raise ValueError(f"aggregation rules must be among {list(AGGREGATION_RULES)}: {bad}")
    return {k: str(raw[k]) for k in AGGREGATION_LEVELS}


class ModelMetadataError(ValueError):
    """A model file that does not carry (valid) mammo-screen metadata."""


@dataclass(frozen=True)
class OperatingPoint:
    """A named threshold chosen on validation data, and what it gave there."""

    threshold: float
    rule: str = ""
    sensitivity: float | None = None
    specificity: float | None = None
    recall_rate: float | None = None  # share of validation images it calls malignant

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> OperatingPoint:
        point = cls(threshold=float(raw["threshold"]), rule=str(raw.get("rule", "")),
                    **{k: None if raw.get(k) is None else float(raw[k])
                       for k in ("sensitivity", "specificity", "recall_rate")})
        if not 0.0 <= point.threshold <= 1.0:
            raise ValueError(f"operating point threshold {point.threshold} is not in [0, 1]")
        return point


@dataclass(frozen=True)
class ModelMetadata:
    preprocess: PreprocessSettings
    threshold: float
    model_version: str
    class_names: tuple[str, str] = DEFAULT_CLASS_NAMES
    threshold_rule: str = ""
    metrics: dict[str, Any] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)
    aggregation: dict[str, str] = field(default_factory=lambda: dict(DEFAULT_AGGREGATION))
    # Named thresholds (e.g. sens90, recall10); ``threshold`` is the default one's. Models
    # exported before the key existed have one point, "default", at their threshold.
    operating_points: dict[str, OperatingPoint] = field(default_factory=dict)
    default_operating_point: str = "default"

    @property
    def points(self) -> dict[str, OperatingPoint]:
        """Every operating point, the default one included."""
        return self.operating_points or {
            self.default_operating_point: OperatingPoint(self.threshold, self.threshold_rule)}

    def operating_point(self, name: str = "") -> tuple[str, OperatingPoint]:
        """(name, point) for ``name``, or the default for ""; an unknown name is an error
        listing the ones the model has."""
        name = name or self.default_operating_point
        if name not in self.points:
            raise ModelMetadataError(
                f"model has no operating point {name!r} (it has: {', '.join(self.points)})")
        return name, self.points[name]

    def to_props(self) -> dict[str, str]:
        return {
            KEY_OPERATING_POINTS: json.dumps(
                {"default": self.default_operating_point,
                 "points": {k: asdict(v) for k, v in self.points.items()}}, sort_keys=True),
            KEY_PREPROCESS: self.preprocess.to_json(),
            KEY_THRESHOLD: repr(float(self.threshold)),
            KEY_THRESHOLD_RULE: self.threshold_rule,
            KEY_CLASS_NAMES: json.dumps(list(self.class_names)),
            KEY_MODEL_VERSION: self.model_version,
            KEY_METRICS: json.dumps(self.metrics, sort_keys=True),
            KEY_TRAINING: json.dumps(self.training, sort_keys=True),
            KEY_AGGREGATION: json.dumps(parse_aggregation(self.aggregation)),
        }

    @classmethod
    def from_props(cls, props: dict[str, str]) -> ModelMetadata:
        missing = [k for k in (KEY_PREPROCESS, KEY_THRESHOLD, KEY_MODEL_VERSION) if k not in props]
        if missing:
            raise ModelMetadataError(
                f"model has no mammo-screen metadata ({', '.join(missing)} missing); "
                "export it with `screen export`"
            )
        try:
            pre = PreprocessSettings.from_json(props[KEY_PREPROCESS])
            threshold = float(props[KEY_THRESHOLD])
            names = tuple(json.loads(props.get(KEY_CLASS_NAMES, json.dumps(DEFAULT_CLASS_NAMES))))
            metrics = json.loads(props.get(KEY_METRICS, "{}"))
            training = json.loads(props.get(KEY_TRAINING, "{}"))
            aggregation = parse_aggregation(
                json.loads(props.get(KEY_AGGREGATION, json.dumps(DEFAULT_AGGREGATION)))
            )
            raw_points = json.loads(props.get(KEY_OPERATING_POINTS, "{}"))
            points = {str(k): OperatingPoint.from_dict(v)
                      for k, v in raw_points.get("points", {}).items()}
            default_point = str(raw_points.get("default", "default"))
            if points and default_point not in points:
                raise ValueError(f"default operating point {default_point!r} is not among "
                                 f"{sorted(points)}")
        except (ValueError, TypeError) as exc:
            raise ModelMetadataError(f"model metadata is invalid: {exc}") from exc
        if pre.version != PREPROCESS_VERSION:
            raise ModelMetadataError(
                f"model was trained with preprocessing v{pre.version}, this worker has "
                f"v{PREPROCESS_VERSION}; retrain or upgrade"
            )
        if len(names) != 2 or not 0.0 <= threshold <= 1.0:
            raise ModelMetadataError(
                "model metadata needs two class names and a threshold in [0, 1]"
            )
        return cls(
            preprocess=pre,
            threshold=threshold,
            model_version=props[KEY_MODEL_VERSION],
            class_names=(str(names[0]), str(names[1])),
            threshold_rule=props.get(KEY_THRESHOLD_RULE, ""),
            metrics=metrics,
            training=training,
            aggregation=aggregation,
            operating_points=points,
            default_operating_point=default_point,
        )
