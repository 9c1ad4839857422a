"""The audit's wording and pictures on small and mixed data: AUC not given on one case of a
class, the bootstrap line, "an exam", quarantine reasons kept whole, calibration bins that hold
enough cases, and --plot drawing every level."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import numpy as np
import pytest

from worker.audit.outcomes import import_outcomes
from worker.audit.report import audit, reason_kind
from worker.audit.report_html import render_html
from worker.audit.report_plots import MIN_PER_BIN, audit_figure, calibration_bins
from worker.audit.report_text import bootstrap_text, format_text
from worker.records.models import ImageRecord
from worker.records.store import ImageStatus, Store
from worker.scoring.levels import Level

T0 = dt.datetime(2026, 3, 1)
REASONS = (
    "DICOM modality CT is not allowed (dicom.allowed_modalities: MG)",
    "truncated DICOM pixel data: 14360 of 15360 bytes",
    "truncated DICOM pixel data: 100 of 200 bytes",
)


def exam_store(db: Path, exams: int = 12, malignant: int = 3) -> Store:
    """`exams` two-image exams (one per patient, L and R), the first `malignant` of them
    malignant in their left breast, and three quarantined files."""
    store = Store(f"sqlite:///{db}")
    rng = np.random.default_rng(3)
    truth = []
    with store.write() as s:
        for e in range(exams):
            for side in ("L", "R"):
                y = e < malignant and side == "L"
                score = float(np.clip(rng.normal(0.6 if y else 0.4, 0.15), 0, 1))
                name = f"e{e}{side}"
                s.add(ImageRecord(
                    filename=f"{name}.png", source_path=f"/in/{name}.png", sha256=name,
                    size_bytes=1, status=ImageStatus.SCORED, score=score, threshold=0.5,
                    label="malignant" if score >= 0.5 else "benign", model_version="v1",
                    attempts=1, received_at=T0, patient_id=f"P{e}", study_uid=f"S{e}",
                    laterality=side))
                truth.append((name, "malignant" if y else "benign"))
        for i, reason in enumerate(REASONS):
            s.add(ImageRecord(filename=f"bad{i}.dcm", source_path=f"/in/bad{i}.dcm", sha256=None,
                              size_bytes=1, status=ImageStatus.QUARANTINED, error=reason,
                              attempts=1,
                              received_at=T0))
    csv_file = db.with_suffix(".csv")
    csv_file.write_text("filename,label\n" + "".join(f"{h}.png,{lab}\n" for h, lab in truth))
    assert import_outcomes(store, csv_file).matched == 2 * exams
    return store


@pytest.fixture
def one_malignant_exam(tmp_path: Path) -> dict:
    store = exam_store(tmp_path / "a.db", malignant=1)
    try:
        return audit(store, resamples=200).report
    finally:
        store.dispose()


def test_auc_is_not_given_on_one_malignant_unit(one_malignant_exam: dict) -> None:
    (m,) = one_malignant_exam["models"]
    for figures in (m, m["levels"]["breast"], m["levels"]["exam"]):
        assert figures["positives"] == 1
        assert figures["auc"] is None and figures["auc_ci"] is None, figures["level"]
        assert any("ROC AUC not given" in c for c in figures["caveats"])
    assert "0.000" not in [line.split()[2] for line in format_text(one_malignant_exam)
                           .splitlines() if line.strip().startswith("ROC AUC")]


def test_bootstrap_line_names_what_was_resampled(one_malignant_exam: dict) -> None:
    (m,) = one_malignant_exam["models"]
    assert bootstrap_text(m["bootstrap"]).startswith("percentile bootstrap, ")
    assert f"resamples of {m['bootstrap']['groups']} patients, seed" in bootstrap_text(
        m["bootstrap"])
    mixed = {"unit": "patient where known, otherwise study, otherwise image", "groups": 23,
             "resamples": 2000, "seed": 0}
    assert bootstrap_text(mixed) == (
        "percentile bootstrap, 2000 resamples of 23 groups (each a patient where known, "
        "otherwise a study, otherwise an image), seed 0")
    assert "unit(s)" not in format_text(one_malignant_exam)


def test_an_exam_and_a_breast_in_the_html(tmp_path: Path) -> None:
    store = exam_store(tmp_path / "a.db")
    html = render_html(audit(store, resamples=100))
    store.dispose()
    assert "An exam is the images of one study" in html and "A exam" not in html
    assert "A breast is the images of one study with one side" in html
    assert "unit(s)" not in html


def test_quarantine_reasons_are_not_cut_inside_brackets(one_malignant_exam: dict) -> None:
    assert reason_kind(REASONS[0]) == REASONS[0]
    assert reason_kind(REASONS[1]) == "truncated DICOM pixel data"
    assert reason_kind("not an image: <b>bad</b>") == "not an image"
    assert reason_kind("no colon") == "no colon"
    assert one_malignant_exam["quarantine_reasons"] == {"truncated DICOM pixel data": 2,
                                                        REASONS[0]: 1}
    text = format_text(one_malignant_exam)
    for i, reason in enumerate(REASONS):  # every file's whole reason, too
        assert f"  bad{i}.dcm: {reason}" in text


def test_calibration_bins_hold_enough_cases() -> None:
    rng = np.random.default_rng(0)
    for n in (1, 3, 7, 12, 23, 60, 500):
        s = rng.random(n)
        y = rng.random(n) < s
        bins = calibration_bins(y, s)
        assert sum(c for _, _, c in bins) == n
        assert len(bins) <= max(1, n // 10)
        if n >= MIN_PER_BIN:
            assert min(c for _, _, c in bins) >= MIN_PER_BIN, (n, bins)
        assert [x for x, _, _ in bins] == sorted(x for x, _, _ in bins)
    s = np.linspace(0, 1, 500, endpoint=False)
    assert len(calibration_bins(s > 0.5, s)) == 10  # plenty of cases: ten bins of 0.1


def test_plot_draws_every_level(tmp_path: Path) -> None:
    import matplotlib.pyplot as plt

    store = exam_store(tmp_path / "a.db")
    fig = audit_figure(audit(store, resamples=100), levels=tuple(Level))
    store.dispose()
    titles = [sub._suptitle.get_text() for sub in fig.subfigs]
    assert [t.split(": ")[1].split(" level")[0] for t in titles] == ["image", "breast", "exam"]
    plt.close(fig)
