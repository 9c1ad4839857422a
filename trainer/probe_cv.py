"""Patient-grouped cross-validation of linear probes on cached frozen features.

Same folds, figures and shortcut checks as :mod:`trainer.crossval` (pooled and per-fold image
AUC, breast-level AUC, AUC within machine 49, leave-one-site-out, sensitivity/specificity with
each fold's threshold chosen on the other folds), for a logistic regression on features from
:mod:`trainer.features`. The penalty is chosen inside each training fold by an inner
patient-grouped CV, never on the fold being scored.

    python -m trainer.features LABELS --size 384 --flip --out runs/features/s384.npz
    python -m trainer.probe_cv LABELS runs/features/s384.npz --pooling avg --flip-train --tta
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from trainer.crossval import cv_figures, emit, leave_one_site_out, machine_and_site
from trainer.dataset import Sample, discover, kfold_by_patient
from trainer.features import select
from trainer.logistic import L2_GRID, LinearProbe, choose_l2, fit_probe
from trainer.panel import FitScore
from worker.metrics import roc_auc


@dataclass
class ProbeCVConfig:
    source: str | Path
    features: str | Path | Sequence[str | Path]  # several: their pooled columns side by side
    pooling: str = "avg"
    flip_train: bool = False  # add the mirrored images' features as extra training rows
    tta: bool = False  # score = mean of the plain and mirrored images' decision values
    folds: int = 5
    seed: int = 0
    inner_folds: int = 3
    l2_grid: Sequence[float] = field(default_factory=lambda: L2_GRID)
    sensitivity_target: float = 0.9
    loso: bool = True
    train_fraction: float = 1.0  # < 1: train each fold on this share of its patients (a
    # learning curve; the scored folds stay whole)
    name: str = ""


def load_features(path: str | Path, source: str | Path
                  ) -> tuple[list[Sample], dict[str, np.ndarray], str]:
    """Samples in the cached features' row order, their arrays, and the preprocessing JSON."""
    data = np.load(path)
    by_path = {str(s.path.resolve()): s for s in discover(source) if s.split != "test"}
    samples = [by_path[str(Path(p).resolve())] for p in data["paths"].tolist()]
    arrays = {k: data[k] for k in ("plain", "flipped") if k in data.files}
    return samples, arrays, str(data["settings"])


def _fit(cfg: ProbeCVConfig, feats: dict[str, np.ndarray], y: np.ndarray,
         patients: np.ndarray, tr: np.ndarray, seed: int) -> LinearProbe:
    if cfg.train_fraction < 1.0:
        pool = np.unique(patients[tr])
        keep = np.random.default_rng(seed).choice(
            pool, max(2, round(cfg.train_fraction * len(pool))), replace=False)
        tr = tr[np.isin(patients[tr], keep)]
    x, yy, groups = feats["plain"][tr], y[tr], patients[tr]
    if cfg.flip_train:
        x = np.vstack([x, feats["flipped"][tr]])
        yy, groups = np.concatenate([yy, yy]), np.concatenate([groups, groups])
    l2, _ = choose_l2(x, yy, groups, cfg.l2_grid, cfg.inner_folds, seed)
    return fit_probe(x, yy, l2)


def _score(cfg: ProbeCVConfig, probe: LinearProbe, feats: dict[str, np.ndarray],
           te: np.ndarray) -> np.ndarray:
    d = probe.decision(feats["plain"][te])
    if cfg.tta:
        d = 0.5 * (d + probe.decision(feats["flipped"][te]))
    return d


def probe_fit_score(feats: dict[str, np.ndarray], y: np.ndarray, patients: np.ndarray,
                    flip_train: bool = True, tta: bool = False,
                    l2_grid: Sequence[float] = L2_GRID, inner_folds: int = 3) -> FitScore:
    """The probe recipe as a panel ``fit_score``: penalty chosen by an inner patient-grouped
    CV of the training rows alone, fitted, and the test rows' decision values returned."""
    cfg = ProbeCVConfig(source="", features="", flip_train=flip_train, tta=tta,
                        l2_grid=l2_grid, inner_folds=inner_folds)

    def fit_score(tr: np.ndarray, te: np.ndarray, seed: int) -> np.ndarray:
        return _score(cfg, _fit(cfg, feats, y, patients, tr, seed), feats, te)

    return fit_score


