"""Breasts and exams: aggregation, study settling, rescoring with history, the outbox, the
schema upgrade of an older database, and `screen results --level`. Real SQLite, real ONNX."""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
import re
import sqlite3
import subprocess
import time
from pathlib import Path

import pytest
from sqlalchemy import select, text

from tests.conftest import REPO, make_mean_model, run_screen, watching, write_mammo_like
from worker.app import open_worker
from worker.config import Config, load_config
from worker.imaging.preprocess import PreprocessSettings
from worker.records.clock import utcnow
from worker.records.models import ExamResult, ImageRecord
from worker.records.store import ImageStatus, Store, insert_events
from worker.results.aggregation import aggregate, score_exam
from worker.results.exams import ExamBook, Joining, join_exams
from worker.results.listing import BREAST_COLUMNS, EXAM_COLUMNS, breast_rows, exam_rows
from worker.results.outbox import SCHEMA_ID
from worker.scoring.model_metadata import (
    DEFAULT_AGGREGATION,
    KEY_AGGREGATION,
    ModelMetadata,
    ModelMetadataError,
)

PATTERN = r"^(?P<patient_id>[^_/]+)_(?P<study_uid>[^_/]+)_(?P<laterality>[LRU])_(?P<view>[A-Z]+)\."

# The documented outbox keys (docs/exams.md, "Outbox documents"): a document has exactly these.
DOC_KEYS = {
    "schema", "exam_id", "seq", "supersedes", "patient_id", "study_uid", "scored_at", "model",
    "n_images", "score", "label", "breasts", "images",
}  # fmt: skip
MODEL_KEYS = {"version", "threshold", "threshold_rule", "aggregation"}
BREAST_KEYS = {"laterality", "n_images", "score", "label"}
IMAGE_KEYS = {
    "id", "filename", "sha256", "sop_instance_uid", "laterality", "view", "score", "label",
    "model_version", "received_at", "scored_at",
}  # fmt: skip


# ---- aggregation and the model's rule ------------------------------------------------------


def test_aggregate_rules() -> None:
    assert aggregate([0.2, 0.4, 0.9], "mean") == pytest.approx(0.5)
    assert aggregate([0.2, 0.4, 0.9], "max") == 0.9
    with pytest.raises(ValueError):
        aggregate([], "mean")
    with pytest.raises(ValueError):
        aggregate([0.1], "median")


def test_breast_then_exam_and_unknown_side_in_no_breast() -> None:
    images = [("L", 0.2), ("L", 0.6), ("R", 0.3), (None, 0.8)]
    got = score_exam(images, {"breast": "mean", "exam": "max"})
    assert [(b.laterality, b.n_images) for b in got.breasts] == [("L", 2), ("R", 1)]
    assert got.breasts[0].score == pytest.approx(0.4) and got.breasts[1].score == 0.3
    assert got.n_images == 4 and got.score == pytest.approx(0.8)  # unknown side counts in the exam
    got = score_exam(images, {"breast": "max", "exam": "mean"})
    assert got.score == pytest.approx((0.6 + 0.3 + 0.8) / 3)
    only_left = score_exam([("L", 0.1), ("L", 0.3)], {"breast": "max", "exam": "mean"})
    assert only_left.score == 0.3 and len(only_left.breasts) == 1


def test_model_metadata_carries_the_rule_and_old_models_get_the_default(tmp_path: Path) -> None:
    meta = ModelMetadata(PreprocessSettings(size=32), 0.5, "v1")
    assert meta.aggregation == DEFAULT_AGGREGATION == {"breast": "mean", "exam": "max"}
    props = meta.to_props()
    custom = {**props, KEY_AGGREGATION: json.dumps({"breast": "max", "exam": "mean"})}
    assert ModelMetadata.from_props(custom).aggregation == {"breast": "max", "exam": "mean"}
    del props[KEY_AGGREGATION]  # a model exported before the key existed
    assert ModelMetadata.from_props(props).aggregation == DEFAULT_AGGREGATION
    for bad in ({"breast": "median", "exam": "max"}, {"breast": "mean"}, ["mean", "max"]):
        with pytest.raises(ModelMetadataError, match="aggregation"):
            ModelMetadata.from_props({**props, KEY_AGGREGATION: json.dumps(bad)})
    # and through a real ONNX model, loaded by the worker's scorer
    from worker.scoring.scorer import Scorer

    path = make_mean_model(tmp_path / "m.onnx", aggregation={"breast": "max", "exam": "max"})
    assert Scorer(path).metadata.aggregation == {"breast": "max", "exam": "max"}


