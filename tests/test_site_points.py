"""Site operating points (`screen calibrate`): chosen on the site's own outcomes, recorded with
their history, used by the worker from then on, refused with another model version."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import text

from tests.conftest import make_mean_model, run_screen, write_mammo_like
from worker.audit.metrics import threshold_for_specificity
from worker.config import load_config
from worker.records.connect import open_store
from worker.records.schema import head
from worker.scoring.site_points import history, in_force

PATTERN = r"^(?P<patient_id>[^_/]+)_"


def _site(folder: Path, n: int = 40, point: str = "", version: str = "test-mean-1",
          fitness: str = "") -> Path:
    """A site: a config with the mean model (brighter tissue, higher score), an inbox and
    identity from the file names (patient_x_....png)."""
    model = folder / f"{version}.onnx"
    if not model.exists():
        make_mean_model(model, version=version)
    for sub in ("inbox", "processed", "quarantine", "outbox"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    config = folder / "config.toml"
    config.write_text(
        "[paths]\ninbox = 'inbox'\nprocessed = 'processed'\nquarantine = 'quarantine'\n"
        "outbox = 'outbox'\n[database]\nurl = 'sqlite:///screen.db'\n"
        f"[model]\npath = '{model.name}'\noperating_point = '{point}'\n"
        "[worker]\nsettle_seconds = 0.1\n"
        f"[identity]\nfilename_pattern = '{PATTERN}'\n{fitness}")
    return config


def _drop(config: Path, n: int, start: int = 0, malignant_bright: bool = True,
          cancers: int | None = None) -> dict[str, str]:
    """n images of n women (one each), brightness spread over 0.35..0.85; the brighter half
    malignant (or the darker, or only the `cancers` brightest), with some overlap. The
    outcome of each file name is returned."""
    inbox = config.parent / "inbox"
    outcomes = {}
    for i in range(start, start + n):
        bright = 0.35 + 0.5 * (i - start) / max(n - 1, 1)
        name = f"p{i}_img.png"
        write_mammo_like(inbox / name, bright=bright, seed=i)
        rank = i - start
        # Only the `cancers` brightest, or the brighter half with some overlap.
        bad = (rank >= n - cancers if cancers is not None
               else (rank >= n // 2) != (rank % 7 == 0))
        outcomes[name] = "malignant" if bad == malignant_bright else "benign"
    return outcomes


def _import(config: Path, outcomes: dict[str, str]) -> None:
    csv = config.parent / "outcomes.csv"
    csv.write_text("filename,label\n" + "".join(f"{k},{v}\n" for k, v in outcomes.items()))
    proc = run_screen("outcomes", "import", str(csv), config=config)
    assert proc.returncode == 0, proc.stderr


def _screen(config: Path, *args: str) -> str:
    proc = run_screen(*args, config=config)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


@pytest.fixture
def site(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    config = _site(tmp_path)
    outcomes = _drop(config, 40)
    _screen(config, "process")
    _import(config, outcomes)
    return config, outcomes


def test_calibrate_records_a_point_the_worker_then_calls_at(site) -> None:
    config, outcomes = site
    point = json.loads(_screen(config, "calibrate", "--sensitivity", "0.9", "--by", "alice",
                               "--format", "json"))
    assert point["name"] == "site-sens90" and point["level"] == "image"
    assert point["model_version"] == "test-mean-1" and point["created_by"] == "alice"
    assert point["women"] == 40 and point["unit"] == "patient"
    rows = json.loads(_screen(config, "results", "--format", "json"))
    scores = {r["filename"]: r["score"] for r in rows}
    cancers = [scores[f] for f, o in outcomes.items() if o == "malignant"]
    # The highest threshold that keeps 90% of the cancers at or above it.
    assert np.mean(np.array(cancers) >= point["threshold"]) >= 0.9
    assert np.mean(np.array(cancers) >= np.nextafter(point["threshold"], 1)) < 0.9
    for k in ("sensitivity", "specificity", "recall_rate"):
        low, high = point[f"{k}_ci"]
        assert low <= point[k] <= high and high - low > 0
    status = json.loads(_screen(config, "status", "--format", "json"))
    assert [p["name"] for p in status["site_points"]] == ["site-sens90"]
    # Selected by name: images from then on are called at it, breasts and exams too.
    _site(config.parent, point="site-sens90")
    _drop(config, 3, start=100)
    _screen(config, "process")
    new = [r for r in json.loads(_screen(config, "results", "--format", "json"))
           if r["filename"] in {"p100_img.png", "p101_img.png", "p102_img.png"}]
    assert len(new) == 3 and {r["threshold"] for r in new} == {point["threshold"]}
    assert all((r["label"] == "malignant") == (r["score"] >= point["threshold"]) for r in new)
    assert "site-sens90: threshold" in _screen(config, "status")
    report = json.loads(_screen(config, "report", "--format", "json"))
    shown = {p["name"]: p for p in report["operating_points"]["test-mean-1"]}
    assert shown["site-sens90"]["threshold"] == point["threshold"] and "default" in shown
    assert report["fitness"]["operating_point"] == "site-sens90"


def test_recalibrating_keeps_the_history_and_the_newest_is_in_force(site) -> None:
    config, _ = site
    first = json.loads(_screen(config, "calibrate", "--recall-rate", "0.5", "--name", "ours",
                               "--format", "json"))
    second = json.loads(_screen(config, "calibrate", "--specificity", "0.8", "--name", "ours",
                                "--format", "json"))
    assert first["threshold"] != second["threshold"]
    store = open_store(load_config(config))
    try:
        recorded = history(store)
    finally:
        store.dispose()
    assert [p.threshold for p in recorded] == [first["threshold"], second["threshold"]]
    assert in_force(recorded)[("ours", "test-mean-1")].threshold == second["threshold"]
    report = _screen(config, "report")
    assert report.count("ours for model test-mean-1") == 2  # both calibrations listed


def test_a_site_point_of_another_model_version_is_refused_in_one_line(site) -> None:
    config, _ = site
    _screen(config, "calibrate", "--sensitivity", "0.9")
    other = _site(config.parent, point="site-sens90", version="test-mean-2")
    proc = run_screen("process", config=other)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and len(lines) == 1, proc.stderr
    assert "calibrated for model version test-mean-1, not test-mean-2" in lines[0]


def test_calibrate_refuses_too_few_outcomes_and_mistakes_in_one_line(tmp_path: Path) -> None:
    config = _site(tmp_path)
    outcomes = _drop(config, 12, cancers=4)
    _screen(config, "process")
    _import(config, outcomes)
    for args, says in (
        (["--sensitivity", "0.9"], "too few outcomes to calibrate at image level: 4 malignant"),
        (["--sensitivity", "0.9", "--level", "exam"], "too few outcomes to calibrate at exam"),
        (["--sensitivity", "0.9", "--specificity", "0.5"], "exactly one of"),
        (["--recall-rate", "1.5"], "must be between 0 and 1"),
        (["--sensitivity", "0.9", "--name", "default"], "one of the model's own operating"),
    ):
        proc = run_screen("calibrate", *args, config=config)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode != 0 and says in proc.stderr, (args, proc.stderr)
        assert len(lines) == 1, proc.stderr
    store = open_store(load_config(config))
    try:
        assert history(store) == []  # nothing recorded by a refusal
    finally:
        store.dispose()


def test_calibration_gathers_the_units_the_audit_counts(tmp_path: Path) -> None:
    """A scored instance received again with the same bytes (a later duplicate row, same SOP
    UID) stays in; one sent again with other bytes is two images at image level and one of
    its breast and exam: calibration sees, at each level, what the report audits."""
    from worker.audit.calibration import site_units
    from worker.audit.outcomes import import_outcomes
    from worker.audit.report import audit
    from worker.records.models import ImageRecord
    from worker.records.store import ImageStatus, Store
    from worker.scoring.levels import Level

    store = Store(f"sqlite:///{tmp_path / 'd.db'}")
    rows = [("a", "a", "1.2.1", ImageStatus.SCORED, 0.9, "S1"),
            ("a-again", "a", "1.2.1", ImageStatus.DUPLICATE, 0.9, "S1"),  # same bytes
            ("b", "b", "1.2.2", ImageStatus.SCORED, 0.3, "S2"),
            ("b-recoded", "b2", "1.2.2", ImageStatus.SCORED, 0.4, "S2")]  # other bytes
    with store.write() as s:
        for name, sha, sop, status, score, study in rows:
            s.add(ImageRecord(filename=name, source_path=f"/in/{name}", sha256=sha,
                              size_bytes=1, status=status, score=score, threshold=0.5,
                              model_version="v", attempts=1, patient_id=study, study_uid=study,
                              laterality="L", sop_instance_uid=sop))
    (tmp_path / "o.csv").write_text("sha256,label\na,malignant\nb,benign\nb2,benign\n")
    import_outcomes(store, tmp_path / "o.csv")
    try:
        a = audit(store, resamples=20)
        assert [r.filename for r in site_units(store, "v", Level.IMAGE, None)] == [
            r.filename for r in a.rows["v"]] == ["a", "b", "b-recoded"]
        for level in (Level.BREAST, Level.EXAM):
            units = site_units(store, "v", level, None)
            assert units == a.units[("v", level)]
            assert [u.n_images for u in units] == [1, 1]  # a; b-recoded, the latest copy
    finally:
        store.dispose()


def test_threshold_for_specificity_is_the_lowest_that_reaches_it() -> None:
    y = np.array([0, 0, 0, 0, 1, 1], bool)
    s = np.array([0.1, 0.2, 0.3, 0.4, 0.35, 0.9])
    t = threshold_for_specificity(y, s, 0.75)  # 3 of 4 benign below: just above 0.3
    assert 0.3 < t < 0.35 and np.mean(s[~y] < t) == 0.75


def test_migration_0004_adds_the_table_to_an_older_database(tmp_path: Path) -> None:
    config = load_config(_site(tmp_path))
    store = open_store(config, create=True)
    with store.write() as s:  # as a database at revision 0001 was
        s.execute(text("DROP TABLE site_points"))
        s.execute(text("UPDATE alembic_version SET version_num = '0001'"))
    store.dispose()
    store = open_store(config)
    try:
        with store.read() as s:
            assert s.execute(text("SELECT version_num FROM alembic_version")).scalar() == head()
        assert history(store) == []
    finally:
        store.dispose()


def test_calibrate_and_history_on_postgresql(pg_url: str) -> None:
    from worker.audit.calibration import calibrate
    from worker.records.models import ImageRecord, Outcome
    from worker.records.store import Store
    from worker.scoring.levels import Level
    from worker.scoring.site_points import Target

    store = Store(pg_url)
    try:
        with store.write() as s:
            for i in range(30):
                sha = f"{i:064d}"
                s.add(ImageRecord(filename=f"{i}.png", source_path=f"/in/{i}.png", sha256=sha,
                                  status="scored", score=i / 30, threshold=0.5,
                                  model_version="v1", patient_id=f"p{i}"))
                s.add(Outcome(sha256=sha, label="malignant" if i >= 15 else "benign"))
        first = calibrate(store, "v1", Target.SENSITIVITY, 0.9, Level.IMAGE, created_by="a")
        again = calibrate(store, "v1", Target.RECALL_RATE, 0.2, Level.IMAGE,
                          name="site-sens90", created_by="b")
        recorded = history(store)
        assert [p.created_by for p in recorded] == ["a", "b"] and first.women == 30
        assert in_force(recorded)[("site-sens90", "v1")].threshold == again.threshold
    finally:
        store.dispose()
