"""Validation pictures for the run folder and the model card: confusion matrix, ROC curve,
calibration (drawn as `screen report` draws it) and the panel's learning curve.

Matplotlib with the Agg backend (no display); small figures so the PNGs stay well under 200 KB.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)
import numpy as np  # noqa: E402

from worker.audit.metrics import confusion_at, roc_auc, roc_curve  # noqa: E402
from worker.audit.report_plots import draw_calibration  # noqa: E402


def _save(fig: plt.Figure, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_confusion(y_true: np.ndarray, scores: np.ndarray, threshold: float, path: Path,
                   class_names: tuple[str, str] = ("benign", "malignant"),
                   title: str = "Validation confusion matrix") -> Path:
    c = confusion_at(y_true, scores, threshold)
    # Rows: true class; columns: predicted class (benign first, as the labels are 0/1).
    counts = np.array([[c.tn, c.fp], [c.fn, c.tp]])
    row_totals = counts.sum(axis=1, keepdims=True).clip(min=1)
    fig, ax = plt.subplots(figsize=(4.6, 3.8), dpi=100)
    ax.imshow(counts / row_totals, cmap="Blues", vmin=0.0, vmax=1.0)
    for i in range(2):
        for j in range(2):
            share = counts[i, j] / row_totals[i, 0]
            ax.text(j, i, f"{counts[i, j]}\n({share:.0%} of row)", ha="center", va="center",
                    color="white" if share > 0.6 else "black", fontsize=10)
    ax.set_xticks([0, 1], [f"pred {n}" for n in class_names])
    ax.set_yticks([0, 1], [f"true {n}" for n in class_names])
    ax.set_title(f"{title}\nthreshold {threshold:.3f}", fontsize=10)
    return _save(fig, path)


def plot_roc(y_true: np.ndarray, scores: np.ndarray, threshold: float, path: Path,
             title: str = "Validation ROC (image level)") -> Path:
    fpr, tpr, _ = roc_curve(y_true, scores)
    auc = roc_auc(y_true, scores)
    c = confusion_at(y_true, scores, threshold)
    sens = c.tp / max(c.tp + c.fn, 1)
    spec = c.tn / max(c.tn + c.fp, 1)
    fig, ax = plt.subplots(figsize=(4.2, 4.0), dpi=100)
    ax.plot(fpr, tpr, lw=1.5, label=f"model (AUC {auc:.3f})" if auc is not None else "model")
    ax.plot([0, 1], [0, 1], ls="--", lw=1, color="grey", label="chance")
    ax.plot([1 - spec], [sens], "o", color="crimson",
            label=f"threshold {threshold:.3f}\nsens {sens:.2f}, spec {spec:.2f}")
    ax.set_xlabel("1 - specificity (false-positive rate)")
    ax.set_ylabel("sensitivity (true-positive rate)")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
    ax.set_title(title, fontsize=10)
    ax.legend(loc="lower right", fontsize=8)
    return _save(fig, path)


def plot_calibration(y_true: np.ndarray, scores: np.ndarray, path: Path,
                     title: str = "Validation calibration (image level)") -> Path:
    """Observed malignant share per score bin against the score: the picture `screen report`
    draws for an audit, here for the run's validation split."""
    fig, ax = plt.subplots(figsize=(4.2, 4.0), dpi=100)
    draw_calibration(ax, np.asarray(y_true, dtype=float), np.asarray(scores, dtype=float))
    ax.set_title(title, fontsize=10)
    return _save(fig, path)


def plot_learning_curve(panels: list[dict], path: Path,
                        title: str = "Learning curve under the panel") -> Path:
    """Figures of :func:`trainer.panel.run_panel` results against each one's
    ``train_fraction`` (the share of every fit's training patients): each held-out site, the
    machine-balanced mean, the hold-out mean with its 5th percentile, and the worst."""
    rows = sorted(panels, key=lambda r: r["train_fraction"])
    x = [100 * r["train_fraction"] for r in rows]
    fig, ax = plt.subplots(figsize=(5.6, 4.0), dpi=100)
    for site in sorted(rows[0]["leave_one_site_out"]):
        ax.plot(x, [r["leave_one_site_out"][site]["image_auc"] for r in rows], "o--", lw=1,
                label=f"site {site} held out")
    ax.plot(x, [r["holdouts"]["machine_balanced_auc"]["mean"] for r in rows], "s:", lw=1,
            label="machine-balanced, mean")
    mean = [r["holdouts"]["image_auc"]["mean"] for r in rows]
    p5 = [r["holdouts"]["image_auc"]["p5"] for r in rows]
    ax.plot(x, mean, "o-", lw=1.5, color="black", label="hold-outs: mean, band to p5")
    ax.fill_between(x, p5, mean, color="grey", alpha=0.2)
    ax.plot(x, [r["worst"] for r in rows], "v-", lw=2, color="crimson", label="worst")
    ax.axhline(0.5, ls="--", lw=0.8, color="grey")
    ax.set_xlabel("share of each fit's training patients (%)")
    ax.set_ylabel("image ROC AUC")
    ax.set_xticks(x)
    ax.set_title(title, fontsize=10)
    ax.legend(loc="lower right", fontsize=7)
    return _save(fig, path)