# ---- the schema upgrade --------------------------------------------------------------------

# The schema exactly as the release before identity created it (sqlite_master of that code).
OLD_SCHEMA = """
CREATE TABLE images (
	id INTEGER NOT NULL, filename TEXT NOT NULL, source_path TEXT NOT NULL,
	sha256 VARCHAR(64), size_bytes INTEGER, status VARCHAR(16) NOT NULL,
	received_at DATETIME NOT NULL, scored_at DATETIME, score FLOAT, label VARCHAR(32),
	threshold FLOAT, model_version VARCHAR(128), error TEXT, duplicate_of INTEGER,
	attempts INTEGER NOT NULL, final_path TEXT, moved_at DATETIME,
	PRIMARY KEY (id), FOREIGN KEY(duplicate_of) REFERENCES images (id)
);
CREATE INDEX ix_images_status ON images (status);
CREATE UNIQUE INDEX uq_images_open_file ON images (source_path, sha256) WHERE moved_at IS NULL;
CREATE INDEX ix_images_sha256 ON images (sha256);
CREATE TABLE outcomes (
	sha256 VARCHAR(64) NOT NULL, label VARCHAR(32) NOT NULL, source TEXT,
	imported_at DATETIME NOT NULL, PRIMARY KEY (sha256)
);
CREATE TABLE events (
	id INTEGER NOT NULL, image_id INTEGER, at DATETIME NOT NULL, kind VARCHAR(32) NOT NULL,
	detail TEXT, PRIMARY KEY (id), FOREIGN KEY(image_id) REFERENCES images (id)
);
CREATE INDEX ix_events_image_id ON events (image_id);
INSERT INTO images (id, filename, source_path, sha256, size_bytes, status, received_at,
	scored_at, score, label, threshold, model_version, attempts, final_path, moved_at)
	VALUES (1, 'old.png', '/in/old.png', 'aa', 3, 'scored', '2026-01-01 00:00:00',
	'2026-01-01 00:00:01', 0.25, 'benign', 0.5, 'v0', 1, '/p/old.png', '2026-01-01 00:00:02');
INSERT INTO events (id, image_id, at, kind, detail) VALUES (1, 1, '2026-01-01 00:00:00',
	'received', '3 bytes');
"""


def test_a_database_from_the_previous_release_upgrades_in_place(workdir: Path) -> None:
    db = workdir / "screen.db"
    with sqlite3.connect(db) as con:
        con.executescript(OLD_SCHEMA)
    config = load_config(workdir / "config.toml")
    for _ in range(2):  # idempotent: a second open changes nothing
        store = Store(config.database_url)
        store.dispose()
    with sqlite3.connect(db) as con:
        cols = {r[1] for r in con.execute("PRAGMA table_info(images)")}
        assert {"patient_id", "study_uid", "laterality", "view", "sop_instance_uid"} <= cols
        assert "exam_id" in {r[1] for r in con.execute("PRAGMA table_info(events)")}
        tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        assert {"exams", "exam_results", "breast_results"} <= tables
        indexes = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='index'")}
        assert "ix_images_study_uid" in indexes
        assert con.execute("SELECT filename, score, study_uid FROM images").fetchall() == [
            ("old.png", 0.25, None)
        ]
    # and the worker runs on it: old rows stay, new images get identity and exams
    _set(workdir, filename_pattern=PATTERN, study_settle_seconds=0.0)
    config = load_config(workdir / "config.toml")
    write_mammo_like(config.inbox / "P1_S1_L_CC.png")
    worker = open_worker(config)
    worker.watcher.run_once(timeout=10)
    worker.close()
    with sqlite3.connect(db) as con:
        assert con.execute("SELECT count(*) FROM images").fetchone()[0] == 2
        assert con.execute("SELECT study_uid, n_images FROM exam_results").fetchall() == [("S1", 1)]


