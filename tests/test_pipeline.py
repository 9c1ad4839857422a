"""The pipeline on real files, a real ONNX Runtime session and a real SQLite database."""

from __future__ import annotations

import logging
import os
import shutil
import sqlite3
import threading
from pathlib import Path

import pytest
from sqlalchemy import select

from tests.conftest import copy_into, dev_pool_images, write_mammo_like
from worker.app import open_worker
from worker.config import Config
from worker.processing.decision import Decision
from worker.records.models import ImageRecord
from worker.records.store import ImageStatus
from worker.scoring.scorer import Scorer


def _rows(config: Config) -> list[tuple]:
    db = config.database_url.removeprefix("sqlite:///")
    with sqlite3.connect(db) as con:
        return con.execute(
            "SELECT filename, status, score, label, error, duplicate_of, moved_at IS NOT NULL "
            "FROM images ORDER BY id"
        ).fetchall()


def test_scores_quarantines_and_moves(config: Config) -> None:
    write_mammo_like(config.inbox / "good.png")
    write_mammo_like(config.inbox / "good 16bit ü.png", dtype=__import__("numpy").uint16, seed=3)
    (config.inbox / "notes.txt").write_text("not an image")
    (config.inbox / "empty.jpg").write_bytes(b"")
    worker = open_worker(config)
    results = worker.watcher.run_once(timeout=10)
    worker.close()
    assert len(results) == 4
    rows = {r[0]: r for r in _rows(config)}
    assert rows["good.png"][1] == ImageStatus.SCORED and 0 < rows["good.png"][2] < 1
    assert rows["good 16bit ü.png"][1] == ImageStatus.SCORED
    assert rows["notes.txt"][1] == ImageStatus.QUARANTINED
    assert "not a supported image" in rows["notes.txt"][4]
    assert rows["empty.jpg"][4] == "empty file"
    assert all(r[6] for r in rows.values()), "every row records its move"
    assert list(config.inbox.iterdir()) == []
    assert (config.processed / "good.png").exists()
    assert (config.quarantine / "notes.txt").exists()


def test_same_content_twice_is_a_duplicate_not_rescored(config: Config) -> None:
    src = write_mammo_like(config.inbox / "a.png")
    worker = open_worker(config)
    worker.watcher.run_once(timeout=10)
    shutil.copyfile(config.processed / "a.png", config.inbox / "a-again.png")
    shutil.copyfile(config.processed / "a.png", config.inbox / "a.png")  # same name too
    worker.watcher.run_once(timeout=10)
    worker.close()
    rows = _rows(config)
    assert [r[1] for r in rows] == [
        ImageStatus.SCORED, ImageStatus.DUPLICATE, ImageStatus.DUPLICATE]
    assert rows[1][5] == 1 and rows[1][2] == rows[0][2]
    # the second 'a.png' did not overwrite the first in processed/
    assert len(list(config.processed.iterdir())) == 3
    assert not src.exists()


def test_restart_after_commit_before_move_moves_without_rescoring(config: Config) -> None:
    """Simulate a crash between the decision's commit and the file move."""
    path = write_mammo_like(config.inbox / "a.png")
    worker = open_worker(config)
    data = path.read_bytes()
    record = worker.pipeline._receive(path, data)
    worker.pipeline._commit_decisions(
        {record.id: Decision(ImageStatus.SCORED, score=0.7, label="malignant")}
    )
    worker.close()
    assert path.exists()  # "crashed" before the move
    worker = open_worker(config)
    worker.watcher.run_once(timeout=10)
    worker.close()
    rows = _rows(config)
    assert len(rows) == 1 and rows[0][1] == ImageStatus.SCORED and rows[0][2] == 0.7 and rows[0][6]
    assert (config.processed / "a.png").exists() and not path.exists()


def test_restart_after_receipt_scores_the_same_row(config: Config) -> None:
    path = write_mammo_like(config.inbox / "a.png")
    worker = open_worker(config)
    worker.pipeline._receive(path, path.read_bytes())  # crash right after receipt
    worker.close()
    worker = open_worker(config)
    worker.watcher.run_once(timeout=10)
    with worker.store.read() as s:
        rows = list(s.scalars(select(ImageRecord)))
    worker.close()
    assert len(rows) == 1 and rows[0].status == ImageStatus.SCORED and rows[0].attempts == 2


def test_batches_agree_with_single_scoring(config: Config) -> None:
    imgs = dev_pool_images(10)
    copy_into(imgs, config.inbox)
    worker = open_worker(config)
    worker.watcher.run_once(timeout=10)
    with worker.store.read() as s:
        batched = {r.filename: r.score for r in s.scalars(select(ImageRecord))}
    from worker.imaging.preprocess import preprocess_file

    for p in imgs:
        single = worker.scorer.score_batch([preprocess_file(p, worker.pipeline.settings)])[0]
        assert batched[p.name] == pytest.approx(float(single), abs=1e-6)
    worker.close()


