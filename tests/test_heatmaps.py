"""Heatmaps end to end: the worker stores one per scored image with its score (real ONNX
Runtime, real files, real SQLite), `screen heatmap` draws one, `screen report --html` shows
the top-scored ones; models without the output keep working; the table's migration."""

from __future__ import annotations

import shutil
import sqlite3
from pathlib import Path

import cv2
import numpy as np
import pytest
from sqlalchemy import create_engine, select, text

from export.attention import add_attention_to_file
from tests.attention_model import make_attention_model
from tests.conftest import write_mammo_like
from tests.test_faults import _screen
from worker.records.heatmaps import heatmap_for, heatmap_row, insert_heatmaps
from worker.records.models import HeatmapRecord, ImageRecord
from worker.records.schema import head
from worker.records.store import Store


def _attention_workdir(workdir: Path) -> Path:
    """The workdir fixture's config, its model replaced by one with the attention output."""
    model = workdir / "models" / "mean.onnx"
    make_attention_model(model, size=48, cells=6)
    add_attention_to_file(model)
    return model


def _drop(inbox: Path) -> None:
    write_mammo_like(inbox / "a.png", size=(120, 80), seed=1)
    write_mammo_like(inbox / "b.png", size=(90, 140), seed=2, bright=0.8)
    write_mammo_like(inbox / "c.png", size=(100, 100), seed=3, bright=0.4)
    shutil.copyfile(inbox / "a.png", inbox / "z-copy.png")
    (inbox / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")


def _images(workdir: Path) -> dict[str, ImageRecord]:
    store = Store(f"sqlite:///{workdir / 'screen.db'}")
    try:
        return {r.filename: r for r in store.all_images()}
    finally:
        store.dispose()


def test_the_worker_stores_a_heatmap_with_each_score_and_draws_it(workdir: Path) -> None:
    _attention_workdir(workdir)
    _drop(workdir / "inbox")
    assert _screen(workdir, "process", "--timeout", "10").returncode == 0
    images = _images(workdir)
    store = Store(f"sqlite:///{workdir / 'screen.db'}")
    try:
        with store.read() as s:
            stored = {r.image_id: r for r in s.scalars(select(HeatmapRecord))}
        scored = {n: r for n, r in images.items() if r.status == "scored"}
        assert set(scored) == {"a.png", "b.png", "c.png"}
        assert set(stored) == {r.id for r in scored.values()}  # none for the others
        for name, record in scored.items():
            heat = heatmap_for(store, record.id)
            assert heat is not None and heat.model_version == record.model_version
            # Stretched to the square (preprocessing v3), a stored cell is half a model cell
            # each way: a square grid laid over the whole picture, whatever its shape.
            assert heat.heat.shape == (12, 12), name
            # 1.0 is even attention over the model's 36 positions: the mean is about 1 where
            # the picture fills the square, and the map is not flat.
            assert heat.heat.max() > 1.0 and np.all(heat.heat >= 0)
        copy = heatmap_for(store, images["z-copy.png"].id)
        assert copy is not None and np.array_equal(
            copy.heat, heatmap_for(store, images["a.png"].id).heat)
        assert heatmap_for(store, images["broken.png"].id) is None
    finally:
        store.dispose()

    out = workdir / "o" / "overlay.png"
    proc = _screen(workdir, "heatmap", str(images["b.png"].id), "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    assert f"score {images['b.png'].score:.4f}" in proc.stdout
    drawn = cv2.imread(str(out))
    assert drawn.shape == (90, 140, 3)
    assert np.any(drawn[:, :, 0] != drawn[:, :, 2])  # in colour where the map is strong

    fresh = write_mammo_like(workdir / "elsewhere" / "d.png", size=(300, 200), seed=4)
    proc = _screen(workdir, "heatmap", str(fresh), "--out", str(out), "--max-side", "150")
    assert proc.returncode == 0, proc.stderr
    assert cv2.imread(str(out)).shape == (150, 100, 3)

    for arg, said in (("999", "no image #999"), ("nothing-here.png", "neither an image file"),
                      (str(images["broken.png"].id), "has no heatmap")):
        proc = _screen(workdir, "heatmap", arg, "--out", str(out))
        assert proc.returncode == 1 and said in proc.stderr, proc.stderr
        assert "Traceback" not in proc.stderr

    page = workdir / "audit.html"
    proc = _screen(workdir, "report", "--html", str(page))
    assert proc.returncode == 0, proc.stderr
    html = page.read_text()
    assert "Where the model looked: the 3 top-scored image(s)" in html
    assert "not an outline of a lesion" in html
    section = html[html.index("Where the model looked"):]
    # Top-scored first, one inline picture each.
    order = sorted(scored.values(), key=lambda r: -r.score)
    positions = [section.index(f"#{r.id} {r.filename}") for r in order]
    assert positions == sorted(positions)
    assert section.count('<img src="data:image/png;base64,') == 3


def test_a_model_without_the_attention_output_scores_and_stores_no_heatmap(
        workdir: Path) -> None:
    write_mammo_like(workdir / "inbox" / "a.png")
    assert _screen(workdir, "process", "--timeout", "10").returncode == 0
    (record,) = _images(workdir).values()
    assert record.status == "scored"
    with sqlite3.connect(workdir / "screen.db") as con:
        assert con.execute("SELECT COUNT(*) FROM heatmaps").fetchone() == (0,)
    proc = _screen(workdir, "heatmap", str(record.id), "--out", str(workdir / "o.png"))
    assert proc.returncode == 1 and "has no heatmap" in proc.stderr
    proc = _screen(workdir, "heatmap", str(workdir / "processed" / "a.png"), "--out",
                   str(workdir / "o.png"))
    assert proc.returncode == 1 and "has no attention output" in proc.stderr
    page = workdir / "audit.html"
    assert _screen(workdir, "report", "--html", str(page)).returncode == 0
    assert "Where the model looked" not in page.read_text()


@pytest.fixture(params=["sqlite", "postgresql"])
def empty_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'old.db'}"
    return request.getfixturevalue("pg_url")  # skips without a PostgreSQL server (not in CI)


def test_a_database_of_the_previous_release_gains_the_table(empty_url: str) -> None:
    """A database at revision 0001 (no heatmaps table) upgrades in place, on SQLite and
    PostgreSQL; the upgraded schema is what the models describe (Alembic's comparison finds
    nothing), and a map goes in and comes back out."""
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext

    from worker.records.models import Base

    url = empty_url
    engine = create_engine(url)
    with engine.begin() as conn:
        Base.metadata.create_all(conn, tables=[t for name, t in Base.metadata.tables.items()
                                               if name != "heatmaps"])
        conn.execute(text("CREATE TABLE alembic_version (version_num VARCHAR(32) NOT NULL, "
                          "CONSTRAINT alembic_version_pkc PRIMARY KEY (version_num))"))
        conn.execute(text("INSERT INTO alembic_version VALUES ('0001')"))
    engine.dispose()
    store = Store(url)
    try:
        with store.engine.connect() as conn:
            assert conn.execute(text("SELECT version_num FROM alembic_version")).scalar() == head()
            diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
        assert diff == []
        heat = np.linspace(0, 1 / 36, 12, dtype=np.float32).reshape(3, 4)
        with store.write() as s:
            image = ImageRecord(filename="x", source_path="/x", status="received")
            s.add(image)
            s.flush()
            insert_heatmaps(s, [heatmap_row(image.id, heat, 36, "v")])
        got = heatmap_for(store, image.id)
        assert got is not None and got.model_version == "v"
        assert np.allclose(got.heat, heat * 36, atol=1e-3) and got.heat.dtype == np.float32
    finally:
        store.dispose()