# ---- settling, rescoring, history ----------------------------------------------------------


def _set(workdir: Path, **keys: object) -> None:
    """Add [identity]/[worker] keys to the test config."""
    path = workdir / "config.toml"
    body = path.read_text()
    ident = {k: v for k, v in keys.items() if k in ("filename_pattern", "sidecar_csv")}
    work = {k: v for k, v in keys.items() if k not in ident}
    for k, v in work.items():
        body = body.replace("[worker]\n", f"[worker]\n{k} = {json.dumps(v)}\n")
    if ident:
        body += "[identity]\n" + "".join(f"{k} = '{v}'\n" for k, v in ident.items())
    path.write_text(body)


class Clock:
    """An injectable UTC clock that only moves when told (no sleeping in tests)."""

    def __init__(self) -> None:
        self.now = utcnow()

    def __call__(self) -> dt.datetime:
        return self.now

    def sync(self) -> None:
        """Back to the wall clock, which stamps the pipeline's image arrivals."""
        self.now = utcnow()

    def advance(self, seconds: float) -> None:
        self.now += dt.timedelta(seconds=seconds)


def _drop(config: Config, name: str, bright: float) -> None:
    write_mammo_like(config.inbox / name, bright=bright, seed=int(bright * 100))


def test_exam_waits_for_its_study_to_settle_and_a_late_image_rescores_it(workdir: Path) -> None:
    _set(workdir, filename_pattern=PATTERN, study_settle_seconds=60.0)
    config = load_config(workdir / "config.toml")
    _drop(config, "P1_S1_L_CC.png", 0.2)
    _drop(config, "P1_S1_L_MLO.png", 0.5)
    _drop(config, "P1_S1_R_CC.png", 0.3)
    _drop(config, "P2_S2_R_CC.png", 0.4)
    write_mammo_like(config.inbox / "no-identity.png", bright=0.9)
    worker = open_worker(config)
    worker.watcher.run_once(timeout=10)  # its own exam step: nothing has settled yet
    clock = Clock()
    book = ExamBook(worker.store, worker.scorer.metadata, config.outbox, 60.0, clock)
    clock.sync()
    assert book.due() == [] and book.step() == [] and book.waiting() == 2
    clock.advance(59)
    assert book.due() == []
    clock.advance(2)
    first = book.step()
    assert [s.study_uid for s in first] == ["S1", "S2"] and book.waiting() == 0

    with worker.store.read() as s:
        scores = {r.filename: r.score for r in s.scalars(select(ImageRecord))}
    left = (scores["P1_S1_L_CC.png"] + scores["P1_S1_L_MLO.png"]) / 2  # breast: mean
    right = scores["P1_S1_R_CC.png"]
    assert first[0].score == pytest.approx(max(left, right))  # exam: max
    assert first[0].label == ("malignant" if first[0].score >= 0.5 else "benign")
    breasts = {(r["study_uid"], r["laterality"]): r for r in breast_rows(worker.store)}
    assert breasts[("S1", "L")]["n_images"] == 2
    assert breasts[("S1", "L")]["score"] == pytest.approx(left)
    assert breasts[("S1", "L")]["label"] == ("malignant" if left >= 0.5 else "benign")
    assert set(breasts) == {("S1", "L"), ("S1", "R"), ("S2", "R")}
    # an image without a study belongs to no exam
    assert {r["study_uid"] for r in exam_rows(worker.store)} == {"S1", "S2"}

    # a late, brighter image of S1 reopens it; it is rescored only once quiet again
    _drop(config, "P1_S1_R_MLO.png", 0.9)
    worker.watcher.run_once(timeout=10)
    clock.sync()
    assert book.due() == [] and book.waiting() == 1
    clock.advance(61)
    second = book.step()
    assert [(s.study_uid, s.seq) for s in second] == [("S1", 2)]
    with worker.store.read() as s:
        history = list(s.scalars(select(ExamResult).order_by(ExamResult.id)))
        kinds = [
            k
            for (k,) in s.execute(
                text("SELECT kind FROM events WHERE exam_id = :e ORDER BY id"),
                {"e": second[0].exam_id},
            )
        ]
    worker.close()
    assert [(h.study_uid, h.seq, h.n_images) for h in history] == [
        ("S1", 1, 3),
        ("S2", 1, 1),
        ("S1", 2, 4),
    ]
    assert history[0].score == pytest.approx(first[0].score)  # the earlier score is kept
    assert kinds == [
        "exam_opened",
        "exam_scored",
        "outbox_written",
        "exam_reopened",
        "exam_scored",
        "outbox_written",
    ]
    latest = {r["study_uid"]: r for r in exam_rows(worker.store)}
    assert latest["S1"]["seq"] == 2 and latest["S1"]["n_images"] == 4
    assert len(exam_rows(worker.store, history=True)) == 3
    # both documents of S1 are in the outbox; the second names the first it supersedes
    docs = sorted(config.outbox.glob("S1.*.json"))
    assert [d.name for d in docs] == ["S1.001.json", "S1.002.json"]
    one, two = (json.loads(d.read_text()) for d in docs)
    assert one["n_images"] == 3 and two["n_images"] == 4 and two["supersedes"] == "S1.001.json"