def test_images_per_call_splits_a_batch_into_model_calls(workdir: Path, tmp_path: Path,
                                                         caplog: pytest.LogCaptureFixture
                                                         ) -> None:
    """[model] images_per_call: a batch of 8 files is scored one image per ONNX Runtime call.
    The model here takes exactly one image per call, so a batch sent whole would fail."""
    import numpy as np

    from tests.conftest import make_mean_model
    from worker.config import load_config

    single = make_mean_model(tmp_path / "models" / "single.onnx", batch=1)
    cfg = (workdir / "config.toml").read_text().replace("mean.onnx", "single.onnx")
    (workdir / "config.toml").write_text(cfg.replace("[model]\n", "[model]\nimages_per_call = 0\n"))
    assert load_config(workdir / "config.toml").model_images_per_call == 0
    x = [np.full((32, 32, 1), v, np.float32) for v in (0.1, 0.5, 0.9)]
    with pytest.raises(Exception, match="(?i)dimension|shape"):
        Scorer(single).score_batch(x)
    split = Scorer(single, images_per_call=1).score_batch(x)
    assert split.shape == (3,) and split[0] < split[1] < split[2]
    # The start-up warm-up calls with the worker's call size; a failure there is a warning
    # (the first real batch meets it again and is handled as any scoring failure).
    with caplog.at_level(logging.WARNING, logger="mammo_screen"):
        Scorer(single, images_per_call=1).warm_up(1)
        assert not caplog.records
        Scorer(single).warm_up(4)
    assert len(caplog.records) == 1 and "warm-up failed" in caplog.records[0].getMessage()

    (workdir / "config.toml").write_text(cfg)  # the default: one image per call
    config = load_config(workdir / "config.toml")
    assert config.model_images_per_call == 1 and config.batch_size == 8
    for i in range(8):
        write_mammo_like(config.inbox / f"img{i}.png", seed=i)
    worker = open_worker(config)
    worker.watcher.run_once(timeout=10)
    with worker.store.read() as s:
        assert [r.status for r in s.scalars(select(ImageRecord))] == [ImageStatus.SCORED] * 8
    worker.close()


def test_subfolders_and_temporary_names(config: Config) -> None:
    write_mammo_like(config.inbox / "site-a" / "x.png")
    write_mammo_like(config.inbox / "copying.png.part")
    write_mammo_like(config.inbox / ".hidden.png")
    worker = open_worker(config)
    worker.watcher.run_once(timeout=10)
    worker.close()
    assert [r[0] for r in _rows(config)] == ["site-a/x.png"]
    assert (config.processed / "site-a" / "x.png").exists()
    assert (config.inbox / "copying.png.part").exists()


def test_symlink_is_not_followed(config: Config, tmp_path: Path) -> None:
    outside = write_mammo_like(tmp_path / "outside" / "secret.png")
    (config.inbox / "link.png").symlink_to(outside)
    worker = open_worker(config)
    worker.watcher.run_once(timeout=5)
    worker.close()
    assert _rows(config) == []
    assert outside.exists()


def test_status_reports_backlog_counts_and_model(workdir: Path, config: Config) -> None:
    import json

    from click.testing import CliRunner

    from worker.cli import cli

    write_mammo_like(config.inbox / "a.png")
    (config.inbox / "b.txt").write_text("x")
    run = ["--config", str(workdir / "config.toml")]
    missing = CliRunner().invoke(cli, [*run, "status"])  # status never makes a database
    assert missing.exit_code == 1 and "database not found" in missing.output
    assert not (workdir / "screen.db").exists()
    from worker.records.connect import open_store

    open_store(config, create=True).dispose()  # as a worker that has started once leaves it
    before = json.loads(CliRunner().invoke(cli, [*run, "status", "--format", "json"]).stdout)
    assert before["backlog"] == 2 and before["counts"] == {}
    assert before["model"]["version"] == "test-mean-1"
    assert CliRunner().invoke(cli, [*run, "process"]).exit_code == 0
    after = json.loads(CliRunner().invoke(cli, [*run, "status", "--format", "json"]).stdout)
    assert after["backlog"] == 0 and after["unfinished_rows"] == 0
    assert after["counts"] == {"quarantined": 1, "scored": 1}
    assert after["last_received"] is not None
    text = CliRunner().invoke(cli, [*run, "status"]).stdout
    assert "backlog 0" in text and "test-mean-1" in text


