"""Baselines: the NumPy logistic regression, and the figures on the real dev-pool split."""

from __future__ import annotations

import numpy as np
import pytest

from tests.conftest import DATA
from trainer.baselines import compute_baselines, one_hot, predict_logistic
from trainer.logistic import balanced_weights, fit_logistic
from worker.audit.metrics import roc_auc


def test_logistic_regression_learns_an_informative_category() -> None:
    rng = np.random.default_rng(0)
    cat = rng.integers(0, 3, 400).astype(str)
    y = (rng.random(400) < np.where(cat == "2", 0.8, 0.2)).astype(int)
    x = one_hot(list(cat), ["0", "1", "2"])
    w = fit_logistic(x, y, 1e-2, balanced_weights(y))
    p = predict_logistic(w, x)
    assert roc_auc(y, p) > 0.75
    assert p[cat == "2"].min() > p[cat != "2"].max()
    assert one_hot(["9"], ["0", "1"]).sum() == 0  # unseen category: all zeros


def test_baselines_on_the_dev_pool() -> None:
    labels = DATA / "labels.csv"
    if not labels.is_file():
        pytest.skip(f"dev pool not found at {DATA}")
    out = compute_baselines(labels, 0.2, seed=0, machine_column="rsna_machine_id",
                            site_column="rsna_site_id", score_columns=("bright_background", "age"))
    b = out["baselines"]
    val = out["split"]["val"]
    assert b["majority"]["auc"] == 0.5
    assert b["majority"]["accuracy"] == pytest.approx(val["benign_images"] / val["images"])
    for name in ("metadata_logreg", "machine_rate", "bright_background", "age"):
        assert 0.3 < b[name]["auc"] < 0.8, name
        assert b[name]["sensitivity"] >= 0.9, name


def test_baselines_command_prints_the_figures_as_json() -> None:
    """`screen baselines`: compute_baselines's figures, as sorted JSON."""
    import json

    from click.testing import CliRunner

    from trainer.study_commands import baselines

    labels = DATA / "labels.csv"
    if not labels.is_file():
        pytest.skip(f"dev pool not found at {DATA}")
    result = CliRunner().invoke(baselines, [str(labels), "--machine-column", "rsna_machine_id",
                                            "--score-column", "age", "--seed", "1"])
    assert result.exit_code == 0, result.output
    want = compute_baselines(labels, 0.2, seed=1, machine_column="rsna_machine_id",
                             score_columns=("age",))
    assert result.output == json.dumps(want, indent=2, sort_keys=True) + "\n"
    assert set(json.loads(result.output)["baselines"]) == {"majority", "metadata_logreg",
                                                           "machine_rate", "age"}
