"""The audit's figures, orientation, caveats and pages, over a real SQLite store."""

from __future__ import annotations

import datetime as dt
import re
from pathlib import Path

import numpy as np
import pytest

from worker.audit.figures import MIN_CASES
from worker.audit.outcomes import import_outcomes
from worker.audit.report import audit
from worker.audit.report_html import render_html
from worker.audit.report_plots import audit_figure, draw_confusion
from worker.audit.report_text import format_text
from worker.audit.units import AuditRow, ResampledUnit, resampling_groups
from worker.records.models import ImageRecord
from worker.records.store import ImageStatus, Store

NASTY_NAME = "<script>alert(1)</script>.png"
T0 = dt.datetime(2026, 3, 1)


def populated_store(db: Path) -> Store:
    """Two model versions (120 images, and 3 images), outcomes imported, one quarantined file."""
    store = Store(f"sqlite:///{db}")
    rng = np.random.default_rng(7)
    truth = []
    with store.write() as s:
        for i in range(123):
            big = i < 120
            y = bool(rng.random() < 0.35) if big else i == 120
            score = float(np.clip(rng.normal(0.55 if y else 0.35, 0.18), 0, 1)) if big else (
                0.9 if y else 0.2
            )
            threshold = 0.45 if big else 0.5
            s.add(
                ImageRecord(
                    filename=f"img{i}.png",
                    source_path=f"/in/img{i}.png",
                    sha256=f"h{i}",
                    size_bytes=1,
                    status=ImageStatus.SCORED,
                    score=score,
                    threshold=threshold,
                    label="malignant" if score >= threshold else "benign",
                    model_version="probe-v1" if big else "tiny-v0",
                    attempts=1,
                    received_at=T0 + dt.timedelta(hours=i),
                )
            )
            truth.append((f"h{i}", "malignant" if y else "benign"))
        s.add(
            ImageRecord(
                filename=NASTY_NAME,
                source_path="/in/x",
                sha256=None,
                size_bytes=1,
                status=ImageStatus.QUARANTINED,
                error="not an image: <b>bad</b>",
                attempts=1,
                received_at=T0,
            )
        )
    csv_file = db.with_suffix(".csv")
    csv_file.write_text("sha256,label\n" + "".join(f"{h},{lab}\n" for h, lab in truth))
    assert import_outcomes(store, csv_file).matched == 123
    return store


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return populated_store(tmp_path / "a.db")


def _model(rep: dict, version: str) -> dict:
    return next(m for m in rep["models"] if m["model_version"] == version)


def test_figures_by_hand_and_every_ci_beside_its_figure(store: Store) -> None:
    rows = audit(store, resamples=300).rows["probe-v1"]
    m = _model(audit(store, resamples=300).report, "probe-v1")
    tp = sum(r.truth and r.score >= 0.45 for r in rows)
    fp = sum(not r.truth and r.score >= 0.45 for r in rows)
    assert (m["tp"], m["fp"]) == (tp, fp) and m["n"] == 120 and m["threshold"] == 0.45
    assert m["recall_rate"] == pytest.approx((tp + fp) / 120)
    assert m["prevalence"] == pytest.approx(m["positives"] / 120)
    for k in ("auc", "sensitivity", "specificity", "ppv", "npv", "recall_rate", "accuracy"):
        low, high = m[f"{k}_ci"]
        assert low <= m[k] <= high and high - low < 0.5, k
    assert m["bootstrap"]["unit"] == "image" and m["bootstrap"]["groups"] == 120
    assert m["caveats"] == []


def test_one_orientation_in_json_text_and_picture(store: Store) -> None:
    a = audit(store, resamples=200)
    m = _model(a.report, "probe-v1")
    c = m["confusion"]
    assert (c["rows"], c["columns"], c["labels"]) == ("truth", "call", ["benign", "malignant"])
    assert c["matrix"] == [[m["tn"], m["fp"]], [m["fn"], m["tp"]]]
    assert m["fp"] != m["fn"]  # else a transposition would go unseen
    text = format_text(a.report)
    assert re.search(r"call benign\s+call malignant", text)
    assert re.search(rf"truth benign\s+{m['tn']}\s+{m['fp']}\n", text)
    assert re.search(rf"truth malignant\s+{m['fn']}\s+{m['tp']}\n", text)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    draw_confusion(ax, m)
    # imshow puts row i at y=i and column j at x=j: the number drawn at (x=1, y=0) is the
    # benign images called malignant.
    drawn = {(round(t.get_position()[1]), round(t.get_position()[0])): t.get_text()
             for t in ax.texts}
    want = {(0, 0): m["tn"], (0, 1): m["fp"], (1, 0): m["fn"], (1, 1): m["tp"]}
    assert drawn == {k: str(v) for k, v in want.items()}
    assert [t.get_text() for t in ax.get_xticklabels()] == ["call benign", "call malignant"]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["truth benign", "truth malignant"]
    assert ax.get_ylabel().startswith("truth") and ax.get_xlabel().startswith("call")
    plt.close(fig)


