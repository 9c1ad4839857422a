"""Cross-validation of a recipe: folds by patient, out-of-fold figures, shortcut checks."""

from __future__ import annotations

import pytest

from tests.conftest import DATA

pytest.importorskip("keras")
pytestmark = pytest.mark.train


def test_crossval_tiny_run_reports_every_figure() -> None:
    if not DATA.is_dir():
        pytest.skip("dev pool not available")
    from trainer.crossval import CVConfig, cross_validate

    cfg = CVConfig(source=DATA / "labels.csv", arch="cnn", size=64, epochs=1, batch_size=16,
                   folds=2, limit=40, loso=True, name="tiny")
    r = cross_validate(cfg)
    assert r["images"] >= 40 and len(r["fold_auc"]) == 2
    for key in ("auc_pooled", "breast_auc", "machine49_auc", "sensitivity", "specificity"):
        assert r[key] is None or 0.0 <= r[key] <= 1.0
    c = r["confusion"]
    assert c["tp"] + c["fp"] + c["tn"] + c["fn"] == r["images"]
    assert set(r["leave_one_site_out_auc"]) == {"site1", "site2"}
    assert "tta" in r and len(r["tta"]["fold_auc"]) == 2
