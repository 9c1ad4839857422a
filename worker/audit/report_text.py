"""The audit as text and JSON (`screen report`, `--format text|json`).

Rendered from the report dict that :func:`worker.audit.report.audit` gathers, as the PNG
(worker.audit.report_plots) and the HTML page (worker.audit.report_html) are. The confusion
matrix has one orientation everywhere: rows are the truth, columns the model's call.
"""

from __future__ import annotations

import json
from typing import Any

from worker.scoring.site_points import women


def fmt_value(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)


def fmt_ci(ci: list[float] | None) -> str:
    return "n/a" if ci is None else f"{ci[0]:.3f} to {ci[1]:.3f}"


def period_text(report: dict[str, Any]) -> str:
    since, until = report["since"], report["until"]
    if not since and not until:
        return "all images received"
    if since and until:
        return f"received from {since} to before {until}"
    return f"received from {since}" if since else f"received before {until}"


# (JSON key, label) of the figures shown with their intervals, in reading order.
FIGURE_ROWS = (
    ("sensitivity", "sensitivity"),
    ("specificity", "specificity"),
    ("ppv", "PPV"),
    ("npv", "NPV"),
    ("recall_rate", "recall rate"),
    ("accuracy", "accuracy"),
    ("auc", "ROC AUC"),
    ("prevalence", "prevalence"),
)


def confusion_lines(m: dict[str, Any]) -> list[str]:
    """The confusion matrix as text, rows = truth, columns = call (the one orientation)."""
    labels = m["confusion"]["labels"]
    matrix = m["confusion"]["matrix"]
    width = max(len(f"call {lab}") for lab in labels) + 2
    head = " " * 20 + "".join(f"{'call ' + lab:>{width}}" for lab in labels)
    lines = [head]
    for lab, row in zip(labels, matrix, strict=True):
        lines.append(f"  {'truth ' + lab:<18}" + "".join(f"{v:>{width}}" for v in row))
    return lines


def level_summary(m: dict[str, Any]) -> str:
    """`image level: n=...`, with the images and the rule behind breast and exam units."""
    text = f"{m['level']} level, n={m['n']} ({m['positives']} malignant, {m['negatives']} benign)"
    if m["level"] != "image":
        a = m["aggregation"]
        text += (f" from {m['images']} image(s); score: breast {a['breast']}, exam {a['exam']} "
                 f"({'from the model' if a['source'] == 'model' else 'default rule'})")
    return text


_PLURAL = {"patient": "patients", "study": "studies", "image": "images"}


def bootstrap_text(b: dict[str, Any]) -> str:
    """`percentile bootstrap, 2000 resamples of 23 patients, seed 0` (what was resampled)."""
    unit = b["unit"]
    drawn = (f"{b['groups']} {_PLURAL[unit]}" if unit in _PLURAL else
             f"{b['groups']} groups (each a patient where known, otherwise a study, "
             "otherwise an image)")
    return f"percentile bootstrap, {b['resamples']} resamples of {drawn}, seed {b['seed']}"


def figures_block(m: dict[str, Any]) -> list[str]:
    """One model version at one level, as text lines."""
    b = m["bootstrap"]
    threshold = ", ".join(f"{t:.4f}" for t in m["thresholds"]) or "not recorded"
    return [
        f"model {m['model_version']}: {level_summary(m)}, threshold {threshold}",
        *confusion_lines(m),
        f"  {'figure':<14}{'value':>7}   95% CI",
        *(
            f"  {label:<14}{fmt_value(m[key]):>7}   {fmt_ci(m[key + '_ci'])}"
            for key, label in FIGURE_ROWS
        ),
        f"  intervals: {bootstrap_text(b)}",
        *(f"  CAVEAT: {c}" for c in m["caveats"]),
    ]


def fitness_lines(f: dict[str, Any]) -> list[str]:
    """The fitness verdict (worker.audit.fitness) as text lines."""
    lines = [f"FITNESS of model {f['model_version']} for this site: {f['verdict'].upper()} "
             f"({f['level']} level, {f['positives']} malignant and {f['negatives']} benign; "
             f"operating point {f['operating_point']}, threshold {f['threshold']:.4f}; "
             "criteria from [fitness], declared before looking)"]
    for c in f["criteria"]:
        shown = (f"{c['value']}" if c["name"] == "cancers"
                 else f"{fmt_value(c['value'])} (95% CI {fmt_ci(c['ci'])})")
        lines.append(f"  [{c['status']}] {c['rule']}: {shown}")
    return lines


def format_text(report: dict[str, Any]) -> str:
    lines = [
        f"period: {period_text(report)} (UTC)",
        f"images recorded: {report['total']}",
        "by status: "
        + (", ".join(f"{k} {v}" for k, v in report["by_status"].items()) or "none"),
        "called by the model: "
        + (", ".join(f"{k} {v}" for k, v in report["by_call"].items()) or "none"),
    ]
    if report["quarantine_reasons"]:
        lines.append(
            "quarantined because: "
            + "; ".join(f"{k} ({v})" for k, v in report["quarantine_reasons"].items())
        )
        lines += [f"  {q['filename']}: {q['reason']}" for q in report["quarantined_files"]]
    lines.append(f"scored with a known outcome: {report['with_outcome']} of {report['scored']}")
    for m in report["models"]:
        lines += ["", *figures_block(m)]
        for lm in m.get("levels", {}).values():
            lines += ["", *figures_block(lm)]
        lines += [f"model {m['model_version']}: {note} (level left out)"
                  for note in m.get("level_notes", [])]
    for version, points in report.get("operating_points", {}).items():
        lines += ["", f"operating points of model {version} (the model file's, and site points "
                      "from screen calibrate): what each would have called in this period",
                  f"  {'point':<14}{'threshold':>10}{'recall rate':>13}{'sensitivity':>13}"
                  f"{'specificity':>13}   on validation (site points: calibration): "
                  "sens / spec / recall"]
        for p in points:
            v = p["validation"]
            lines.append(
                f"  {p['name']:<14}{p['threshold']:>10.4f}{fmt_value(p['recall_rate']):>13}"
                f"{fmt_value(p['sensitivity']):>13}{fmt_value(p['specificity']):>13}   "
                f"{fmt_value(v['sensitivity'])} / {fmt_value(v['specificity'])} / "
                f"{fmt_value(v['recall_rate'])}")
    if report.get("site_points"):
        lines += ["", "site points recorded (screen calibrate), oldest first:"]
        lines += [f"  {p['name']} for model {p['model_version']}: threshold {p['threshold']:.4f}, "
                  f"{p['target']} {p['target_value']:g} at {p['level']} level on "
                  f"{women(p['women'], p['unit'])}, "
                  f"{p['created_at']} by {p['created_by']}"
                  for p in report["site_points"]]
    if report.get("fitness"):
        lines += ["", *fitness_lines(report["fitness"])]
    if report["caveats"] and not report["models"]:
        lines += ["", *(f"CAVEAT: {c}" for c in report["caveats"])]
    return "\n".join(lines)


def format_report(report: dict[str, Any], fmt: str) -> str:
    return json.dumps(report, indent=2) if fmt == "json" else format_text(report)
