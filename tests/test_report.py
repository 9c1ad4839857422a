"""Outcomes import and the report's figures, checked against an independent computation."""

from __future__ import annotations

import csv
import io
import json
import re
from pathlib import Path

import pytest
from click.testing import CliRunner

from tests.conftest import DATA, copy_into, dev_pool_images
from worker.audit.report import build_report
from worker.cli import cli
from worker.config import Config
from worker.records.models import ImageRecord
from worker.records.store import ImageStatus, Store


def _run(workdir: Path, *args: str) -> str:
    result = CliRunner().invoke(
        cli, ["--config", str(workdir / "config.toml"), *args], catch_exceptions=False
    )
    assert result.exit_code == 0, result.output
    return result.stdout


def _insert(store: Store, rows: list[tuple[str, str, float, str]], threshold: float = 0.5) -> None:
    with store.write() as s:
        for name, sha, score, version in rows:
            s.add(
                ImageRecord(
                    filename=name,
                    source_path="/in/" + name,
                    sha256=sha,
                    size_bytes=1,
                    status=ImageStatus.SCORED,
                    score=score,
                    threshold=threshold,
                    label="malignant" if score >= threshold else "benign",
                    model_version=version,
                    attempts=1,
                )
            )


def test_report_by_hand(tmp_path: Path) -> None:
    store = Store(f"sqlite:///{tmp_path / 'r.db'}")
    _insert(
        store,
        [
            ("a", "1", 0.9, "m1"),
            ("b", "2", 0.6, "m1"),
            ("c", "3", 0.2, "m1"),
            ("d", "4", 0.7, "m1"),
            ("e", "5", 0.4, "m1"),
            ("f", "6", 0.1, "m1"),
            ("g", "7", 0.8, "m2"),
        ],
    )
    csv_file = tmp_path / "truth.csv"
    csv_file.write_text(
        "sha256,label\n1,malignant\n2,malignant\n3,malignant\n"
        "4,benign\n5,benign\n6,benign\n7,benign\n"
    )
    from worker.audit.outcomes import import_outcomes

    summary = import_outcomes(store, csv_file)
    assert summary.matched == 7 and not summary.unmatched
    rep = build_report(store)
    m1 = next(m for m in rep["models"] if m["model_version"] == "m1")
    assert (m1["tp"], m1["fp"], m1["tn"], m1["fn"]) == (2, 1, 2, 1)
    assert m1["accuracy"] == pytest.approx(4 / 6)
    assert m1["sensitivity"] == pytest.approx(2 / 3) and m1["specificity"] == pytest.approx(2 / 3)
    assert m1["ppv"] == pytest.approx(2 / 3) and m1["npv"] == pytest.approx(2 / 3)
    assert m1["auc"] == pytest.approx(6 / 9)  # 0.9 beats 3, 0.6 beats 2, 0.2 beats 1
    m2 = next(m for m in rep["models"] if m["model_version"] == "m2")
    assert m2["fp"] == 1 and m2["auc"] is None
    assert rep["by_call"] == {"benign": 3, "malignant": 4}


def test_outcomes_import_reports_unmatched_names(tmp_path: Path) -> None:
    store = Store(f"sqlite:///{tmp_path / 'r.db'}")
    _insert(store, [("sub/a.png", "aa", 0.9, "m1")])
    csv_file = tmp_path / "truth.csv"
    csv_file.write_text(
        "filename,label\na.png,malignant\nmissing.png,benign\nsub/a.png,1\na.png,maybe\n"
    )
    from worker.audit.outcomes import import_outcomes

    s = import_outcomes(store, csv_file, skip_invalid=True)  # the row labelled 'maybe'
    assert s.matched == 2 and s.unmatched == ["missing.png"] and len(s.invalid) == 1
    assert store.outcomes() == {"aa": "malignant"}


