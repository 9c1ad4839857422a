"""Operating points: named thresholds chosen on validation data, carried in the model, picked by
name in the config; images, breasts and exams are all called at the chosen one."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import make_mean_model, write_mammo_like
from worker.app import open_worker, status
from worker.audit.figures import operating_point_figures
from worker.audit.units import AuditRow
from worker.config import load_config
from worker.imaging.preprocess import PreprocessSettings
from worker.scoring.model_file import ModelLoadError
from worker.scoring.model_metadata import ModelMetadata, OperatingPoint
from worker.scoring.scorer import Scorer

POINTS = {"sens90": 0.3, "sens80": 0.6, "recall10": 0.9}


def test_metadata_round_trip_keeps_every_point() -> None:
    meta = ModelMetadata(
        preprocess=PreprocessSettings(size=32), threshold=0.3, model_version="v",
        operating_points={"sens90": OperatingPoint(0.3, "rule a", 0.9, 0.2, 0.8),
                          "recall10": OperatingPoint(0.9, "rule b", 0.3, 0.95, 0.1)},
        default_operating_point="sens90")
    back = ModelMetadata.from_props(meta.to_props())
    assert back.points == meta.points and back.default_operating_point == "sens90"
    assert back.operating_point("recall10") == ("recall10", meta.points["recall10"])


def test_a_model_without_points_has_one_default_at_its_threshold() -> None:
    props = ModelMetadata(preprocess=PreprocessSettings(size=32), threshold=0.42,
                          model_version="old", threshold_rule="r").to_props()
    del props["mammo_screen.operating_points"]  # as exported before the key existed
    meta = ModelMetadata.from_props(props)
    assert meta.operating_point("") == ("default", OperatingPoint(0.42, "r"))


def test_scorer_uses_the_named_point_and_refuses_an_unknown_one(tmp_path: Path) -> None:
    path = make_mean_model(tmp_path / "m.onnx", operating_points=POINTS)
    assert Scorer(path).threshold == 0.3  # the first point is the default
    scorer = Scorer(path, operating_point="recall10")
    assert (scorer.operating_point, scorer.threshold) == ("recall10", 0.9)
    listed = r"no operating point 'sens99' \(it has: recall10, sens80, sens90\)"
    with pytest.raises(ModelLoadError, match=listed):
        Scorer(path, operating_point="sens99")


def _config(folder: Path, point: str) -> Path:
    make_mean_model(folder / "m.onnx", operating_points=POINTS)
    for sub in ("inbox", "processed", "quarantine", "outbox"):
        (folder / sub).mkdir(exist_ok=True)
    path = folder / "config.toml"
    path.write_text(
        "[paths]\ninbox = 'inbox'\nprocessed = 'processed'\nquarantine = 'quarantine'\n"
        "outbox = 'outbox'\n[database]\nurl = 'sqlite:///screen.db'\n"
        f"[model]\npath = 'm.onnx'\noperating_point = '{point}'\n"
        "[worker]\nsettle_seconds = 0.1\nstudy_settle_seconds = 0\n"
        "[identity]\nfilename_pattern = '^(?P<study_uid>[^_]+)_(?P<laterality>[LR])'\n")
    return path


def test_config_picks_the_point_that_labels_images_and_exams(tmp_path: Path) -> None:
    config = load_config(_config(tmp_path, "recall10"))
    assert config.model_operating_point == "recall10"
    write_mammo_like(config.inbox / "S1_L.png", bright=0.6)
    worker = open_worker(config)
    try:
        [result] = worker.watcher.run_once(timeout=30, settle_now=True)
    finally:
        worker.close()
    # The mean model scores this image between the default point (0.3) and recall10 (0.9).
    assert 0.3 < result.score < 0.9
    assert result.label == "benign"
    info = status(config)
    assert info["model"]["operating_point"] == "recall10"
    assert set(info["model"]["operating_points"]) == set(POINTS)
    out = subprocess.run([sys.executable, "-m", "worker", "--config", str(tmp_path / "config.toml"),
                          "results", "--level", "exam", "--format", "json"],
                         capture_output=True, text=True, check=True)
    [exam] = json.loads(out.stdout)
    assert exam["label"] == "benign" and exam["score"] == pytest.approx(result.score)


def test_unknown_point_in_config_is_one_line(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "worker", "--config",
                           str(_config(tmp_path, "sens99")), "process"],
                          capture_output=True, text=True)
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "no operating point 'sens99'" in lines[0], proc.stderr


def test_report_shows_what_each_point_implies() -> None:
    rows = [AuditRow(i, f"{i}.png", "v", truth, score, 0.3, score >= 0.3)
            for i, (truth, score) in enumerate(
                [(True, 0.95), (True, 0.5), (True, 0.2), (False, 0.4), (False, 0.1)])]
    unlabelled = [0.92, 0.05, 0.6]  # scored images with no outcome yet count in recall rate
    scores = np.array([r.score for r in rows] + unlabelled)
    points = {"sens90": OperatingPoint(0.3, "a", 0.9, 0.2, 0.7),
              "recall10": OperatingPoint(0.9, "b", 0.3, 0.95, 0.1)}
    low, high = operating_point_figures(points, scores, rows)  # in threshold order
    assert (low["name"], low["recall_rate"]) == ("sens90", 5 / 8)
    assert (low["sensitivity"], low["specificity"]) == (2 / 3, 1 / 2)
    assert (high["name"], high["recall_rate"]) == ("recall10", 2 / 8)
    assert (high["sensitivity"], high["specificity"]) == (1 / 3, 1.0)
    assert high["validation"] == {"sensitivity": 0.3, "specificity": 0.95, "recall_rate": 0.1}