def test_file_replaced_before_its_move_is_not_moved_and_new_content_is_scored(
    config: Config,
) -> None:
    path = write_mammo_like(config.inbox / "a.png", seed=1)
    worker = open_worker(config)
    record = worker.pipeline._receive(path, path.read_bytes())
    worker.pipeline._commit_decisions({record.id: Decision(ImageStatus.SCORED, score=0.2,
                                                           label="benign")})
    write_mammo_like(path, seed=2)  # replaced under us, after reading and scoring
    worker.pipeline.reconcile()
    assert path.exists()  # the new content was not moved under the old row
    worker.watcher.run_once(timeout=10)
    with worker.store.read() as s:
        rows = list(s.scalars(select(ImageRecord).order_by(ImageRecord.id)))
        kinds = [e for (e,) in s.execute(
            __import__("sqlalchemy").text("SELECT kind FROM events WHERE image_id = 1"))]
    worker.close()
    assert [r.status for r in rows] == [ImageStatus.SCORED, ImageStatus.SCORED]
    assert rows[0].sha256 != rows[1].sha256 and rows[0].final_path is None
    assert "replaced" in kinds
    assert not path.exists() and (config.processed / "a.png").exists()


def test_file_gone_before_its_move_is_recorded_missing_without_a_final_path(
    config: Config, caplog: pytest.LogCaptureFixture
) -> None:
    """Decided, then deleted from the inbox before its move (and not at its destination):
    the move is recorded as done, with a `missing` event and no final path."""
    path = write_mammo_like(config.inbox / "a.png")
    worker = open_worker(config)
    record = worker.pipeline._receive(path, path.read_bytes())
    worker.pipeline._commit_decisions({record.id: Decision(ImageStatus.SCORED, score=0.2,
                                                           label="benign")})
    path.unlink()
    with caplog.at_level(logging.INFO, logger="mammo_screen"):
        assert worker.pipeline.reconcile() == 1
    with worker.store.read() as s:
        row = s.scalars(select(ImageRecord)).one()
        events = list(s.execute(__import__("sqlalchemy").text(
            "SELECT kind, detail FROM events WHERE image_id = 1 ORDER BY id")))
    assert worker.pipeline.reconcile() == 0  # nothing owed any more
    worker.close()
    assert row.status == ImageStatus.SCORED and row.moved_at is not None
    assert row.final_path is None and not (config.processed / "a.png").exists()
    assert tuple(events[-1]) == ("missing", "file gone before it could be moved")
    assert f"missing file=a.png id={record.id} (not moved)" in caplog.text


def test_file_deleted_while_it_waits_leaves_no_row(config: Config) -> None:
    path = write_mammo_like(config.inbox / "a.png")
    worker = open_worker(config)
    worker.watcher.rescan()
    path.unlink()
    assert worker.watcher.run_once(timeout=2) == []
    worker.close()
    assert _rows(config) == []


def test_a_file_is_read_once_unless_its_stat_changed_before_the_move(config: Config) -> None:
    """Before the move, an unchanged stat fingerprint stands for the content (no second read);
    a changed one (here only the mtime: same bytes) is hashed again, and still moved."""
    kept = write_mammo_like(config.inbox / "kept.png", seed=1)
    touched = write_mammo_like(config.inbox / "touched.png", seed=2)
    worker = open_worker(config)
    batch = worker.pipeline.begin([kept])
    worker.pipeline.finish(batch)
    assert worker.pipeline.rehashed == 0
    assert (config.processed / "kept.png").exists()

    batch = worker.pipeline.begin([touched])
    st = touched.stat()
    os.utime(touched, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))
    results = worker.pipeline.finish(batch)
    worker.close()
    assert worker.pipeline.rehashed == 1
    assert [r.status for r in results] == [ImageStatus.SCORED]
    assert (config.processed / "touched.png").exists() and not touched.exists()


def test_a_file_replaced_between_read_and_move_is_not_moved(config: Config) -> None:
    """Replaced by a rename (a new inode under the same name): caught by its stat."""
    path = write_mammo_like(config.inbox / "a.png", seed=1)
    worker = open_worker(config)
    batch = worker.pipeline.begin([path])
    replacement = config.inbox / ".a.png.new"
    write_mammo_like(replacement, seed=2)
    os.replace(replacement, path)  # a new inode under the same name
    worker.pipeline.finish(batch)
    assert worker.pipeline.rehashed == 1 and path.exists()
    worker.watcher.run_once(timeout=10)
    with worker.store.read() as s:
        rows = list(s.scalars(select(ImageRecord).order_by(ImageRecord.id)))
    worker.close()
    assert [r.status for r in rows] == [ImageStatus.SCORED, ImageStatus.SCORED]
    assert rows[0].final_path is None
    assert not path.exists() and (config.processed / "a.png").exists()


