"""Patient-grouped cross-validation of a training recipe, with the shortcut checks.

Each lever of the model-quality work (architecture, pretrained weights, crop, orientation,
input size, test-time flip) is measured the same way:

* k folds by patient (no woman on both sides), a fixed number of epochs per fold (choosing the
  epoch on the fold being scored would flatter it), out-of-fold scores pooled;
* image-level ROC AUC per fold (mean and spread) and pooled; breast-level AUC (mean score per
  patient + side, the fair aggregate on this pool);
* AUC within the largest machine (`rsna_machine_id` 49): machine identity predicts the label
  in this pool, so a recipe that leans on machine appearance falls here;
* leave-one-site-out: train on one screening programme, score the other;
* sensitivity and specificity at the shipped threshold rule, applied fold by fold with the
  threshold chosen on the *other* folds' out-of-fold scores.

Metadata columns (machine, site) are read for these analyses only, never as model inputs.

    python -m trainer.crossval LABELS_CSV --arch lite0 --size 384 --folds 5 --out runs/cv
"""

from __future__ import annotations

import argparse
import csv
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import keras
import numpy as np

from trainer.dataset import Sample, discover, kfold_by_patient, limit_samples
from trainer.model import ARCHES, build_model, default_lr
from trainer.train import ArrayBatches, breast_level, class_weights, preprocess_samples
from worker.metrics import confusion_at, roc_auc, threshold_for_sensitivity
from worker.preprocess import PreprocessSettings


@dataclass
class CVConfig:
    source: str | Path
    arch: str = "lite0"
    weights: str | None = "pretrained"  # lite0 only: "pretrained" or None (random init)
    size: int = 384
    crop: bool = False
    orient: str = "none"
    epochs: int = 12
    batch_size: int = 32
    lr: float | None = None  # default per arch: 1e-3 from scratch, 3e-4 fine-tuning
    folds: int = 5
    seed: int = 0
    augment: bool = True
    tta: bool = True  # also report scores averaged with the horizontally flipped image
    loso: bool = True  # also leave-one-site-out
    limit: int | None = None
    sensitivity_target: float = 0.9
    name: str = ""


def fit_and_score(
    cfg: CVConfig, x_tr: np.ndarray, y_tr: np.ndarray, x_te: np.ndarray, seed: int
) -> tuple[np.ndarray, np.ndarray | None]:
    """Train a fresh model for cfg.epochs on (x_tr, y_tr); scores for x_te, plain and with
    flip test-time augmentation (None unless cfg.tta)."""
    from trainer.model import build_augmentation, with_augmentation

    keras.utils.set_random_seed(seed)
    model = build_model(cfg.arch, cfg.size, cfg.weights)
    fit_model = with_augmentation(model, build_augmentation(seed)) if cfg.augment else model
    data = ArrayBatches(x_tr, y_tr, cfg.batch_size, class_weights(y_tr), shuffle=True, seed=seed)
    lr = cfg.lr or default_lr(cfg.arch, cfg.weights)
    schedule = keras.optimizers.schedules.CosineDecay(
        lr, decay_steps=cfg.epochs * len(data), alpha=0.02, warmup_target=None
    )
    fit_model.compile(optimizer=keras.optimizers.Adam(schedule), loss="binary_crossentropy")
    fit_model.fit(data, epochs=cfg.epochs, verbose=2)
    plain = predict(model, x_te, cfg.batch_size)
    return plain, 0.5 * (
        plain + predict(model, x_te[:, :, ::-1, :], cfg.batch_size)
    ) if cfg.tta else None


def predict(model: keras.Model, x: np.ndarray, batch_size: int) -> np.ndarray:
    out = np.zeros(len(x), dtype=np.float64)
    for i in range(0, len(x), batch_size):
        xb = np.ascontiguousarray(x[i : i + batch_size], dtype=np.float32)
        out[i : i + len(xb)] = np.asarray(model.predict_on_batch(xb)).reshape(-1)
    return out


def pool_metadata(source: Path) -> dict[str, dict[str, str]]:
    """filename -> {machine, site} from the dev pool's labels.csv, for the shortcut checks."""
    if source.suffix.lower() != ".csv":
        return {}
    with source.open(newline="") as fh:
        return {
            str((source.parent / r["filename"]).resolve()): {
                "machine": r.get("rsna_machine_id", ""),
                "site": r.get("rsna_site_id", ""),
            }
            for r in csv.DictReader(fh)
        }


def machine_and_site(source: str | Path, samples: Sequence[Sample]
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Each sample's machine id and site id ("" where unknown), for the shortcut checks."""
    meta = pool_metadata(Path(source))
    rows = [meta.get(str(s.path.resolve()), {}) for s in samples]
    return (np.array([r.get("machine", "") for r in rows]),
            np.array([r.get("site", "") for r in rows]))


def emit(result: dict[str, Any], out: Path | None) -> None:
    """Print a CV result as JSON, and write it to ``out`` when given."""
    text = json.dumps(result, indent=2)
    print(text)
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text + "\n")


def leave_one_site_out(site: np.ndarray, y: np.ndarray,
                       fit_score: Callable[[np.ndarray, np.ndarray], np.ndarray],
                       label: str | None = None) -> dict[str, float | None]:
    """AUC on each site for a model fitted on all the others: ``fit_score(train_idx, test_idx)``
    returns the test rows' scores. Prints one line per site when ``label`` is given."""
    loso: dict[str, float | None] = {}
    for held in sorted(set(site) - {""}):
        tr, te = np.where(site != held)[0], np.where(site == held)[0]
        loso[f"site{held}"] = auc = _auc(y[te], fit_score(tr, te))
        if label is not None:
            print(f"[{label}] held-out site {held}: AUC {auc:.3f}", flush=True)
    return loso