def test_duplicates_and_quarantined_images_do_not_count(workdir: Path) -> None:
    _set(workdir, filename_pattern=PATTERN, study_settle_seconds=0.0)
    config = load_config(workdir / "config.toml")
    _drop(config, "P1_S1_L_CC.png", 0.3)
    worker = open_worker(config)
    worker.watcher.run_once(timeout=10)
    (config.inbox / "P1_S1_R_CC.png").write_bytes(
        (config.processed / "P1_S1_L_CC.png").read_bytes()  # same content: a duplicate
    )
    (config.inbox / "P1_S1_R_MLO.png").write_bytes(b"\x89PNG\r\n\x1a\ntruncated")
    worker.watcher.run_once(timeout=10)
    worker.close()
    (row,) = exam_rows(worker.store)
    assert row["n_images"] == 1 and row["seq"] == 1  # neither reopened nor counted it
    assert [b["laterality"] for b in breast_rows(worker.store)] == ["L"]


def test_an_instance_sent_twice_counts_once_as_its_latest_copy(tmp_path: Path) -> None:
    store = Store(f"sqlite:///{tmp_path / 's.db'}")
    now = utcnow()
    with store.write() as s:
        for i, (sop, lat, score) in enumerate(
            [("1.1", "L", 0.9), ("1.2", "R", 0.2), ("1.1", "L", 0.3), (None, "L", 0.5)]
        ):
            row = ImageRecord(
                filename=f"{i}.dcm", source_path=f"/in/{i}.dcm", sha256=f"{i:064d}",
                status=ImageStatus.SCORED,
                attempts=1, score=score, label="benign", study_uid="9.9", laterality=lat,
                sop_instance_uid=sop, patient_id="P",
            )  # fmt: skip
            s.add(row)
            s.flush()
            insert_events(s, list(join_exams(s, [Joining(row.id, "9.9", "P")], now).values()))
    meta = ModelMetadata(PreprocessSettings(size=32), 0.5, "v1")  # breast mean, exam max
    book = ExamBook(store, meta, tmp_path / "outbox", 0.0, lambda: now)
    (scoring,) = book.step()
    store.dispose()
    assert scoring.score == pytest.approx(max((0.3 + 0.5) / 2, 0.2))
    doc = json.loads(scoring.outbox_path.read_text())
    assert [i["filename"] for i in doc["images"]] == ["1.dcm", "2.dcm", "3.dcm"]


