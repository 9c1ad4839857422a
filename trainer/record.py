"""The run's record: ``metrics.json``, the validation predictions CSV, the hardware it ran
on, and the few lines printed at the end of a run."""

from __future__ import annotations

import csv
import json
import os
import platform
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import keras
import numpy as np

from trainer.dataset import CLASS_NAMES, Sample

METRICS_FILE = "metrics.json"
HISTORY_FILE = "history.csv"  # written by keras.callbacks.CSVLogger as epochs end
PREDICTIONS_FILE = "val_predictions.csv"


def hardware() -> str:
    """CPU count and the Keras backend's devices, for the model card."""
    try:
        devices = ", ".join(keras.distribution.list_devices())
    except Exception:  # not every backend implements device listing
        devices = "unknown devices"
    cpu = platform.processor() or platform.machine()
    try:  # Linux names the CPU model; platform.processor() often says only "x86_64"
        with open("/proc/cpuinfo") as fh:
            cpu = next(line.split(":", 1)[1].strip() for line in fh
                       if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return (f"{cpu}, {os.cpu_count()} CPU core(s); Keras {keras.__version__}, "
            f"backend {keras.backend.backend()} on {devices}")


def relative(path: Path, base: Path) -> str:
    """``path`` relative to ``base`` when inside it (records must not carry machine paths)."""
    try:
        return str(path.resolve().relative_to(base.resolve()))
    except ValueError:
        return str(path)


def write_predictions(path: Path, samples: Sequence[Sample], scores: np.ndarray,
                      threshold: float, base: Path) -> None:
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["filename", "label", "score", "predicted", "patient_id", "laterality"])
        for s, score in zip(samples, scores, strict=True):
            writer.writerow([relative(s.path, base), CLASS_NAMES[s.label], f"{score:.6f}",
                             CLASS_NAMES[int(score >= threshold)], s.patient_id or "",
                             s.laterality or ""])


def write_metrics(path: Path, metrics: dict[str, Any]) -> None:
    path.write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")


def _fmt(value: float | None, pct: bool = False) -> str:
    if value is None:
        return "n/a"
    return f"{value:.1%}" if pct else f"{value:.3f}"


def format_summary(metrics: dict[str, Any]) -> str:
    """A few readable lines for the end of a run."""
    img = metrics["validation"]["image"]
    lines = [
        f"validation: {img['n']} images, {metrics['split']['val']['patients']} patients "
        f"(split by {metrics['split']['strategy']}, seed {metrics['split']['seed']})",
        f"  image AUC {_fmt(img['auc'])}   accuracy {_fmt(img['accuracy'], True)}   "
        f"sensitivity {_fmt(img['sensitivity'], True)}   "
        f"specificity {_fmt(img['specificity'], True)}",
        f"  threshold {metrics['threshold']:.4f}: {metrics['threshold_rule']}",
        f"  confusion: TP {img['tp']}  FN {img['fn']}  FP {img['fp']}  TN {img['tn']}",
    ]
    breast = metrics["validation"].get("breast")
    if breast:
        lines.append(f"  breast-level AUC {_fmt(breast['auc'])} over {breast['n']} breasts")
    for name, p in metrics.get("operating_points", {}).items():
        lines.append(f"  {name}: threshold {p['threshold']:.4f}, sensitivity "
                     f"{_fmt(p['sensitivity'], True)}, specificity "
                     f"{_fmt(p['specificity'], True)}, recall rate "
                     f"{_fmt(p['recall_rate'], True)}")
    agg = metrics.get("aggregation")
    if agg:
        lines.append(f"  views combined: breast = {agg['breast']} of its images, "
                     f"exam = {agg['exam']} of its breasts")
    probe = metrics["training"].get("probe")
    if probe:
        lines.append(f"  linear probe ({probe['pooling']} pooling), penalty l2 {probe['l2']}, "
                     f"{metrics['training']['seconds']:.0f} s")
    else:
        lines.append(f"  best epoch {metrics['best_epoch']} of {metrics['epochs_run']}, "
                     f"{metrics['training']['seconds']:.0f} s")
    return "\n".join(lines)