def _auc(y: np.ndarray, s: np.ndarray) -> float | None:
    return roc_auc(y, s) if len(y) else None


def cv_figures(
    folds: int,
    sensitivity_target: float,
    samples: Sequence[Sample],
    y: np.ndarray,
    oof: np.ndarray,
    fold_of: np.ndarray,
    machine: np.ndarray,
) -> dict[str, Any]:
    """AUCs (per fold, pooled, breast, machine 49) and the confusion at the threshold rule,
    each fold's threshold chosen on the other folds' out-of-fold scores."""
    fold_auc = [_auc(y[fold_of == k], oof[fold_of == k]) for k in range(folds)]
    conf = np.zeros(4, dtype=int)
    for k in range(folds):
        other, this = fold_of != k, fold_of == k
        t = threshold_for_sensitivity(y[other], oof[other], sensitivity_target)
        c = confusion_at(y[this], oof[this], t)
        conf += np.array([c.tp, c.fp, c.tn, c.fn])
    tp, fp, tn, fn = (int(v) for v in conf)
    m49 = machine == "49"
    valid = [a for a in fold_auc if a is not None]
    return {
        "fold_auc": fold_auc,
        "auc_mean": float(np.mean(valid)),
        "auc_sd": float(np.std(valid, ddof=1)) if len(valid) > 1 else None,
        "auc_pooled": _auc(y, oof),
        "breast_auc": _auc(*breast_level(samples, oof)),
        "machine49_auc": _auc(y[m49], oof[m49]) if m49.any() else None,
        "sensitivity": tp / (tp + fn) if tp + fn else None,
        "specificity": tn / (tn + fp) if tn + fp else None,
        "confusion": {"tp": tp, "fp": fp, "tn": tn, "fn": fn},
    }


def cross_validate(cfg: CVConfig) -> dict[str, Any]:
    started = time.time()
    settings = PreprocessSettings(size=cfg.size, crop=cfg.crop, orient=cfg.orient)
    samples = discover(cfg.source)
    samples = [s for s in samples if s.split != "test"]
    if cfg.limit:
        samples = limit_samples(samples, cfg.limit, cfg.seed)
    x, samples, _ = preprocess_samples(samples, settings, threads=8, verbose=False)
    y = np.array([s.label for s in samples])
    index = {s.path: i for i, s in enumerate(samples)}
    machine, site = machine_and_site(cfg.source, samples)

    oof = np.full(len(samples), np.nan)
    oof_tta = np.full(len(samples), np.nan)
    fold_of = np.full(len(samples), -1)
    for k, (tr, te) in enumerate(kfold_by_patient(samples, cfg.folds, cfg.seed)):
        tr_i = np.array([index[s.path] for s in tr])
        te_i = np.array([index[s.path] for s in te])
        t = time.time()
        plain, flipped = fit_and_score(cfg, x[tr_i], y[tr_i], x[te_i], cfg.seed + k)
        oof[te_i] = plain
        if flipped is not None:
            oof_tta[te_i] = flipped
        fold_of[te_i] = k
        print(
            f"[{cfg.name}] fold {k}: AUC {_auc(y[te_i], plain):.3f} ({time.time() - t:.0f} s)",
            flush=True,
        )

    result: dict[str, Any] = {
        "config": asdict(cfg)
        | {"source": str(cfg.source), "lr": cfg.lr or default_lr(cfg.arch, cfg.weights)},
        "images": len(samples),
        "machine49_images": int((machine == "49").sum()),
        **cv_figures(cfg.folds, cfg.sensitivity_target, samples, y, oof, fold_of, machine),
    }
    if cfg.tta:
        result["tta"] = cv_figures(cfg.folds, cfg.sensitivity_target, samples, y, oof_tta,
                                   fold_of, machine)
    if cfg.loso and len(set(site) - {""}) > 1:
        result["leave_one_site_out_auc"] = leave_one_site_out(
            site, y, lambda tr, te: fit_and_score(cfg, x[tr], y[tr], x[te], cfg.seed + 100)[0],
            label=cfg.name)
    result["seconds"] = round(time.time() - started, 1)
    return result


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("source")
    p.add_argument("--arch", choices=ARCHES, default="lite0")
    p.add_argument("--random-init", action="store_true", help="lite0 without ImageNet weights")
    p.add_argument("--size", type=int, default=384)
    p.add_argument("--crop", action="store_true")
    p.add_argument("--orient", choices=("none", "left"), default="none")
    p.add_argument("--epochs", type=int, default=12)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float)
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-augment", action="store_true")
    p.add_argument("--no-tta", action="store_true")
    p.add_argument("--no-loso", action="store_true")
    p.add_argument("--limit", type=int)
    p.add_argument("--name", default="")
    p.add_argument("--out", type=Path, help="write the result as JSON here")
    a = p.parse_args(argv)
    cfg = CVConfig(
        source=a.source,
        arch=a.arch,
        weights=None if a.random_init else "pretrained",
        size=a.size,
        crop=a.crop,
        orient=a.orient,
        epochs=a.epochs,
        batch_size=a.batch_size,
        lr=a.lr,
        folds=a.folds,
        seed=a.seed,
        augment=not a.no_augment,
        tta=not a.no_tta,
        loso=not a.no_loso,
        limit=a.limit,
        name=a.name or a.arch,
    )
    emit(cross_validate(cfg), a.out)


if __name__ == "__main__":
    main()