def test_small_samples_carry_caveats_everywhere(store: Store) -> None:
    a = audit(store, resamples=200)
    tiny = _model(a.report, "tiny-v0")
    # One malignant image: its rank is no AUC (it read 1.000 here, and 0.000 just as easily).
    assert tiny["auc"] is None and tiny["auc_ci"] is None and tiny["positives"] == 1 < MIN_CASES
    assert any(c.startswith("only 1 malignant image: ROC AUC not given") for c in tiny["caveats"])
    assert "  ROC AUC           n/a   n/a" in format_text(a.report)
    assert tiny["sensitivity_ci"] is None  # a third of resamples hold no malignant image
    assert any(c.startswith("tiny-v0: only 1 malignant") for c in a.report["caveats"])
    assert "CAVEAT: only 1 malignant" in format_text(a.report)
    fig = audit_figure(a)
    texts = [t.get_text() for sub in fig.subfigs for t in sub.texts]
    texts += [t.get_text() for sub in fig.subfigs for ax in sub.axes for t in ax.texts]
    assert any(t.startswith("CAUTION: only 1 malignant") for t in texts)
    assert any(t.startswith("too few cases to judge") for t in texts)  # on the ROC panel


def test_period_and_the_threshold_recorded_with_each_score(store: Store) -> None:
    a = audit(store, since=T0 + dt.timedelta(hours=10), until=T0 + dt.timedelta(hours=20))
    assert a.report["total"] == 10 and a.report["until"] == "2026-03-01T20:00:00Z"
    assert [m["model_version"] for m in a.report["models"]] == ["probe-v1"]
    # a score of 0.47 is malignant at the recorded 0.45, whatever the default would say
    assert all(r.called == (r.score >= 0.45) for r in a.rows["probe-v1"])


def test_patients_are_the_resampling_unit_when_known() -> None:
    def row(i: int, patient: str | None) -> AuditRow:
        return AuditRow(i, f"f{i}", "v", i % 2 == 0, 0.5, 0.5, True, patient_id=patient)

    groups, unit = resampling_groups([row(0, "A"), row(1, "A"), row(2, "B")])
    assert unit is ResampledUnit.PATIENT and groups[0] == groups[1] != groups[2]
    groups, unit = resampling_groups([row(0, None), row(1, None)])
    assert unit is ResampledUnit.IMAGE and groups[0] != groups[1]
    assert resampling_groups([row(0, "A"), row(1, None)])[1] is ResampledUnit.MIXED
    # No patient but a study: the study's units go together (breasts of one exam, say).
    s0, s1 = (AuditRow(i, f"f{i}", "v", True, 0.5, 0.5, True, study_uid="S") for i in (0, 1))
    groups, unit = resampling_groups([s0, s1, row(2, None)])
    assert unit is ResampledUnit.MIXED and groups[0] == groups[1] != groups[2]
    assert resampling_groups([s0, s1])[1] is ResampledUnit.STUDY


def test_html_is_self_contained_and_escaped(store: Store) -> None:
    page = render_html(audit(store, resamples=200))
    assert not re.search(r"https?://|src=\"//|url\(", page)
    assert NASTY_NAME not in page and "&lt;script&gt;alert(1)&lt;/script&gt;.png" in page
    assert "&lt;b&gt;bad&lt;/b&gt;" in page
    assert page.count('src="data:image/png;base64,') == 2
    assert "research tool, not a medical device" in page and "How to read this" in page
    assert "95% CI" in page and "truth malignant" in page and "Caveat: only 1 malignant" in page


def test_each_image_is_called_at_its_own_recorded_threshold(tmp_path: Path) -> None:
    store = Store(f"sqlite:///{tmp_path / 'm.db'}")
    with store.write() as s:
        for i, threshold in enumerate((0.3, 0.6)):
            s.add(ImageRecord(filename=f"f{i}", source_path=f"/in/f{i}", sha256=f"s{i}",
                              size_bytes=1, status=ImageStatus.SCORED, score=0.4,
                              threshold=threshold,
                              model_version="mix", attempts=1))
    (tmp_path / "o.csv").write_text("sha256,label\ns0,malignant\ns1,malignant\n")
    import_outcomes(store, tmp_path / "o.csv")
    (m,) = audit(store, resamples=100).report["models"]
    assert (m["tp"], m["fn"]) == (1, 1) and m["recall_rate"] == 0.5
    assert m["threshold"] is None and m["thresholds"] == [0.3, 0.6]
    assert any("2 different thresholds" in c for c in m["caveats"])
