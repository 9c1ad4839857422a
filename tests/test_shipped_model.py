"""The shipped model: present, carrying its metadata, and served by `screen process`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np

from tests.conftest import REPO, SHIPPED_MODEL, copy_into, dev_pool_images
from worker.config import load_config
from worker.imaging.preprocess import preprocess_file
from worker.scoring.scorer import Scorer


def test_default_config_points_at_the_shipped_model() -> None:
    assert load_config(REPO / "config.toml").model_path == SHIPPED_MODEL
    assert SHIPPED_MODEL.is_file(), "models/ must hold the shipped model (see its model card)"
    scorer = Scorer(SHIPPED_MODEL)
    meta = scorer.metadata
    assert meta.threshold_rule and 0.0 < meta.threshold < 1.0
    assert meta.metrics and meta.training.get("split", {}).get("strategy") == "patient"
    card = (REPO / "models" / "MODEL_CARD.md").read_text()
    assert scorer.version in card, "the model card must name the shipped model's version"


def test_the_shipped_model_scores_an_image_and_its_mirror_image_alike() -> None:
    """The recipe scores the mean of an image and its mirror image (card: "What it is"), so a
    left breast and the same picture mirrored get one score; a plain network would not."""
    scorer = Scorer(SHIPPED_MODEL)
    x = [preprocess_file(p, scorer.metadata.preprocess) for p in dev_pool_images(8)]
    plain, mirrored = scorer.score_batch(x), scorer.score_batch([a[:, ::-1] for a in x])
    assert np.abs(plain - mirrored).max() < 1e-4
    assert plain.std() > 0.01, "a model that gives one score to all is broken"


def test_screen_process_with_the_shipped_model(tmp_path: Path) -> None:
    images = dev_pool_images(16)
    copy_into(images, tmp_path / "inbox")
    (tmp_path / "c.toml").write_text(
        f"[model]\npath = '{SHIPPED_MODEL}'\n[paths]\ninbox = 'inbox'\ncreate_missing = true\n"
        "processed = 'done'\nquarantine = 'bad'\n[database]\nurl = 'sqlite:///s.db'\n"
        "[worker]\nsettle_seconds = 0.2\n")
    run = [sys.executable, "-m", "worker", "--config", str(tmp_path / "c.toml")]
    proc = subprocess.run([*run, "process"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "scored 16" in proc.stdout
    out = subprocess.run([*run, "results", "--format", "json"], capture_output=True, text=True,
                         timeout=60)
    rows = json.loads(out.stdout)
    version = Scorer(SHIPPED_MODEL).version
    assert len(rows) == 16 and {r["model_version"] for r in rows} == {version}
    assert len({r["score"] for r in rows}) > 1, "a model that gives one score to all is broken"
    assert {r["filename"] for r in rows} == {p.name for p in images}
