"""The audit at breast and exam level: `screen process` over PNGs whose names give patient,
study and side, outcomes imported, then `screen report`, checked against an independent
computation from the image scores `screen results` lists. Real files, SQLite, ONNX Runtime."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pytest

from tests.conftest import make_mean_model, run_screen, write_mammo_like
from worker.audit.report import audit
from worker.audit.report_html import render_html
from worker.audit.report_text import format_text
from worker.records.store import Store

PATTERN = r"^(?P<patient_id>[^_/]+)_(?P<study_uid>[^_/]+)_(?P<laterality>[LRU])_(?P<view>[A-Z]+)\."
RULE = {"breast": "max", "exam": "mean"}  # not the default, so using the model's rule shows

# (file name, brightness, outcome or None for no outcome yet). Brightness drives the score.
IMAGES = [
    ("P1_S1_L_CC.png", 0.70, "malignant"),
    ("P1_S1_L_MLO.png", 0.30, "benign"),  # the breast is malignant through its CC view
    ("P1_S1_R_CC.png", 0.20, "benign"),
    ("P1_S1_R_MLO.png", 0.25, "benign"),
    ("P2_S2_L_CC.png", 0.15, "benign"),
    ("P2_S2_R_CC.png", 0.60, "benign"),
    ("P2_S2_R_MLO.png", 0.10, None),  # no outcome: in no unit
    ("P2_S3_L_CC.png", 0.55, "malignant"),  # the same patient's next screen: another exam
    ("P2_S3_R_CC.png", 0.05, "benign"),
    ("P3_S4_L_CC.png", 0.40, "benign"),
    ("P3_S4_U_MLO.png", 0.65, "malignant"),  # unknown side: in the exam, in no breast
    ("P4_S5_R_MLO.png", 0.45, "malignant"),
    ("P4_S5_R_CC.png", 0.35, "malignant"),
    ("loose.png", 0.50, "malignant"),  # no identity: image level only
]


def _screen(workdir: Path, *args: str) -> str:
    out = run_screen(*args, config=workdir / "config.toml")
    assert out.returncode == 0, out.stderr
    return out.stdout


def _auc(units: list[tuple[bool, float]]) -> float:
    pos = [s for y, s in units if y]
    neg = [s for y, s in units if not y]
    wins = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


def _expected(scores: dict[str, float], truth: dict[str, bool]) -> dict[str, list]:
    """Breast and exam units worked out here, from the names, without the worker's code:
    (patient, truth, score) per unit."""
    studies: dict[str, list[tuple[str, str, str]]] = {}
    for name in truth:
        if name.count("_") == 3:
            patient, study, side, _ = name.split("_")
            studies.setdefault(study, []).append((patient, side, name))
    breasts, exams = [], []
    for members in studies.values():
        patient = members[0][0]
        groups: dict[str, list[str]] = {}
        for _, side, name in members:
            groups.setdefault(side, []).append(name)
        parts = []
        for side, names in sorted(groups.items()):
            score = max(scores[n] for n in names)  # breast rule: max
            parts.append(score)
            if side in "LR":
                breasts.append((patient, any(truth[n] for n in names), score))
        exam_truth = any(truth[n] for _, _, n in members)
        exams.append((patient, exam_truth, sum(parts) / len(parts)))  # exam rule: mean
    return {"breast": breasts, "exam": exams}


def _check(m: dict, units: list[tuple[str, bool, float]], threshold: float) -> None:
    y = [t for _, t, _ in units]
    s = [sc for _, _, sc in units]
    tp = sum(t and sc >= threshold for t, sc in zip(y, s, strict=True))
    fp = sum(not t and sc >= threshold for t, sc in zip(y, s, strict=True))
    fn, tn = sum(y) - tp, len(y) - sum(y) - fp
    assert m["n"] == len(units) and m["positives"] == sum(y)
    assert (m["tp"], m["fp"], m["tn"], m["fn"]) == (tp, fp, tn, fn)
    assert m["confusion"]["matrix"] == [[tn, fp], [fn, tp]]
    assert m["sensitivity"] == pytest.approx(tp / (tp + fn))
    assert m["specificity"] == pytest.approx(tn / (tn + fp))
    assert m["recall_rate"] == pytest.approx((tp + fp) / len(y))
    if min(sum(y), len(y) - sum(y)) < 2:  # one unit of a class: its rank is no AUC
        assert m["auc"] is None and m["auc_ci"] is None
    else:
        assert m["auc"] == pytest.approx(_auc(list(zip(y, s, strict=True))))
    assert m["thresholds"] == [pytest.approx(threshold)]
    # Resampled by patient: every unit here has one, and P2's two exams go together.
    assert m["bootstrap"]["unit"] == "patient"
    assert m["bootstrap"]["groups"] == len({p for p, _, _ in units})
    for key in ("sensitivity", "specificity", "recall_rate", "accuracy", "prevalence"):
        assert key in m and f"{key}_ci" in m


def _process(workdir: Path, threshold: float) -> dict[str, float]:
    """`screen process` over IMAGES with a model of `threshold`: the scores listed."""
    make_mean_model(workdir / "m.onnx", threshold=threshold, aggregation=RULE)
    inbox = workdir / "inbox"
    inbox.mkdir(parents=True)
    (workdir / "config.toml").write_text(
        "[paths]\ninbox = 'inbox'\nprocessed = 'processed'\nquarantine = 'quarantine'\n"
        "outbox = 'outbox'\ncreate_missing = true\n"
        "[database]\nurl = 'sqlite:///screen.db'\n[model]\npath = 'm.onnx'\n"
        "[worker]\nsettle_seconds = 0.2\nstudy_settle_seconds = 600\n"
        f"[identity]\nfilename_pattern = '{PATTERN}'\n"
    )
    for i, (name, bright, _) in enumerate(IMAGES):
        write_mammo_like(inbox / name, bright=bright, seed=i)
    _screen(workdir, "process")
    listed = list(csv.DictReader(io.StringIO(_screen(workdir, "results", "--format", "csv"))))
    assert {r["status"] for r in listed} == {"scored"} and len(listed) == len(IMAGES)
    return {r["filename"]: float(r["score"]) for r in listed}


def test_breast_and_exam_level_audit_end_to_end(tmp_path: Path) -> None:
    known = [(name, outcome) for name, _, outcome in IMAGES if outcome]
    truth = {n: o == "malignant" for n, o in known}
    # A first run finds the scores the preprocessing gives these images; the audited run's
    # threshold sits among the breast scores, so both levels have units on each side of it.
    probe = sorted(s for _, _, s in _expected(_process(tmp_path / "probe", 0.5), truth)["breast"])
    threshold = (probe[len(probe) // 2 - 1] + probe[len(probe) // 2]) / 2
    tmp_path = tmp_path / "audited"
    scores = _process(tmp_path, threshold)
    (tmp_path / "biopsy.csv").write_text(
        "filename,label\n" + "".join(f"{n},{o}\n" for n, o in known)
    )
    _screen(tmp_path, "outcomes", "import", str(tmp_path / "biopsy.csv"))

    rep = json.loads(_screen(tmp_path, "report", "--format", "json"))
    (m,) = rep["models"]
    assert m["level"] == "image" and m["n"] == len(known)  # image level where it always was
    assert set(m["levels"]) == {"breast", "exam"} and m["level_notes"] == []
    expected = _expected(scores, truth)
    assert len(expected["breast"]) == 8 and len(expected["exam"]) == 5
    for level in ("breast", "exam"):
        lm = m["levels"][level]
        assert lm["level"] == level and lm["model_version"] == "test-mean-1"
        assert lm["aggregation"] == {**RULE, "source": "model"}
        _check(lm, expected[level], threshold)
        assert lm["tp"] + lm["fp"] > 0 and lm["tn"] + lm["fn"] > 0, (level, expected[level])
    # Breasts hold the images with an outcome and a side; exams those with a study.
    assert m["levels"]["breast"]["images"] == 11 and m["levels"]["exam"]["images"] == 12

    text = _screen(tmp_path, "report")
    assert "breast level, n=8" in text and "exam level, n=5" in text
    assert "score: breast max, exam mean (from the model)" in text
    page = tmp_path / "audit.html"
    _screen(tmp_path, "report", "--html", str(page))
    html = page.read_text()
    assert "<h2>Model test-mean-1: breast level</h2>" in html
    assert "<h2>Model test-mean-1: exam level</h2>" in html
    assert html.count('src="data:image/png;base64,') == 3  # image, breast, exam pictures

    # Audited from Python without the model: the default rule, said so.
    store = Store(f"sqlite:///{tmp_path / 'screen.db'}")
    try:
        plain = audit(store, resamples=100).report["models"][0]["levels"]["exam"]
    finally:
        store.dispose()
    assert plain["aggregation"]["source"] == "default"
    assert any("not known" in c and "breast mean, exam max" in c for c in plain["caveats"])


def test_levels_without_identity_are_left_out_with_a_note(tmp_path: Path) -> None:
    from tests.test_report_audit import populated_store

    a = audit(populated_store(tmp_path / "a.db"), resamples=100)
    for m in a.report["models"]:
        assert m["levels"] == {} and len(m["level_notes"]) == 2
    text = format_text(a.report)
    assert "exam level: no image with a known outcome has a Study Instance UID" in text
    assert "(level left out)" in render_html(a)


def test_an_instance_sent_twice_is_one_image_of_its_breast(tmp_path: Path) -> None:
    """As in worker/results/aggregation.py: the latest copy of a SOP instance counts in
    breasts and exams; image level keeps both copies, as it always has."""
    from worker.audit.outcomes import import_outcomes
    from worker.records.models import ImageRecord
    from worker.records.store import ImageStatus

    store = Store(f"sqlite:///{tmp_path / 'd.db'}")
    rows = [("a", "1.2.3", 0.9), ("b", "1.2.3", 0.2), ("c", None, 0.4)]  # a then b: same instance
    with store.write() as s:
        for name, sop, score in rows:
            s.add(ImageRecord(filename=name, source_path=f"/in/{name}", sha256=name,
                              size_bytes=1, status=ImageStatus.SCORED, score=score, threshold=0.5,
                              model_version="v", attempts=1, patient_id="P", study_uid="S",
                              laterality="L", sop_instance_uid=sop))
    (tmp_path / "o.csv").write_text("sha256,label\na,malignant\nb,malignant\nc,benign\n")
    assert import_outcomes(store, tmp_path / "o.csv").matched == 3
    (m,) = audit(store, resamples=50, aggregation={"v": RULE}).report["models"]
    store.dispose()
    assert m["n"] == 3
    breast = m["levels"]["breast"]
    assert breast["n"] == 1 and breast["images"] == 2  # b (the latest copy) and c
    assert breast["fn"] == 1  # max(0.2, 0.4) < 0.5: called benign, and malignant through b
