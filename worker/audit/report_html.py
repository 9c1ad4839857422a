"""`screen report --html`: the audit as one self-contained page a programme manager can read.

Everything is inline (CSS, PNG pictures as base64 data URIs) and the page names no external
address, so it opens offline, can be mailed as one file and cannot leak that it was opened.
Every string that came from the database (file names, model versions, reasons) is escaped.
"""

from __future__ import annotations

import base64
import datetime as dt
from html import escape
from pathlib import Path
from typing import Any

from worker.audit.report import Audit
from worker.audit.report_text import FIGURE_ROWS, bootstrap_text, fmt_ci, fmt_value, period_text
from worker.records.clock import utcnow
from worker.scoring.levels import Level

DISCLAIMER = (
    "mammo-screen is a research tool, not a medical device. Its scores must not be used to "
    "make or withhold a clinical decision. The model's performance is stated in its model card."
)

HOW_TO_READ = """
<ul>
<li><b>Sensitivity</b>: of the images whose outcome is malignant, the share the model called
malignant. <b>Specificity</b>: of the benign ones, the share it called benign.</li>
<li><b>PPV</b>: of the images called malignant, the share that were malignant.
<b>NPV</b>: of those called benign, the share that were benign.</li>
<li><b>Recall rate</b>: the share of all images the model called malignant, i.e. what would be
recalled for assessment. <b>Prevalence</b>: the share that were malignant.</li>
<li><b>ROC AUC</b>: the chance that a malignant image scores higher than a benign one
(0.5 is chance, 1.0 perfect); it does not depend on the threshold.</li>
<li>The <b>confusion matrix</b> has the truth (the imported outcome) in rows and the model's
call in columns: the diagonal is where they agree.</li>
<li>Each figure has a <b>95% confidence interval</b> from a bootstrap: the audit is recomputed on
many resamples (drawn by {unit}), and the interval holds the middle 95% of the results. A wide
interval means the figure is not known precisely. Resampling images treats every image as
independent, which makes intervals too narrow when a patient has several images.</li>
<li><b>Calibration</b>: for images grouped by score, the share that were malignant; points on
the diagonal mean a score of 0.3 is malignant about 30% of the time.
<b>Scores by outcome</b>: every image's score, benign and malignant apart, with the threshold.</li>
<li>The figures are given per <b>image</b> and, where images carry their study (and side),
per <b>breast</b> and per <b>exam</b>: there "malignant" means any image of the breast or exam
was, and the score is the model's rule over its images, as the worker reports them.</li>
<li>Figures resting on fewer than 10 cases carry a <b>caveat</b>: read them as anecdotes.</li>
</ul>
"""

CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 1.5em auto;
       max-width: 1200px; color: #1d1d1d; line-height: 1.4; padding: 0 1em; }