def test_a_batch_joins_its_exams_in_decision_order(tmp_path: Path) -> None:
    """One batch: two images of a new study (the second brings the patient the first
    lacked), and two late images of a scored study (reopened once, by the first)."""
    store = Store(f"sqlite:///{tmp_path / 's.db'}")
    now = utcnow()
    with store.write() as s:
        insert_events(s, list(join_exams(s, [Joining(1, "old", "P0")], now).values()))
    book = ExamBook(store, ModelMetadata(PreprocessSettings(size=32), 0.5, "v1"),
                    tmp_path / "outbox", 0.0, lambda: now)
    with store.write() as s:
        s.execute(text("UPDATE exams SET status = 'scored', scorings = 1"))
    later = now + dt.timedelta(seconds=5)
    images = [Joining(2, "new", None), Joining(3, "old", "P0"), Joining(4, "new", "P1"),
              Joining(5, "old", "P0")]
    with store.write() as s:
        events = join_exams(s, images, later)
        insert_events(s, [events[i] for i in sorted(events)])
    assert {i: (e["kind"], e["detail"]) for i, e in events.items()} == {
        2: ("exam_opened", "image #2"), 3: ("exam_reopened", "late image #3")}
    db = sqlite3.connect(tmp_path / "s.db")
    assert db.execute(
        "SELECT id, study_uid, patient_id, status, last_image_at FROM exams ORDER BY id"
    ).fetchall() == [(1, "old", "P0", "open", str(later).replace("T", " ")),
                     (2, "new", "P1", "open", str(later).replace("T", " "))]
    assert db.execute("SELECT exam_id, kind FROM events ORDER BY id").fetchall() == [
        (1, "exam_opened"), (2, "exam_opened"), (1, "exam_reopened")]
    db.close()
    assert book.due(settle_now=True) == [1, 2]  # both open
    store.dispose()


# ---- the outbox ----------------------------------------------------------------------------


def test_document_owed_after_a_crash_is_written_by_the_next_step(workdir: Path) -> None:
    _set(workdir, filename_pattern=PATTERN, study_settle_seconds=3600.0)
    config = load_config(workdir / "config.toml")
    _drop(config, "P1_S1_L_CC.png", 0.3)
    _drop(config, "P1_S1_R_CC.png", 0.6)
    worker = open_worker(config)
    worker.watcher.run_once(timeout=10)
    book = worker.exams
    (exam_id,) = book.due(settle_now=True)
    scoring = book.score(exam_id)  # committed; "crash" before the document is written
    assert scoring is not None and not scoring.outbox_path.exists()
    assert book.step() == []  # nothing new to score, but the owed document is written
    worker.close()
    doc = json.loads(scoring.outbox_path.read_text())
    _check_document(doc)
    assert doc["seq"] == 1 and doc["study_uid"] == "S1" and doc["patient_id"] == "P1"
    assert [b["laterality"] for b in doc["breasts"]] == ["L", "R"]
    assert [i["filename"] for i in doc["images"]] == ["P1_S1_L_CC.png", "P1_S1_R_CC.png"]
    assert not [p for p in config.outbox.iterdir() if p.name.startswith(".")]  # no temp left


def _check_document(doc: dict) -> None:
    assert set(doc) == DOC_KEYS and doc["schema"] == SCHEMA_ID
    assert set(doc["model"]) == MODEL_KEYS
    assert all(set(b) == BREAST_KEYS for b in doc["breasts"])
    assert all(set(i) == IMAGE_KEYS for i in doc["images"])
    assert all(re.fullmatch(r"[0-9a-f]{64}", i["sha256"]) for i in doc["images"])
    assert doc["n_images"] == len(doc["images"])
    assert doc["label"] == ("malignant" if doc["score"] >= doc["model"]["threshold"] else "benign")
    assert doc["scored_at"].endswith("Z")


