"""The fitness verdict of `screen report`: criteria declared in [fitness], each met, not met
or not enough data, and one verdict: fit, not fit or not enough data."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.test_site_points import _drop, _import, _screen, _site
from worker.audit.fitness import Criteria, Status, assess, judge
from worker.audit.units import AuditRow


@pytest.mark.parametrize(("ci", "enough", "expected"), [
    (None, True, Status.NO_DATA),
    ((0.80, 0.90), True, Status.MET),
    ((0.70, 0.90), True, Status.NOT_MET),  # the interval reaches below the bar
    ((0.70, 0.90), False, Status.NO_DATA),
    ((0.80, 0.90), False, Status.NO_DATA),  # clears it, but on too few cancers
    ((0.50, 0.70), False, Status.NOT_MET),  # wholly below: no, however few the cases
])
def test_one_criterion(ci, enough, expected) -> None:
    assert judge(ci, 0.75, enough) is expected


def _rows(scores_truth: list[tuple[float, bool]]) -> list[AuditRow]:
    return [AuditRow(i, f"{i}.png", "v", truth, score, 0.5, score >= 0.5, patient_id=f"p{i}")
            for i, (score, truth) in enumerate(scores_truth)]


def _verdict(scores_truth: list[tuple[float, bool]], **criteria) -> dict:
    return assess(_rows(scores_truth), 0.5, Criteria(**criteria), "v", "sens90",
                  resamples=500)


def test_verdicts() -> None:
    separated = [(0.9, True)] * 30 + [(0.1, False)] * 30
    fit = _verdict(separated)
    assert fit["verdict"] == "fit"
    assert [c["status"] for c in fit["criteria"]] == ["met"] * 4
    reversed_ = [(0.1, True)] * 30 + [(0.9, False)] * 30
    assert _verdict(reversed_)["verdict"] == "not fit"
    few = [(0.9, True)] * 5 + [(0.1, False)] * 30
    result = _verdict(few)
    assert result["verdict"] == "not enough data"
    assert {c["name"]: c["status"] for c in result["criteria"]} == {
        "cancers": "not enough data", "auc": "not enough data",
        "sensitivity": "not enough data", "specificity": "met"}
    assert _verdict([])["verdict"] == "not enough data"
    # A bar the data clears is met; raise it above the interval and it is not.
    assert _verdict(separated, min_specificity=1.0)["verdict"] == "fit"
    mixed = [(0.9, True)] * 27 + [(0.1, True)] * 3 + [(0.1, False)] * 30
    assert _verdict(mixed, min_sensitivity=0.95)["verdict"] == "not fit"


def test_report_says_not_fit_plainly(tmp_path: Path) -> None:
    config = _site(tmp_path)
    outcomes = _drop(config, 40, malignant_bright=False)  # the model ranks them backwards
    _screen(config, "process")
    _import(config, outcomes)
    fitness = json.loads(_screen(config, "report", "--format", "json"))["fitness"]
    assert fitness["verdict"] == "not fit" and fitness["level"] == "image"
    auc = {c["name"]: c for c in fitness["criteria"]}["auc"]
    assert auc["status"] == "not met" and auc["ci"][1] < 0.75
    assert "FITNESS of model test-mean-1 for this site: NOT FIT" in _screen(config, "report")
    _screen(config, "report", "--html", str(tmp_path / "audit.html"))
    assert "Fit for this site? NOT FIT" in (tmp_path / "audit.html").read_text()


def test_report_says_not_enough_data_with_few_cancers(tmp_path: Path) -> None:
    # The mean model's default threshold calls every one of these images malignant: no
    # specificity bar here, so that only the cancers' count is in question.
    config = _site(tmp_path, fitness="[fitness]\nmin_auc = 0.6\nmin_cancers = 10\n"
                                     "min_specificity = 0.0\n")
    outcomes = _drop(config, 24, cancers=4)  # the 4 brightest: well ranked, but 4
    _screen(config, "process")
    _import(config, outcomes)
    fitness = json.loads(_screen(config, "report", "--format", "json"))["fitness"]
    assert fitness["verdict"] == "not enough data", fitness["criteria"]
    assert fitness["declared"]["min_auc"] == 0.6 and fitness["positives"] == 4
    cancers = {c["name"]: c for c in fitness["criteria"]}["cancers"]
    assert cancers["status"] == "not enough data" and cancers["value"] == 4
