"""Is the configured model fit for this site? The verdict `screen report` gives.

The criteria are declared before looking (config.toml [fitness], documented defaults) and
judged on the site's own outcomes at one level, each with its patient-bootstrap 95%
interval (worker/audit/bootstrap.py):

* enough cancers: at least ``min_cancers`` malignant units, or no figure below can pass;
* discrimination: the lower end of the ROC AUC's interval at least ``min_auc``;
* at the configured operating point, the lower ends of the sensitivity and specificity
  intervals at least ``min_sensitivity`` and ``min_specificity``.

A criterion is *met* when its whole interval clears the bar (with enough cancers), *not met*
when the interval does not (a figure whose whole interval is below the bar is not met
however few the cases: the data already says no), and *not enough data* otherwise. The
verdict is ``not fit`` when any criterion is not met, ``not enough data`` when any lacks
data, else ``fit``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from enum import StrEnum
from typing import Any

from worker.audit.bootstrap import RESAMPLES, SEED, bootstrap_cis
from worker.audit.metrics import confusion_of_calls, rates, roc_auc
from worker.audit.units import resampling_groups, truth_and_scores


class Status(StrEnum):
    MET = "met"
    NOT_MET = "not met"
    NO_DATA = "not enough data"


class Verdict(StrEnum):
    FIT = "fit"
    NOT_FIT = "not fit"
    NO_DATA = "not enough data"


@dataclass(frozen=True)
class Criteria:
    level: str = "image"
    min_cancers: int = 20
    min_auc: float = 0.75
    min_sensitivity: float = 0.80
    min_specificity: float = 0.80

    @classmethod
    def from_config(cls, values: dict[str, Any]) -> Criteria:
        return cls(**values) if values else cls()


def judge(ci: list[float] | tuple[float, float] | None, minimum: float, enough: bool
          ) -> Status:
    """One interval criterion (see the module's docstring)."""
    if ci is None:
        return Status.NO_DATA
    low, high = ci
    if high < minimum:
        return Status.NOT_MET
    if not enough:
        return Status.NO_DATA
    return Status.MET if low >= minimum else Status.NOT_MET


def verdict_of(statuses: list[Status]) -> Verdict:
    if Status.NOT_MET in statuses:
        return Verdict.NOT_FIT
    if Status.NO_DATA in statuses:
        return Verdict.NO_DATA
    return Verdict.FIT


def assess(rows: list, threshold: float, criteria: Criteria, model_version: str,
           operating_point: str, resamples: int = RESAMPLES, seed: int = SEED
           ) -> dict[str, Any]:
    """The verdict on ``rows`` (the units of ``criteria.level`` with a known outcome,
    worker.audit.units.AuditRow) at ``threshold``, as a JSON-ready dict."""
    y, s = truth_and_scores(rows)
    called = s >= threshold
    pos, neg = int(y.sum()), int((~y).sum())
    cis: dict[str, Any] = {}
    figures: dict[str, Any] = {}
    if rows:
        groups, _ = resampling_groups(rows)
        cis = bootstrap_cis(y, s, called, groups, resamples=resamples, seed=seed).cis
        figures = {**rates(confusion_of_calls(y, called)), "auc": roc_auc(y, s)}
    enough_pos, enough_neg = pos >= criteria.min_cancers, neg >= criteria.min_cancers

    def interval(name: str, rule: str, minimum: float, enough: bool) -> dict[str, Any]:
        ci = cis.get(name)
        return {"name": name, "rule": rule, "minimum": minimum, "value": figures.get(name),
                "ci": None if ci is None else list(ci), "status": judge(ci, minimum, enough)}

    items = [
        {"name": "cancers", "rule": f"at least {criteria.min_cancers} malignant "
                                    f"{criteria.level}(s) with a known outcome",
         "minimum": criteria.min_cancers, "value": pos, "ci": None,
         "status": Status.MET if enough_pos else Status.NO_DATA},
        interval("auc", f"lower end of the ROC AUC's 95% interval >= {criteria.min_auc:g}",
                 criteria.min_auc, enough_pos and neg > 0),
        interval("sensitivity", f"lower end of the sensitivity's 95% interval at "
                                f"{operating_point} >= {criteria.min_sensitivity:g}",
                 criteria.min_sensitivity, enough_pos),
        interval("specificity", f"lower end of the specificity's 95% interval at "
                                f"{operating_point} >= {criteria.min_specificity:g}",
                 criteria.min_specificity, enough_neg),
    ]
    verdict = verdict_of([i["status"] for i in items])
    for i in items:
        i["status"] = i["status"].value
    return {"verdict": verdict.value, "model_version": model_version,
            "level": criteria.level, "operating_point": operating_point,
            "threshold": threshold, "positives": pos, "negatives": neg,
            "criteria": items, "declared": asdict(criteria)}