def test_overlapped_batches_commit_in_order_and_duplicates_find_their_original(
    config: Config,
) -> None:
    """Batch 2 is received and preprocessed before batch 1 is finished; its duplicate of a
    batch-1 file still copies the original's score."""
    a = write_mammo_like(config.inbox / "a.png", seed=1)
    b = write_mammo_like(config.inbox / "b.png", seed=2)
    shutil.copyfile(a, config.inbox / "a-again.png")
    worker = open_worker(config)
    first = worker.pipeline.begin([a, b])
    second = worker.pipeline.begin([config.inbox / "a-again.png"])
    worker.pipeline.finish(first)
    worker.pipeline.finish(second)
    worker.close()
    rows = {r[0]: r for r in _rows(config)}
    assert rows["a-again.png"][1] == ImageStatus.DUPLICATE
    assert rows["a-again.png"][2] == rows["a.png"][2]
    assert rows["a.png"][1] == ImageStatus.SCORED and all(r[6] for r in rows.values())


def test_onnx_runtime_scores_in_its_own_thread_before_the_caller_finishes(
    config: Config,
) -> None:
    """A begun batch is scored in the scoring thread without waiting for the caller: batch 2
    is scored while batch 1 is still unfinished, and nothing of it is committed until the
    caller finishes both, in order."""
    a = write_mammo_like(config.inbox / "a.png", seed=1)
    b = write_mammo_like(config.inbox / "b.png", seed=2)
    worker = open_worker(config)
    scored_in: list[str] = []
    score_and_attend = worker.scorer.score_and_attend

    def recording(images: list, attention: bool = True) -> object:  # the real session, its
        scored_in.append(threading.current_thread().name)  # thread noted
        return score_and_attend(images, attention)

    worker.scorer.score_and_attend = recording  # type: ignore[method-assign]
    first = worker.pipeline.begin([a])
    second = worker.pipeline.begin([b])
    assert second.scoring is not None
    decided = second.scoring.result(timeout=120)  # batch 1 not finished yet
    assert [d.status for d in decided.values()] == [ImageStatus.SCORED]
    assert [r[1] for r in _rows(config)] == [ImageStatus.RECEIVED, ImageStatus.RECEIVED]
    worker.pipeline.finish(first)
    worker.pipeline.finish(second)
    worker.close()
    assert scored_in and all(name.startswith("score") for name in scored_in)
    assert [r[1] for r in _rows(config)] == [ImageStatus.SCORED, ImageStatus.SCORED]
    assert all(r[6] for r in _rows(config))


def test_closing_with_batches_in_flight_leaves_them_received_for_the_next_run(
    config: Config,
) -> None:
    """Stopping between begin and finish (what a stop leaves when it cannot finish) loses
    nothing: the rows stay `received`, the files stay in the inbox, and the next run scores
    and moves each once."""
    paths = [write_mammo_like(config.inbox / f"{i}.png", seed=i) for i in range(3)]
    worker = open_worker(config)
    worker.pipeline.begin(paths[:2])
    worker.pipeline.begin(paths[2:])
    worker.close()
    assert [r[1] for r in _rows(config)] == [ImageStatus.RECEIVED] * 3
    assert all(p.exists() for p in paths)
    again = open_worker(config)
    again.watcher.run_once(timeout=10)
    again.close()
    rows = _rows(config)
    assert [r[1] for r in rows] == [ImageStatus.SCORED] * 3 and all(r[6] for r in rows)
    assert not any(p.exists() for p in paths)


def test_onnx_runtime_threads_sleep_between_calls(mean_model: Path) -> None:
    """Spinning threads would take the cores decoding and the database need between batches."""
    options = Scorer(mean_model).session.get_session_options()
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"


def test_streams_score_batches_side_by_side(config: Config) -> None:
    """`[model] streams = 2`: two scoring threads share the cores (each call its share of
    ONNX Runtime's threads), and every file still gets its own image's score, committed and
    moved as with one stream."""
    import dataclasses

    import numpy as np

    from worker.imaging.preprocess import preprocess_bytes

    config = dataclasses.replace(config, batch_size=2, model_streams=2)
    paths = [write_mammo_like(config.inbox / f"{k}.png", seed=k) for k in range(6)]
    data = {p.name: p.read_bytes() for p in paths}
    worker = open_worker(config)
    assert worker.pipeline.scoring._max_workers == 2
    options = worker.scorer.session.get_session_options()
    assert options.intra_op_num_threads == max(1, (os.cpu_count() or 1) // 2)
    want = {
        name: float(worker.scorer.score_batch([preprocess_bytes(
            raw, worker.pipeline.settings, worker.pipeline.dicom_policy)])[0])
        for name, raw in data.items()
    }
    worker.watcher.run_once(timeout=10)
    worker.close()
    rows = _rows(config)
    assert sorted(r[0] for r in rows) == sorted(want)
    assert all(r[1] == ImageStatus.SCORED and r[6] for r in rows)
    got = {r[0]: r[2] for r in rows}
    np.testing.assert_allclose([got[n] for n in want], list(want.values()), atol=1e-6)
    assert len(set(got.values())) > 1  # distinct images, distinct scores