h1 { font-size: 1.5em; margin-bottom: 0.2em; }
h2 { font-size: 1.2em; border-bottom: 1px solid #ccc; padding-bottom: 0.2em; margin-top: 1.6em; }
table { border-collapse: collapse; margin: 0.6em 0; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.7em; text-align: right; }
th { background: #f2f4f7; }
td.name, th.name { text-align: left; }
.meta td { text-align: left; }
.disclaimer { background: #fff4e5; border: 1px solid #f0b35a; padding: 0.6em 0.9em; }
.caveat { background: #fdecee; border-left: 4px solid #b00020; padding: 0.4em 0.8em;
          margin: 0.3em 0; }
.plots img { max-width: 100%; height: auto; border: 1px solid #eee; }
.small { color: #555; font-size: 0.9em; }
"""


def _png_img(png: bytes, alt: str) -> str:
    data = base64.b64encode(png).decode("ascii")
    return f'<img src="data:image/png;base64,{data}" alt="{escape(alt)}">'


def _confusion_table(m: dict[str, Any]) -> str:
    labels = [escape(lab) for lab in m["confusion"]["labels"]]
    head = "".join(f"<th>call {lab}</th>" for lab in labels)
    body = "".join(
        f'<tr><th class="name">truth {lab}</th>' + "".join(f"<td>{v}</td>" for v in row) + "</tr>"
        for lab, row in zip(labels, m["confusion"]["matrix"], strict=True)
    )
    return (
        '<table class="confusion"><caption>rows: truth (outcome); columns: call (model)'
        f'</caption><tr><th class="name">truth \\ call</th>{head}</tr>{body}</table>'
    )


def _figures_table(m: dict[str, Any]) -> str:
    rows = "".join(
        f'<tr><td class="name">{label}</td><td>{fmt_value(m[key])}</td>'
        f"<td>{fmt_ci(m[key + '_ci'])}</td></tr>"
        for key, label in FIGURE_ROWS
    )
    return (
        '<table class="figures"><tr><th class="name">figure</th><th>value</th>'
        f"<th>95% CI</th></tr>{rows}</table>"
    )


def _unit_text(m: dict[str, Any]) -> str:
    """What a breast or exam unit is, and the rule that scored it."""
    a = m["aggregation"]
    rule = "the model's rule" if a["source"] == "model" else "the default rule"
    what = (
        "the images of one study with one side"
        if m["level"] == Level.BREAST.value
        else "the images of one study; images of unknown side count as one group"
    )
    return (
        f"<p class=\"small\">{'An' if m['level'][0] in 'aeiou' else 'A'} "
        f"{escape(m['level'])} is {what}. Its score is {rule} over its "
        f"{m['images']} image(s) with a known outcome (breast: {escape(a['breast'])} of its "
        f"images, exam: {escape(a['exam'])} of its breasts); it is malignant if any of its "
        "images is, and called at the threshold recorded with its images.</p>"
    )


def _model_section(m: dict[str, Any], png: bytes) -> str:
    b = m["bootstrap"]
    version = escape(m["model_version"])
    level = escape(m["level"])
    threshold = ", ".join(f"{t:.4f}" for t in m["thresholds"]) or "not recorded"
    caveats = "".join(f'<div class="caveat">Caveat: {escape(c)}</div>' for c in m["caveats"])
    heading = f"Model {version}" if m["level"] == Level.IMAGE.value else (
        f"Model {version}: {level} level"
    )
    about = "" if m["level"] == Level.IMAGE.value else _unit_text(m)
    return f"""
<section class="model level-{level}">
<h2>{heading}</h2>
<p>{level} level: n = {m["n"]} ({m["positives"]} malignant, {m["negatives"]} benign),
operating threshold {threshold} (the one recorded with each score).</p>
{about}
{caveats}
<div style="display:flex; gap:2em; flex-wrap:wrap; align-items:flex-start">
{_figures_table(m)}
{_confusion_table(m)}
</div>
<p class="small">95% intervals: {escape(bootstrap_text(b))}.</p>
<div class="plots">{_png_img(png, "audit plots for model " + m["model_version"])}</div>
</section>"""


def _operating_points_table(version: str, points: list[dict[str, Any]]) -> str:
    """The text report's operating-point comparison: what each of the model's points would
    have called in the period, beside its figures on validation data."""
    rows = "".join(
        f'<tr><td class="name">{escape(p["name"])}</td><td>{p["threshold"]:.4f}</td>'
        + "".join(f"<td>{fmt_value(p[k])}</td>"
                  for k in ("recall_rate", "sensitivity", "specificity"))
        + "".join(f"<td>{fmt_value(p['validation'][k])}</td>"
                  for k in ("sensitivity", "specificity", "recall_rate"))
        + "</tr>"
        for p in points
    )
    return f"""
<section class="operating-points">
<h2>Operating points of model {escape(version)}</h2>
<p>What each of the model's operating points (from the model file), and each site point from
<code>screen calibrate</code>, would have called in this period: the recall rate over every
scored image, sensitivity and specificity over those with a known outcome, beside the point's
figures on the data it was chosen on (validation, or the site's calibration).</p>
<table class="operating-points"><tr><th class="name" rowspan="2">point</th>
<th rowspan="2">threshold</th><th colspan="3">in this period</th>
<th colspan="3">on validation</th></tr>
<tr><th>recall rate</th><th>sensitivity</th><th>specificity</th><th>sensitivity</th>
<th>specificity</th><th>recall rate</th></tr>{rows}</table>
</section>"""


def fitness_html(f: dict[str, Any] | None) -> str:
    """The fitness verdict (worker.audit.fitness) as a section (every string escaped); ""
    without one."""
    if not f:
        return ""
    rows = "".join(
        f'<tr><td class="name">{escape(c["rule"])}</td>'
        f'<td>{escape(fmt_value(c["value"]))}</td>'
        f'<td>{fmt_ci(c["ci"])}</td>'
        f'<td class="status">{escape(c["status"])}</td></tr>' for c in f["criteria"])
    return (
        f'<section class="fitness verdict-{escape(f["verdict"].replace(" ", "-"))}">'
        f"<h2>Fit for this site? {escape(f['verdict'].upper())}</h2>"
        f"<p>Model {escape(f['model_version'])}, {escape(f['level'])} level "
        f"({f['positives']} malignant, {f['negatives']} benign), operating point "
        f"{escape(f['operating_point'])} (threshold {f['threshold']:.4f}). The criteria were "
        "declared before looking (config.toml [fitness]).</p>"
        '<table><tr><th class="name">criterion</th><th>value</th><th>95% CI</th>'
        f"<th>status</th></tr>{rows}</table></section>")


def _version_sections(audit: Audit, m: dict[str, Any]) -> str:
    """A version's image-level section, then one per breast and exam level (or a note)."""
    from worker.audit.report_plots import figure_png

    version = m["model_version"]
    out = _model_section(m, figure_png(audit, [version]))
    for level, lm in m["levels"].items():
        out += _model_section(lm, figure_png(audit, [version], levels=(Level(level),)))
    out += "".join(
        f'<p class="small level-note">Model {escape(version)}: {escape(note)} (level left '
        "out).</p>"
        for note in m["level_notes"]
    )
    return out


def render_html(audit: Audit, generated: dt.datetime | None = None, overlays: str = "") -> str:
    """The page; ``overlays``: the heatmap section (worker/audit/overlays.py), already HTML."""
    r = audit.report
    generated = generated or utcnow()
    versions = ", ".join(escape(m["model_version"]) for m in r["models"]) or "none"
    counts = ", ".join(f"{escape(k)} {v}" for k, v in r["by_status"].items()) or "none"
    calls = ", ".join(f"{escape(k)} {v}" for k, v in r["by_call"].items()) or "none"
    units = sorted(
        {m["bootstrap"]["unit"] for m in r["models"]}
        | {lm["bootstrap"]["unit"] for m in r["models"] for lm in m["levels"].values()}
    ) or ["image"]
    # The report's list repeats each version's caveats with its name; those show in its section.
    per_version = {f"{m['model_version']}: {c}" for m in r["models"] for c in m["caveats"]}
    per_version |= {
        f"{m['model_version']}, {level} level: {c}"
        for m in r["models"]
        for level, lm in m["levels"].items()
        for c in lm["caveats"]
    }
    global_caveats = [c for c in r["caveats"] if c not in per_version]
    sections = "".join(_version_sections(audit, m) for m in r["models"])
    points = "".join(_operating_points_table(v, p)
                     for v, p in r.get("operating_points", {}).items())
    if not r["models"]:
        sections = "<p>No scored image has a known outcome in this period: nothing to audit.</p>"
    quarantined = ""
    if r["quarantined_files"]:
        rows = "".join(
            f'<tr><td class="name">{escape(q["filename"])}</td>'
            f'<td class="name">{escape(q["reason"] or "")}</td></tr>'
            for q in r["quarantined_files"]
        )
        quarantined = (
            "<h2>Quarantined files</h2>"
            f'<table><tr><th class="name">file</th><th class="name">reason</th></tr>{rows}</table>'
        )
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>mammo-screen audit report</title>
<style>{CSS}</style>
</head>
<body>
<h1>mammo-screen audit report</h1>
<p class="disclaimer"><b>Research tool.</b> {escape(DISCLAIMER)}</p>
<table class="meta">
<tr><th class="name">period</th><td>{escape(period_text(r))} (UTC)</td></tr>
<tr><th class="name">model version(s)</th><td>{versions}</td></tr>
<tr><th class="name">images recorded</th><td>{r["total"]} ({counts})</td></tr>
<tr><th class="name">called by the model</th><td>{calls}</td></tr>
<tr><th class="name">scored with a known outcome</th>
<td>{r["with_outcome"]} of {r["scored"]}</td></tr>
<tr><th class="name">generated</th><td>{generated.strftime("%Y-%m-%d %H:%M")} UTC</td></tr>
</table>
{"".join(f'<div class="caveat">Caveat: {escape(c)}</div>' for c in global_caveats)}
{fitness_html(r.get("fitness"))}
{sections}
{points}
{overlays}
<h2>How to read this</h2>
{HOW_TO_READ.replace("{unit}", escape(" / ".join(units)))}
{quarantined}
</body>
</html>
"""


def write_html(audit: Audit, out: Path, overlays: str = "") -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render_html(audit, overlays=overlays), encoding="utf-8")