def probe_cross_validate(cfg: ProbeCVConfig) -> dict[str, Any]:
    started = time.time()
    paths = [cfg.features] if isinstance(cfg.features, str | Path) else list(cfg.features)
    loaded = [load_features(p, cfg.source) for p in paths]
    samples, _, settings = loaded[0]
    if any([s.path for s in other] != [s.path for s in samples] for other, _, _ in loaded):
        raise SystemExit("feature files list different images: extract them from one pool")
    kinds = set.intersection(*(set(raw) for _, raw, _ in loaded))
    if (cfg.flip_train or cfg.tta) and "flipped" not in kinds:
        raise SystemExit(f"{cfg.features} lack mirrored features: extract with --flip")
    feats = {k: np.hstack([select(raw[k], cfg.pooling) for _, raw, _ in loaded])
             .astype(np.float64) for k in kinds}
    y = np.array([s.label for s in samples])
    patients = np.array([s.patient_id or str(s.path) for s in samples])
    index = {s.path: i for i, s in enumerate(samples)}
    machine, site = machine_and_site(cfg.source, samples)

    oof = np.full(len(samples), np.nan)
    fold_of = np.full(len(samples), -1)
    chosen = []
    for k, (tr_s, te_s) in enumerate(kfold_by_patient(samples, cfg.folds, cfg.seed)):
        tr = np.array([index[s.path] for s in tr_s])
        te = np.array([index[s.path] for s in te_s])
        probe = _fit(cfg, feats, y, patients, tr, cfg.seed + k)
        oof[te], fold_of[te] = _score(cfg, probe, feats, te), k
        chosen.append(probe.l2)
        print(f"[{cfg.name}] fold {k}: AUC {roc_auc(y[te], oof[te]):.3f} (l2 {probe.l2})",
              flush=True)

    result: dict[str, Any] = {
        "config": asdict(cfg) | {"source": str(cfg.source),
                                 "features": [str(p) for p in paths],
                                 "l2_grid": list(cfg.l2_grid)},
        "preprocessing": [json.loads(s) for _, _, s in loaded],
        "images": len(samples),
        "l2_chosen": chosen,
        **cv_figures(cfg.folds, cfg.sensitivity_target, samples, y, oof, fold_of, machine),
    }
    if cfg.loso and len(set(site) - {""}) > 1:
        result["leave_one_site_out_auc"] = leave_one_site_out(
            site, y, lambda tr, te: _score(
                cfg, _fit(cfg, feats, y, patients, tr, cfg.seed + 100), feats, te))
    result["seconds"] = round(time.time() - started, 1)
    return result


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("source")
    p.add_argument("features")
    p.add_argument("--pooling", choices=("avg", "max", "avg+max"), default="avg")
    p.add_argument("--flip-train", action="store_true")
    p.add_argument("--tta", action="store_true")
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-loso", action="store_true")
    p.add_argument("--train-fraction", type=float, default=1.0,
                   help="train on this share of each fold's training patients (learning curve)")
    p.add_argument("--name", default="")
    p.add_argument("--out", type=Path)
    a = p.parse_args(argv)
    cfg = ProbeCVConfig(
        source=a.source, features=a.features, pooling=a.pooling, flip_train=a.flip_train,
        tta=a.tta, folds=a.folds, seed=a.seed, loso=not a.no_loso,
        train_fraction=a.train_fraction,
        name=a.name or Path(a.features).stem,
    )
    emit(probe_cross_validate(cfg), a.out)


if __name__ == "__main__":
    main()
