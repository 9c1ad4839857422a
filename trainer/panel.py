"""The "new women, new sites" panel: how a recipe does on people and places it never saw.

A pooled cross-validated AUC rewards a model for recognising machines, because on a pool
like this one the machine and the site predict the label. The panel asks harder questions,
all patient-grouped (no woman on both sides), of any recipe given as a ``fit_score`` function
(train rows, test rows, seed -> test scores):

1. **leave-one-site-out**: fit on every other site, score the held-out one, for each site;
2. **machine-balanced AUC**: each test image weighted so that every machine has the same
   malignant share (machines lacking a class in the test rows drop out), so that recognising
   the machine is worth nothing;
3. **repeated patient hold-outs**: ``holdouts`` random splits holding out ``fraction`` of the
   patients (stratified by whether a patient has a cancer): mean and 5th percentile;
4. breast level (mean score of a breast's images) beside image level throughout.

``worst`` is the lowest of: each site's leave-one-site-out AUC, the mean machine-balanced
AUC and the 5th percentile of the hold-out AUCs. Recipes are compared by it: a model that
ranks well only on familiar machines and sites scores low there.

Grouping columns (site, machine) are the caller's to name; nothing here knows a data set.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from trainer.dataset import Sample, read_columns, split_by_patient
from trainer.evaluation import breast_scores
from worker.audit.metrics import roc_auc, weighted_roc_auc

# (train row indices, test row indices, seed) -> scores of the test rows
FitScore = Callable[[np.ndarray, np.ndarray, int], np.ndarray]


@dataclass(frozen=True)
class PanelData:
    """The rows a recipe is judged on: labels and the grouping columns, one entry per image."""

    samples: Sequence[Sample]
    sites: np.ndarray  # "" where unknown
    machines: np.ndarray  # "" where unknown

    @property
    def y(self) -> np.ndarray:
        return np.array([s.label for s in self.samples])

    @classmethod
    def from_csv(cls, source: str | Path, samples: Sequence[Sample],
                 site_column: str | None = None, machine_column: str | None = None
                 ) -> PanelData:
        """The grouping columns the caller names, read from the labels CSV of ``source``
        (all "" when a column is not named)."""
        cols = read_columns(source, samples, [c for c in (site_column, machine_column) if c])
        blank = np.full(len(samples), "")
        return cls(samples, cols.get(site_column or "", blank),
                   cols.get(machine_column or "", blank))


def machine_balanced_weights(y: np.ndarray, machines: np.ndarray) -> np.ndarray:
    """Per-image weights giving every machine a 50% malignant share and equal total weight
    (its images' count), so that machine appearance carries no information about the label.
    Images of machines that lack one class (or an unknown machine) get weight 0."""
    w = np.zeros(len(y), dtype=np.float64)
    for m in np.unique(machines):
        rows = machines == m
        pos, neg = rows & (y == 1), rows & (y == 0)
        if m == "" or not pos.any() or not neg.any():
            continue
        n = rows.sum()
        w[pos] = 0.5 * n / pos.sum()
        w[neg] = 0.5 * n / neg.sum()
    return w


def machine_balanced_rows(y: np.ndarray, machines: np.ndarray
                          ) -> tuple[np.ndarray, np.ndarray]:
    """For training: which images to keep (a boolean mask: machines lacking a class say
    nothing once balanced and are left out) and the kept images' weights, per
    :func:`machine_balanced_weights`."""
    w = machine_balanced_weights(y, machines)
    keep = w > 0
    return keep, w[keep]


# (train rows, test rows, per-train-row weights or None, seed) -> scores of the test rows
FitAndScore = Callable[[np.ndarray, np.ndarray, np.ndarray | None, int], np.ndarray]


def network_fit_score(fit_and_score: FitAndScore, y: np.ndarray,
                      machines: np.ndarray | None = None, machine_balanced: bool = False,
                      log: Path | None = None) -> FitScore:
    """A network recipe as a panel ``fit_score``. With ``machine_balanced``, each fit weights
    its training images so that every machine (``machines``, one entry per row) has the same
    malignant share, and leaves out machines that lack a class: the machine then carries no
    information about the label. Each fit's test scores are appended to ``log`` (JSON lines)."""
    if machine_balanced and machines is None:
        raise ValueError("machine-balanced training needs each image's machine")

    def fit_score(tr: np.ndarray, te: np.ndarray, seed: int) -> np.ndarray:
        weight = None
        if machine_balanced and machines is not None:
            keep, weight = machine_balanced_rows(y[tr], machines[tr])
            tr = tr[keep]
        scores = np.asarray(fit_and_score(tr, te, weight, seed), np.float64)
        if log is not None:
            with log.open("a") as fh:
                fh.write(json.dumps({"seed": seed, "test": te.tolist(),
                                     "scores": scores.round(6).tolist()}) + "\n")
        return scores

    return fit_score


def breast_auc(samples: Sequence[Sample], rows: np.ndarray, scores: np.ndarray
               ) -> float | None:
    """AUC of mean scores per breast (patient + side) over ``rows``; None when sides are
    unknown or a class is missing."""
    y, s, _ = breast_scores([samples[i] for i in rows], np.asarray(scores), "mean")
    return roc_auc(y, s) if len(y) else None


def _spread(values: Sequence[float | None]) -> dict[str, Any]:
    v = np.array([x for x in values if x is not None], dtype=np.float64)
    if not len(v):
        return {"mean": None, "p5": None, "min": None, "values": list(values)}
    return {"mean": float(v.mean()), "p5": float(np.percentile(v, 5)), "min": float(v.min()),
            "values": [None if x is None else round(float(x), 4) for x in values]}


def holdout_splits(samples: Sequence[Sample], n: int, fraction: float, seed: int
                   ) -> list[tuple[np.ndarray, np.ndarray]]:
    """``n`` random patient hold-outs of ``fraction`` of the patients, as row indices."""
    index = {s.path: i for i, s in enumerate(samples)}
    out = []
    for k in range(n):
        tr, te = split_by_patient(samples, fraction, seed + 1000 * (k + 1))
        out.append((np.array([index[s.path] for s in tr]), np.array([index[s.path] for s in te])))
    return out


def fewer_patients(samples: Sequence[Sample], rows: np.ndarray, share: float, seed: int
                   ) -> np.ndarray:
    """The ``rows`` of a random ``share`` of their patients (at least two), for a learning
    curve: the recipe trains on less, the rows it is scored on stay whole."""
    if share >= 1.0:
        return rows
    patients = np.array([samples[i].patient_id or str(samples[i].path) for i in rows])
    pool = np.unique(patients)
    keep = np.random.default_rng(seed).choice(pool, max(2, round(share * len(pool))),
                                              replace=False)
    return rows[np.isin(patients, keep)]


def leave_one_site_out(data: PanelData, fit_score: FitScore, seed: int = 0,
                       progress: Callable[[str], None] | None = print
                       ) -> dict[str, dict[str, Any]]:
    """Figure 1 of the panel: per site, a fit on every other site scored on it."""
    y, samples = data.y, data.samples
    say = progress or (lambda _: None)
    loso: dict[str, dict[str, Any]] = {}
    for site in sorted(set(data.sites.tolist()) - {""}):
        tr, te = np.where(data.sites != site)[0], np.where(data.sites == site)[0]
        scores = np.asarray(fit_score(tr, te, seed), dtype=np.float64)
        loso[site] = {"images": int(len(te)), "image_auc": roc_auc(y[te], scores),
                      "breast_auc": breast_auc(samples, te, scores),
                      "machine_balanced_auc": weighted_roc_auc(
                          y[te], scores, machine_balanced_weights(y[te], data.machines[te]))}
        say(f"held-out site {site}: image AUC {fmt_auc(loso[site]['image_auc'])}, "
            f"breast {fmt_auc(loso[site]['breast_auc'])}")
    return loso


def run_panel(data: PanelData, fit_score: FitScore, holdouts: int = 10,
              fraction: float = 0.15, seed: int = 0,
              progress: Callable[[str], None] | None = print,
              train_fraction: float = 1.0) -> dict[str, Any]:
    """Every figure of the panel for one recipe, as a JSON-ready dict (see module doc).
    ``train_fraction`` < 1 trains every fit on that share of its training patients (one
    point of a learning curve)."""
    y, samples = data.y, data.samples
    say = progress or (lambda _: None)
    if train_fraction < 1.0:
        whole = fit_score

        def fit_score(tr: np.ndarray, te: np.ndarray, seed: int) -> np.ndarray:
            return whole(fewer_patients(samples, tr, train_fraction, seed), te, seed)

    loso = leave_one_site_out(data, fit_score, seed, say)
    image, balanced, breast = [], [], []
    for k, (tr, te) in enumerate(holdout_splits(samples, holdouts, fraction, seed)):
        scores = np.asarray(fit_score(tr, te, seed + k + 1), dtype=np.float64)
        image.append(roc_auc(y[te], scores))
        balanced.append(weighted_roc_auc(y[te], scores,
                                         machine_balanced_weights(y[te], data.machines[te])))
        breast.append(breast_auc(samples, te, scores))
        say(f"hold-out {k + 1}/{holdouts}: image AUC {fmt_auc(image[-1])}, machine-balanced "
            f"{fmt_auc(balanced[-1])}, breast {fmt_auc(breast[-1])}")

    result: dict[str, Any] = {
        "leave_one_site_out": loso,
        "train_fraction": train_fraction,
        "holdouts": {"n": holdouts, "fraction": fraction, "seed": seed,
                     "image_auc": _spread(image),
                     "machine_balanced_auc": _spread(balanced),
                     "breast_auc": _spread(breast)},
    }
    parts = {f"leave-one-site-out {s}": v["image_auc"] for s, v in loso.items()}
    parts["machine-balanced mean"] = result["holdouts"]["machine_balanced_auc"]["mean"]
    parts["hold-out 5th percentile"] = result["holdouts"]["image_auc"]["p5"]
    known = {k: v for k, v in parts.items() if v is not None}
    if known:
        which = min(known, key=lambda k: known[k])
        result["worst"], result["worst_of"] = known[which], which
    return result


def fmt_auc(v: float | None) -> str:
    """An AUC to three places, or "n/a" where it is undefined (one class only)."""
    return "n/a" if v is None else f"{v:.3f}"


def format_panel(name: str, result: dict[str, Any]) -> str:
    """One readable block per recipe, for logs and the lever table."""
    h = result["holdouts"]
    lines = [f"{name}: worst {fmt_auc(result.get('worst'))} ({result.get('worst_of', 'n/a')})"]
    for site, v in result["leave_one_site_out"].items():
        lines.append(f"  leave site {site} out: image {fmt_auc(v['image_auc'])}, "
                     f"breast {fmt_auc(v['breast_auc'])}, machine-balanced "
                     f"{fmt_auc(v['machine_balanced_auc'])} ({v['images']} images)")
    for key, label in (("image_auc", "image"), ("machine_balanced_auc", "machine-balanced"),
                       ("breast_auc", "breast")):
        lines.append(f"  {h['n']} hold-outs of {h['fraction']:.0%}, {label}: mean "
                     f"{fmt_auc(h[key]['mean'])}, 5th percentile {fmt_auc(h[key]['p5'])}")
    return "\n".join(lines)