def test_readme_documents_every_outbox_key() -> None:
    readme = (REPO / "docs" / "exams.md").read_text()
    section = readme.split("## Outbox documents", 1)[1].split("\n## ", 1)[0]
    assert SCHEMA_ID in section
    for key in DOC_KEYS | MODEL_KEYS | BREAST_KEYS | IMAGE_KEYS:
        assert f"`{key}`" in section, f"outbox key {key} undocumented"


# ---- end to end: screen process over PNGs named by a pattern -------------------------------


def _screen(workdir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return run_screen(*args, config=workdir / "config.toml")


def test_screen_process_end_to_end_exam_results_and_outbox(tmp_path: Path) -> None:
    make_mean_model(tmp_path / "m.onnx", aggregation={"breast": "max", "exam": "mean"})
    (tmp_path / "inbox").mkdir()
    (tmp_path / "ids.csv").write_text("filename,laterality\nP2_S2_U_CC.png,L\n")
    (tmp_path / "config.toml").write_text(
        "[paths]\ninbox = 'inbox'\nprocessed = 'processed'\nquarantine = 'quarantine'\n"
        "outbox = 'outbox'\ncreate_missing = true\n"
        "[database]\nurl = 'sqlite:///screen.db'\n[model]\npath = 'm.onnx'\n"
        "[worker]\nsettle_seconds = 0.2\nstudy_settle_seconds = 600\n"
        f"[identity]\nfilename_pattern = '{PATTERN}'\nsidecar_csv = 'ids.csv'\n"
    )
    inbox = tmp_path / "inbox"
    for name, bright in [
        ("P1_S1_L_CC.png", 0.2),
        ("P1_S1_L_MLO.png", 0.6),
        ("P1_S1_R_CC.png", 0.3),
        ("P1_S1_R_MLO.png", 0.35),
        ("P2_S2_U_CC.png", 0.5),  # U: the pattern says nothing; the sidecar says L
        ("P2_S2_U_MLO.png", 0.1),  # unknown side: in the exam, in no breast
    ]:
        write_mammo_like(inbox / name, bright=bright, seed=int(bright * 100))

    out = _screen(tmp_path, "process")
    assert out.returncode == 0, out.stderr
    assert "2 waiting for their study to settle" in out.stdout
    for level in ("exam", "breast"):  # no rows yet: the listing says why, and when
        listed = _screen(tmp_path, "results", "--level", level)
        assert listed.returncode == 0 and listed.stdout.strip().count("\n") == 0, listed.stdout
        waiting = re.search(r"^2 exam\(s\) not listed: waiting for their study to settle "
                            r"\(\[worker\] study_settle_seconds = 600\); the next is scored "
                            r"in (\d+) s \(\S+Z\)", listed.stderr, re.MULTILINE)
        assert waiting and 500 < int(waiting.group(1)) <= 600, listed.stderr
    assert not (tmp_path / "outbox").exists() or not list((tmp_path / "outbox").iterdir())
    out = _screen(tmp_path, "process", "--settle-now")
    assert out.returncode == 0, out.stderr
    assert "scored 2 exam(s)" in out.stdout

    exam_csv = _screen(tmp_path, "results", "--level", "exam", "--format", "csv")
    breast_csv = _screen(tmp_path, "results", "--level", "breast", "--format", "csv")
    image_csv = _screen(tmp_path, "results", "--level", "image")
    assert exam_csv.returncode == breast_csv.returncode == image_csv.returncode == 0
    assert "not listed" not in exam_csv.stderr + breast_csv.stderr  # none waits now
    assert exam_csv.stdout.splitlines()[0] == "patient_id,study_uid,n_images,score,label"
    assert breast_csv.stdout.splitlines()[0] == (
        "patient_id,study_uid,laterality,n_images,score,label"
    )
    assert tuple(exam_csv.stdout.splitlines()[0].split(",")) == EXAM_COLUMNS
    assert tuple(breast_csv.stdout.splitlines()[0].split(",")) == BREAST_COLUMNS
    exams = list(csv.DictReader(io.StringIO(exam_csv.stdout)))
    breasts = list(csv.DictReader(io.StringIO(breast_csv.stdout)))
    images = {r["filename"]: r for r in csv.DictReader(io.StringIO(image_csv.stdout))}
    assert [(e["patient_id"], e["study_uid"], e["n_images"]) for e in exams] == [
        ("P1", "S1", "4"),
        ("P2", "S2", "2"),
    ]
    assert [(b["study_uid"], b["laterality"], b["n_images"]) for b in breasts] == [
        ("S1", "L", "2"),
        ("S1", "R", "2"),
        ("S2", "L", "1"),
    ]
    score = {n: float(r["score"]) for n, r in images.items()}
    s1_left = max(score["P1_S1_L_CC.png"], score["P1_S1_L_MLO.png"])  # breast: max
    s1_right = max(score["P1_S1_R_CC.png"], score["P1_S1_R_MLO.png"])
    assert float(exams[0]["score"]) == pytest.approx((s1_left + s1_right) / 2)  # exam: mean
    s2 = (score["P2_S2_U_CC.png"] + score["P2_S2_U_MLO.png"]) / 2
    assert float(exams[1]["score"]) == pytest.approx(s2)
    assert images["P2_S2_U_CC.png"]["laterality"] == "L"
    assert images["P2_S2_U_MLO.png"]["laterality"] == ""
    for e in exams:
        assert e["label"] == ("malignant" if float(e["score"]) >= 0.5 else "benign")

    status = json.loads(_screen(tmp_path, "status", "--format", "json").stdout)
    assert status["exams"] == {"scored": 2}
    docs = sorted((tmp_path / "outbox").iterdir())
    assert [d.name for d in docs] == ["S1.001.json", "S2.001.json"]
    for d in docs:
        doc = json.loads(d.read_text())
        _check_document(doc)
        assert doc["model"]["aggregation"] == {"breast": "max", "exam": "mean"}
        assert doc["model"]["version"] == "test-mean-1"
    js = json.loads(_screen(tmp_path, "results", "--level", "exam", "--format", "json").stdout)
    assert [r["outbox"] for r in js] == ["S1.001.json", "S2.001.json"]
    bad = _screen(tmp_path, "results", "--history")
    assert bad.returncode != 0 and "Traceback" not in bad.stderr


def _wait_for_document(outbox: Path, n_images: int, timeout: float = 30.0) -> dict | None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for path in sorted(outbox.glob("*.json")) if outbox.is_dir() else []:
            doc = json.loads(path.read_text())  # complete, or not there: written atomically
            if doc["n_images"] == n_images:
                return doc
        time.sleep(0.1)
    return None


def test_screen_watch_scores_settled_exams_and_rescores_after_a_late_image(
    workdir: Path,
) -> None:
    _set(workdir, filename_pattern=PATTERN, study_settle_seconds=1.0)
    config = load_config(workdir / "config.toml")
    _drop(config, "P1_S1_L_CC.png", 0.3)
    _drop(config, "P1_S1_R_CC.png", 0.4)
    worker = open_worker(config)
    with watching(worker) as thread:
        first = _wait_for_document(config.outbox, 2)
        assert first is not None, "exam not scored by the watch loop"
        _drop(config, "P1_S1_L_MLO.png", 0.5)
        second = _wait_for_document(config.outbox, 3)
    assert not thread.is_alive()
    assert second is not None and second["seq"] == first["seq"] + 1
    assert second["supersedes"] == f"S1.{first['seq']:03d}.json"
    assert (config.outbox / second["supersedes"]).exists()  # the earlier document stays
