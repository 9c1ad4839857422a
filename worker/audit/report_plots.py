"""The audit's pictures: confusion matrix, ROC, calibration and score distributions.

One row of four panels per model version, drawn from an `Audit` (worker.audit.report) so the
pictures show exactly the figures of the text and JSON. The confusion matrix has the same
orientation as the text: rows = truth, columns = call. A version whose figures carry caveats
says so on its row in red, and the ROC panel says when the AUC rests on too few cases.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np

from worker.audit.figures import MIN_CASES
from worker.audit.metrics import roc_curve
from worker.audit.report import Audit
from worker.audit.report_text import fmt_ci, fmt_value
from worker.audit.units import truth_and_scores
from worker.scoring.levels import Level

CALIBRATION_BINS = 10
MIN_PER_BIN = 5  # cases in a calibration bin, at least
CAUTION = "#b00020"
# No "Software" text chunk: the PNG carries nothing but the picture.
_PNG_METADATA = {"Software": None}


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def draw_confusion(ax: Any, m: dict[str, Any]) -> None:
    cm = np.array(m["confusion"]["matrix"])
    labels = m["confusion"]["labels"]
    ax.imshow(cm, cmap="Blues", vmin=0, vmax=max(int(cm.max()), 1))
    for (i, j), v in np.ndenumerate(cm):
        dark = v > cm.max() / 2
        ax.text(j, i, str(v), ha="center", va="center", fontsize=14,
                color="white" if dark else "black")
    ax.set_xticks([0, 1], [f"call {lab}" for lab in labels])
    ax.set_yticks([0, 1], [f"truth {lab}" for lab in labels], rotation=90, va="center")
    ax.set_xlabel("call (the model)")
    ax.set_ylabel("truth (the outcome)")
    threshold = ", ".join(f"{t:.3f}" for t in m["thresholds"]) or "not recorded"
    ax.set_title(f"confusion at threshold {threshold}")


def draw_roc(ax: Any, m: dict[str, Any], y: np.ndarray, s: np.ndarray) -> None:
    ax.plot([0, 1], [0, 1], "--", color="grey", lw=1)
    if m["auc"] is not None:
        fpr, tpr, _ = roc_curve(y, s)
        ax.plot(fpr, tpr, lw=2, label=f"AUC {fmt_value(m['auc'])}\n95% CI {fmt_ci(m['auc_ci'])}")
        if m["sensitivity"] is not None and m["specificity"] is not None:
            ax.plot(1 - m["specificity"], m["sensitivity"], "o", color="red", label="threshold")
        ax.legend(loc="lower right", fontsize=8)
    else:
        ax.text(0.5, 0.5, "AUC not given:\nneeds two cases of each outcome", ha="center",
                va="center")
    if min(m["positives"], m["negatives"]) < MIN_CASES:
        ax.text(0.03, 0.95, f"too few cases to judge\n({m['positives']} malignant, "
                f"{m['negatives']} benign)", color=CAUTION, va="top", fontsize=8)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("1 - specificity")
    ax.set_ylabel("sensitivity")
    ax.set_title("ROC curve")


def calibration_bins(
    y: np.ndarray, s: np.ndarray, bins: int = CALIBRATION_BINS, min_count: int = MIN_PER_BIN
) -> list[tuple[float, float, int]]:
    """(mean score, observed malignant share, count) per bin: equal-width bins, at most one
    per ten cases, then neighbours merged until each holds at least `min_count` (a line through
    bins of one or two cases zig-zags on noise)."""
    bins = max(1, min(bins, len(s) // 10))
    idx = np.clip((s * bins).astype(int), 0, bins - 1)
    groups: list[np.ndarray] = []
    current = np.zeros(len(s), dtype=bool)
    for b in range(bins):
        current |= idx == b
        if current.sum() >= min_count:
            groups.append(current)
            current = np.zeros(len(s), dtype=bool)
    if current.any():  # the last few join the bin before them
        if groups:
            groups[-1] = groups[-1] | current
        else:
            groups.append(current)
    return [(float(s[g].mean()), float(y[g].mean()), int(g.sum())) for g in groups]


def draw_calibration(ax: Any, y: np.ndarray, s: np.ndarray) -> None:
    ax.plot([0, 1], [0, 1], "--", color="grey", lw=1, label="perfect calibration")
    cal = calibration_bins(y, s)
    xs, obs, counts = (np.array(v) for v in zip(*cal, strict=True))
    # Wilson 95% interval per bin, so a bin of 2 images does not look like evidence.
    z = 1.96
    centre = (obs + z * z / (2 * counts)) / (1 + z * z / counts)
    half = z * np.sqrt(obs * (1 - obs) / counts + z * z / (4 * counts**2)) / (1 + z * z / counts)
    ax.errorbar(xs, obs, yerr=[np.clip(obs - (centre - half), 0, None),
                np.clip(centre + half - obs, 0, None)], fmt="o-", capsize=3,
                label="observed (95% CI)")
    for i, (x, o, n) in enumerate(cal):  # above and below in turn: neighbours never overlap
        ax.annotate(f"n={n}", (x, o), textcoords="offset points", fontsize=7,
                    xytext=(4, 6 if i % 2 == 0 else -12))
    ax.set_xlim(0, 1)
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel(f"score ({len(cal)} bin(s) of at least {MIN_PER_BIN} cases)")
    ax.set_ylabel("share malignant")
    ax.set_title("calibration")
    ax.legend(loc="upper left", fontsize=8)


def draw_distribution(ax: Any, m: dict[str, Any], y: np.ndarray, s: np.ndarray) -> None:
    rng = np.random.default_rng(0)  # jitter only; seeded so the picture is repeatable
    labels = m["confusion"]["labels"]
    for row, (truth, colour) in enumerate(((False, "tab:blue"), (True, "tab:red"))):
        sel = s[y == truth]
        jitter = row + rng.uniform(-0.25, 0.25, len(sel))
        alpha = 0.8 if len(sel) < 200 else 0.3
        ax.scatter(sel, jitter, s=12, alpha=alpha, color=colour)
    for t in m["thresholds"]:
        ax.axvline(t, color="black", lw=1.5, ls="--")
    if m["thresholds"]:
        ax.text(m["thresholds"][0], 1.45, " threshold", fontsize=8, va="center")
    ax.set_yticks([0, 1], [f"truth {labels[0]}\n(n={m['negatives']})",
                   f"truth {labels[1]}\n(n={m['positives']})"])
    ax.set_ylim(-0.5, 1.6)
    ax.set_xlim(0, 1)
    ax.set_xlabel("score (right of the line: called malignant)")
    ax.set_title("scores by outcome")


def audit_figure(
    audit: Audit, versions: list[str] | None = None, levels: tuple[Level, ...] = (Level.IMAGE,),
) -> Any:
    """A matplotlib Figure: one row of four panels per model version (all by default) and
    each of `levels` (versions without units at a level are left out)."""
    plt = _pyplot()
    models = [
        m if lv is Level.IMAGE else m["levels"][lv.value]
        for m in audit.report["models"]
        for lv in levels
        if (versions is None or m["model_version"] in versions)
        and (lv is Level.IMAGE or lv.value in m["levels"])
    ]
    fig = plt.figure(figsize=(16, 4.4 * max(len(models), 1)), layout="constrained")
    if not models:
        fig.text(0.5, 0.5, "no scored images with a known outcome", ha="center", va="center")
        return fig
    subfigs = np.atleast_1d(fig.subfigures(len(models), 1))
    for sub, m in zip(subfigs, models, strict=True):
        rows = audit.units_of(m["model_version"], Level(m["level"]))
        y, s = truth_and_scores(rows)
        axes = sub.subplots(1, 4)
        draw_confusion(axes[0], m)
        draw_roc(axes[1], m, y, s)
        draw_calibration(axes[2], y, s)
        draw_distribution(axes[3], m, y, s)
        sub.suptitle(f"model {m['model_version']}: {m['level']} level, n={m['n']}", fontsize=12)
        if m["caveats"]:
            sub.supxlabel("CAUTION: " + "; ".join(m["caveats"]), color=CAUTION, fontsize=9,
                          wrap=True)
    return fig


def figure_png(
    audit: Audit, versions: list[str] | None = None, dpi: int = 90,
    levels: tuple[Level, ...] = (Level.IMAGE,),
) -> bytes:
    plt = _pyplot()
    fig = audit_figure(audit, versions, levels)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, metadata=_PNG_METADATA)
    plt.close(fig)
    return buf.getvalue()


def write_png(audit: Audit, out: Path) -> int:
    """All versions' panels at every level (image, breast, exam) in one PNG (`screen report
    --plot`). Returns the versions drawn."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(figure_png(audit, levels=tuple(Level)))
    return len(audit.report["models"])
