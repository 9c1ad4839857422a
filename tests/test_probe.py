"""The linear-probe recipe: NumPy logistic regression, frozen features, the whole model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import DATA
from trainer.logistic import (
    _sigmoid,
    balanced_weights,
    choose_l2,
    fit_logistic,
    fit_probe,
)


def _toy(n: int = 600, d: int = 20, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d))
    w = np.zeros(d)
    w[:3] = (1.5, -1.0, 0.5)
    y = (rng.random(n) < _sigmoid(x @ w - 0.7)).astype(float)
    return x, y


def test_fit_logistic_reaches_the_optimum_of_its_objective() -> None:
    x, y = _toy()
    sw = balanced_weights(y)
    theta = fit_logistic(x, y, l2=0.05, sample_weight=sw)
    # Gradient of mean_w(log loss) + l2/2 |coef|^2 vanishes at the returned point.
    w = sw / sw.sum()
    xa = np.hstack([x, np.ones((len(x), 1))])
    grad = xa.T @ (w * (_sigmoid(xa @ theta) - y))
    grad[:-1] += 0.05 * theta[:-1]
    assert np.abs(grad).max() < 1e-9
    # And it finds the planted signal: the three informative features dominate.
    assert set(np.argsort(-np.abs(theta[:-1]))[:3]) == {0, 1, 2}


def test_stronger_penalty_shrinks_the_coefficients() -> None:
    x, y = _toy()
    norms = [np.linalg.norm(fit_logistic(x, y, l2)[:-1]) for l2 in (0.001, 0.1, 10.0)]
    assert norms[0] > norms[1] > norms[2]


def test_balanced_weights_give_each_class_half_the_loss() -> None:
    y = np.array([0, 0, 0, 0, 1, 1])
    w = balanced_weights(y)
    assert w[y == 0].sum() == pytest.approx(w[y == 1].sum())
    with pytest.raises(ValueError, match="both classes"):
        balanced_weights(np.zeros(5))


def test_dense_weights_fold_the_standardisation_in() -> None:
    x, y = _toy()
    x = x * np.linspace(0.1, 50, x.shape[1]) + 7.0  # unscaled raw features
    probe = fit_probe(x, y, l2=0.1)
    kernel, bias = probe.dense_weights()
    raw = _sigmoid(x @ kernel[:, 0].astype(float) + float(bias[0]))
    np.testing.assert_allclose(raw, probe.predict(x), atol=1e-5)


def test_choose_l2_keeps_groups_whole_and_prefers_what_generalises() -> None:
    x, y = _toy(n=900, d=200, seed=1)  # many noise features: some penalty must help
    groups = np.repeat(np.arange(300), 3)
    best, aucs = choose_l2(x, y, groups, (1e-4, 0.1, 1e4), folds=3)
    assert len(aucs) == 3
    assert best == 0.1
    assert aucs[1] > aucs[0]


keras = pytest.importorskip("keras")


@pytest.mark.train
@pytest.mark.parametrize(("pooling", "taps", "width"), [
    ("avg+max", None, 2560),
    ("avg", ("block10_add", "block15_project_bn"), 2 * 112 + 2 * 320),
    ("avg", ("block15_project_bn",), 2 * 320),
])
def test_probe_model_scores_equal_the_fitted_probe(pooling: str, taps: tuple[str, ...] | None,
                                                   width: int) -> None:
    """The whole image -> score model computes the fitted probe on the fitted features."""
    from trainer.features import build_feature_model, build_tap_model, extract
    from trainer.probe import fit_probe_model

    rng = np.random.default_rng(0)
    x = rng.random((24, 64, 64, 1)).astype(np.float16)
    y = np.array([0, 1] * 12)
    groups = [f"p{i // 2}" for i in range(24)]
    fit = fit_probe_model(x, y, groups, size=64, pooling=pooling, mirrored=True,
                          l2_grid=(0.1, 1.0), inner_folds=2, progress=False, taps=taps)
    extractor = build_tap_model(64, taps) if taps else build_feature_model(64, pooling=pooling)
    feats = extract(extractor, x, progress=False)
    assert feats.shape == (24, width)
    keras_scores = np.asarray(fit.model.predict(x.astype(np.float32), verbose=0)).reshape(-1)
    np.testing.assert_allclose(keras_scores, fit.probe.predict(feats.astype(np.float64)),
                               atol=1e-4)
    assert fit.probe.l2 in (0.1, 1.0) and set(fit.l2_auc) == {0.1, 1.0}


@pytest.mark.train
def test_panel_judges_the_probe_on_cached_features(tmp_path: Path) -> None:
    if not DATA.is_dir():
        pytest.skip("dev pool not available")
    from trainer.dataset import DatasetError, discover, limit_samples
    from trainer.features import load_feature_sets
    from trainer.panel import PanelData, run_panel
    from trainer.probe import probe_fit_score
    from worker.imaging.preprocess import PreprocessSettings

    # Cached "features" need not come from the network to test the panel's bookkeeping: a
    # column that carries the label (plus noise) must score high everywhere, noise must not.
    labels = DATA / "labels.csv"
    samples = limit_samples([s for s in discover(labels) if s.split != "test"], 160, 0)
    y = np.array([s.label for s in samples], dtype=float)
    rng = np.random.default_rng(0)
    noise = rng.normal(size=(len(samples), 16))
    signal = noise.copy()
    signal[:, 0] += 3 * y
    settings = PreprocessSettings(size=64).to_json()
    paths = np.array([str(s.path) for s in samples[::-1]])  # another order than discover's
    res = {}
    for name, plain in (("signal", signal[::-1]), ("noise", noise[::-1])):
        np.savez(tmp_path / f"{name}.npz", paths=paths, settings=np.array(settings),
                 plain=plain, flipped=plain + rng.normal(scale=0.3, size=plain.shape))
        rows, feats, recorded = load_feature_sets([tmp_path / f"{name}.npz"], labels)
        assert json.loads(recorded[0])["size"] == 64 and len(rows) == len(samples)
        yy = np.array([s.label for s in rows])
        patients = np.array([s.patient_id for s in rows])
        data = PanelData.from_csv(labels, rows, "rsna_site_id", "rsna_machine_id")
        fit_score = probe_fit_score(feats, yy, patients, flip_train=True, tta=True,
                                    l2_grid=(0.1, 10.0))
        res[name] = run_panel(data, fit_score, holdouts=3, fraction=0.25, progress=None)
    good, bad = res["signal"], res["noise"]
    assert set(good["leave_one_site_out"]) == {"1", "2"}
    assert good["worst"] > 0.85 and bad["worst"] < 0.7
    assert len(good["holdouts"]["image_auc"]["values"]) == 3
    assert good["holdouts"]["breast_auc"]["mean"] > 0.85
    # A learning-curve point: every fit sees about half of its training patients, whole.
    seen: list[tuple[int, int]] = []

    def recording(tr: np.ndarray, te: np.ndarray, seed: int) -> np.ndarray:
        kept = {rows[i].patient_id for i in tr}
        seen.append((len(kept), len(tr)))
        # Whole patients: every image of a kept patient outside the scored rows is there.
        scored = set(te.tolist())
        assert set(tr.tolist()) == {i for i, s in enumerate(rows)
                                    if s.patient_id in kept and i not in scored}
        return fit_score(tr, te, seed)

    half = run_panel(data, recording, holdouts=2, fraction=0.25, progress=None,
                     train_fraction=0.5)
    assert half["train_fraction"] == 0.5 and len(seen) == 2 + len(half["leave_one_site_out"])
    full = {len({s.patient_id for s in rows})}
    assert all(n < 0.6 * max(full) for n, _ in seen)
    # The model card's learning-curve picture, from these two points.
    from trainer.plots import plot_learning_curve

    png = plot_learning_curve([good, half], tmp_path / "curve.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    # Feature files of other images cannot be put side by side.
    np.savez(tmp_path / "other.npz", paths=paths[1:], settings=np.array(settings),
             plain=noise[1:], flipped=noise[1:])
    with pytest.raises(DatasetError, match="different images"):
        load_feature_sets([tmp_path / "signal.npz", tmp_path / "other.npz"], labels)


@pytest.mark.train
def test_tap_model_pools_each_named_layer_by_average_and_max() -> None:
    from trainer.features import build_feature_model, build_tap_model

    taps = build_tap_model(64, ["block10_add", "head_relu"])
    assert taps.output_shape == (None, 2 * 112 + 2 * 1280)
    x = np.random.default_rng(1).random((2, 64, 64, 1)).astype(np.float32)
    # The head tap's pooled columns are the plain feature model's features.
    np.testing.assert_allclose(np.asarray(taps.predict_on_batch(x))[:, 224:],
                               np.asarray(build_feature_model(64).predict_on_batch(x)),
                               atol=1e-5)


@pytest.mark.train
def test_features_command_caches_what_the_probe_panel_reads(tmp_path: Path) -> None:
    """`screen features`: the pool's features (and mirrored ones with --flip) in an .npz that
    load_feature_sets reads back in the pool's order, with the preprocessing recorded."""
    import csv
    import shutil

    from click.testing import CliRunner

    from trainer.dataset import discover, limit_samples
    from trainer.features import load_feature_sets
    from trainer.study_commands import features

    labels = DATA / "labels.csv"
    if not labels.is_file():
        pytest.skip(f"dev pool not found at {DATA}")
    with labels.open(newline="") as fh:
        rows = {row["filename"]: row for row in csv.DictReader(fh)}
    with (tmp_path / "labels.csv").open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["filename", "label", "patient_id"])
        for s in limit_samples(discover(labels), 6, seed=0):
            rel = s.path.relative_to(DATA).as_posix()
            (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(s.path, tmp_path / rel)
            writer.writerow([rel, rows[rel]["label"], rows[rel]["patient_id"]])
    out = tmp_path / "f.npz"
    result = CliRunner().invoke(features, [str(tmp_path / "labels.csv"), "--size", "64",
                                           "--flip", "--intensity", "range", "--out", str(out)])
    assert result.exit_code == 0, result.output + repr(result.exception)
    samples, feats, settings = load_feature_sets([out], tmp_path / "labels.csv")
    assert result.output.endswith(f"wrote {out} ({len(samples)} images)\n")
    assert set(feats) == {"plain", "flipped"} and feats["plain"].shape == (len(samples), 2560)
    assert not np.allclose(feats["plain"], feats["flipped"])
    assert json.loads(settings[0])["size"] == 64
    assert json.loads(settings[0])["intensity"] == "range"
    bad = CliRunner().invoke(features, [str(tmp_path / "labels.csv"), "--intensity", "gamma",
                                        "--out", str(out)])
    assert bad.exit_code == 2 and "'gamma' is not one of 'range', 'percentile'" in bad.output
