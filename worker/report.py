"""`screen report`: what was screened, and how the scores compare with known outcomes."""

from __future__ import annotations

import datetime as dt
import json
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from worker.metrics import roc_curve, summary
from worker.store import DUPLICATE, QUARANTINED, SCORED, ImageRecord, Store


def scored_with_outcome(
    images: list[ImageRecord], outcomes: dict[str, str]
) -> dict[str, list[tuple[int, float, float]]]:
    """Per model version, (truth, score, threshold) of the scored images with a known outcome."""
    groups: dict[str, list[tuple[int, float, float]]] = defaultdict(list)
    for r in images:
        if r.status != SCORED or r.score is None or r.sha256 not in outcomes:
            continue
        truth = 1 if outcomes[r.sha256] == "malignant" else 0
        groups[r.model_version or "?"].append((truth, r.score, r.threshold or 0.5))
    return groups


def build_report(store: Store, since: dt.datetime | None = None) -> dict[str, Any]:
    """Counts by status and label, and per model version the figures against outcomes.

    Only `scored` rows count towards the figures: a duplicate is the same image, and counting
    it twice would weight it twice.
    """
    images = store.all_images(since)
    outcomes = store.outcomes()
    by_status = Counter(r.status for r in images)
    by_label = Counter(r.label for r in images if r.status == SCORED and r.label)
    reasons = Counter((r.error or "").split(":")[0] for r in images if r.status == QUARANTINED)

    groups = scored_with_outcome(images, outcomes)
    models = []
    for version, rows in sorted(groups.items()):
        y = np.array([t for t, _, _ in rows])
        s = np.array([sc for _, sc, _ in rows])
        # Every row of one version carries that version's threshold; use the recorded one.
        threshold = rows[0][2]
        models.append(
            {
                "model_version": version,
                **summary(y, s, threshold),
                "positives": int(y.sum()),
                "negatives": int(len(y) - y.sum()),
            }
        )

    return {
        "since": None if since is None else since.isoformat() + "Z",
        "total": len(images),
        "by_status": dict(sorted(by_status.items())),
        "by_label": dict(sorted(by_label.items())),
        "quarantine_reasons": dict(reasons.most_common()),
        "duplicates": by_status.get(DUPLICATE, 0),
        "with_outcome": sum(len(v) for v in groups.values()),
        "models": models,
    }


def _fmt(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)


def format_text(report: dict[str, Any]) -> str:
    lines = [
        f"images recorded: {report['total']}"
        + (f" since {report['since']}" if report["since"] else "")
    ]
    lines.append(
        "by status: " + (", ".join(f"{k} {v}" for k, v in report["by_status"].items()) or "none")
    )
    lines.append(
        "by label:  " + (", ".join(f"{k} {v}" for k, v in report["by_label"].items()) or "none")
    )
    if report["quarantine_reasons"]:
        lines.append(
            "quarantined because: "
            + "; ".join(f"{k} ({v})" for k, v in report["quarantine_reasons"].items())
        )
    lines.append(f"with a known outcome: {report['with_outcome']}")
    for m in report["models"]:
        lines += [
            "",
            f"model {m['model_version']}  (threshold {m['threshold']:.4f}, n={m['n']}: "
            f"{m['positives']} malignant, {m['negatives']} benign)",
            "                 truth malignant  truth benign",
            f"  called malignant   {m['tp']:>10}  {m['fp']:>12}",
            f"  called benign      {m['fn']:>10}  {m['tn']:>12}",
            f"  accuracy {_fmt(m['accuracy'])}  sensitivity {_fmt(m['sensitivity'])}  "
            f"specificity {_fmt(m['specificity'])}",
            f"  PPV {_fmt(m['ppv'])}  NPV {_fmt(m['npv'])}  ROC AUC {_fmt(m['auc'])}",
        ]
    return "\n".join(lines)


def format_report(report: dict[str, Any], fmt: str) -> str:
    return json.dumps(report, indent=2) if fmt == "json" else format_text(report)


def plot_report(store: Store, out: Path, since: dt.datetime | None = None) -> int:
    """Confusion matrix and ROC curve per model version, in one PNG. Returns versions drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    report = build_report(store, since)
    groups = scored_with_outcome(store.all_images(since), store.outcomes())
    versions = [m["model_version"] for m in report["models"]]
    n = max(len(versions), 1)
    fig, axes = plt.subplots(n, 2, figsize=(9, 4 * n), squeeze=False)
    if not versions:
        for ax in axes[0]:
            ax.text(0.5, 0.5, "no scored images with a known outcome", ha="center", va="center")
            ax.axis("off")
    for row, m in enumerate(report["models"]):
        ys = [t for t, _, _ in groups[m["model_version"]]]
        ss = [sc for _, sc, _ in groups[m["model_version"]]]
        cm = np.array([[m["tn"], m["fp"]], [m["fn"], m["tp"]]])
        ax = axes[row][0]
        ax.imshow(cm, cmap="Blues")
        for (i, j), v in np.ndenumerate(cm):
            ax.text(
                j,
                i,
                str(v),
                ha="center",
                va="center",
                color="white" if v > cm.max() / 2 else "black",
                fontsize=14,
            )
        ax.set_xticks([0, 1], ["benign", "malignant"])
        ax.set_yticks([0, 1], ["benign", "malignant"])
        ax.set_xlabel("called")
        ax.set_ylabel("truth")
        ax.set_title(f"{m['model_version']} @ {m['threshold']:.3f}")
        fpr, tpr, _ = roc_curve(np.array(ys), np.array(ss))
        ax = axes[row][1]
        ax.plot(fpr, tpr, lw=2, label=f"AUC {_fmt(m['auc'])}")
        ax.plot([0, 1], [0, 1], "--", color="grey", lw=1)
        if m["sensitivity"] is not None and m["specificity"] is not None:
            ax.plot(1 - m["specificity"], m["sensitivity"], "o", color="red", label="threshold")
        ax.set_xlabel("1 - specificity")
        ax.set_ylabel("sensitivity")
        ax.set_title("ROC")
        ax.legend(loc="lower right")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return len(versions)