def test_end_to_end_report_agrees_with_results(workdir: Path, config: Config) -> None:
    """process -> results -> outcomes import -> report json, checked independently."""
    imgs = dev_pool_images(40)
    copy_into(imgs, config.inbox)
    # Not an image, and a name that is markup: quarantined, and shown as text in the HTML page.
    (config.inbox / "<i>x&y<i>.png").write_bytes(b"not an image at all")
    _run(workdir, "process", "--timeout", "20")
    listed = list(csv.DictReader(io.StringIO(_run(workdir, "results", "--format", "csv"))))
    rows = [r for r in listed if r["status"] == "scored"]
    assert len(rows) == 40 and len(listed) == 41
    assert {"filename", "sha256", "score", "label", "model_version", "status"} <= set(rows[0])

    truth = {}
    with (DATA / "labels.csv").open() as fh:
        for r in csv.DictReader(fh):
            truth[Path(r["filename"]).name] = r["label"]
    outcome_csv = workdir / "biopsy.csv"
    outcome_csv.write_text(
        "filename,label\n"
        + "".join(f"{r['filename']},{truth[r['filename']]}\n" for r in rows)
        + "nobody.jpg,benign\n"
    )
    result = CliRunner().invoke(
        cli, ["--config", str(workdir / "config.toml"), "outcomes", "import", str(outcome_csv)]
    )
    assert result.exit_code == 0 and "nobody.jpg" in result.output

    html = workdir / "audit.html"
    rep = json.loads(
        _run(workdir, "report", "--format", "json", "--plot", str(workdir / "rep.png"),
             "--html", str(html))
    )
    (m,) = rep["models"]
    # independent computation from the results listing
    y = [truth[r["filename"]] == "malignant" for r in rows]
    s = [float(r["score"]) for r in rows]
    t = float(rows[0]["threshold"])
    tp = sum(1 for yi, si in zip(y, s, strict=True) if yi and si >= t)
    fp = sum(1 for yi, si in zip(y, s, strict=True) if not yi and si >= t)
    assert (m["tp"], m["fp"]) == (tp, fp)
    assert m["tn"] + m["fp"] == y.count(False) and m["tp"] + m["fn"] == y.count(True)
    pos = [si for yi, si in zip(y, s, strict=True) if yi]
    neg = [si for yi, si in zip(y, s, strict=True) if not yi]
    pairs = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p in pos for n in neg)
    assert m["auc"] == pytest.approx(pairs / (len(pos) * len(neg)))
    assert (workdir / "rep.png").stat().st_size > 1000
    # the audit's intervals, unit and orientation
    assert m["confusion"]["matrix"] == [[m["tn"], m["fp"]], [m["fn"], m["tp"]]]
    assert m["recall_rate"] == pytest.approx((tp + fp) / 40)
    for k in ("auc", "sensitivity", "specificity", "ppv", "npv", "recall_rate", "accuracy"):
        assert m[f"{k}_ci"][0] <= m[k] <= m[f"{k}_ci"][1], k
    assert m["bootstrap"] == {
        "unit": "image", "groups": 40, "resamples": 2000, "seed": m["bootstrap"]["seed"],
        "level": 0.95,
    }
    # the configured model's one point ("default", at its threshold) in this period
    (point,) = rep["operating_points"][m["model_version"]]
    assert (point["name"], point["threshold"]) == ("default", t)
    assert point["recall_rate"] == pytest.approx((tp + fp) / 40)
    assert point["sensitivity"] == m["sensitivity"] and point["specificity"] == m["specificity"]
    assert rep["quarantined_files"][0]["filename"] == "<i>x&y<i>.png"
    page = html.read_text()
    assert not re.search(r"https?://|src=\"//", page)
    assert "&lt;i&gt;x&amp;y&lt;i&gt;.png" in page and "<i>x" not in page
    assert f"<td>{m['tn']}</td><td>{m['fp']}</td>" in page  # truth benign row: call b, call m
    assert page.count("data:image/png;base64,") == 1
    # a period with nothing in it: zeros, no figures, still exit 0
    empty = json.loads(_run(workdir, "report", "--format", "json", "--until", "2000-01-01"))
    assert empty["total"] == 0 and empty["models"] == []


def test_report_says_what_it_leaves_out_when_the_model_cannot_be_used(
        workdir: Path, config: Config) -> None:
    """The audit reads the database; the model's file only adds its operating points, rule
    and fitness verdict. A configured point the model lacks, or the file gone, is one line
    on stderr, and the report is still made."""
    copy_into(dev_pool_images(4), config.inbox)
    _run(workdir, "process", "--timeout", "20")
    toml = workdir / "config.toml"
    toml.write_text(toml.read_text().replace("[model]\n", "[model]\noperating_point = 'nosuch'\n"))

    def report() -> tuple[dict, str]:
        result = CliRunner().invoke(cli, ["--config", str(toml), "report", "--format", "json"])
        assert result.exit_code == 0, result.output
        return json.loads(result.stdout), result.stderr

    rep, said = report()
    assert said.startswith("configured operating point not used: ") and "nosuch" in said
    assert rep["fitness"]["operating_point"] == "default" and rep["scored"] == 4
    toml.write_text(toml.read_text().replace("operating_point = 'nosuch'\n", ""))
    config.model_path.unlink()
    rep, said = report()
    # (the first try's line, "configured operating point not used: model file not found",
    # comes before it, as it always has)
    assert said.splitlines()[-1].startswith(
        "operating points not shown, breast and exam rule the default, no fitness verdict: ")
    assert "fitness" not in rep and rep["scored"] == 4
