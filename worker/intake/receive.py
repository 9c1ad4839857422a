"""`screen receive`: a DICOM C-STORE receiver (SCP) that puts every instance into the inbox.

A PACS or a modality sends instances over DICOM; each one is written as a DICOM file (its
file meta plus the dataset bytes exactly as received, so the sender's transfer syntax and
compression are kept) under a temporary name the watcher ignores, fsynced, and only then given
its final name, `<SOP Instance UID>.dcm`. The watcher therefore never sees half a file, and the
sender gets success (0x0000) only once the instance is safely on disk.

Status answered per instance: 0x0000 stored; 0xA700 (out of resources) when it cannot be
stored (inbox missing or not a folder, disk full, any write error): nothing was kept and the
sender should retry; 0xC000 (cannot understand) when the dataset does not parse. A resend of
an instance still in the inbox (same transfer syntax, identical dataset bytes, whoever sent it)
is acknowledged without a second copy; different content under the same UID gets its own name
(`<uid>-1.dcm`, ...), never an overwrite.
"""

from __future__ import annotations

import errno
import logging
import threading
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from enum import IntEnum
from io import BytesIO
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset
from pydicom.filereader import data_element_generator
from pydicom.uid import (
    JPEG2000,
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)
from pynetdicom import AE, evt
from pynetdicom.dsutils import encode_file_meta, split_dataset
from pynetdicom.events import Event
from pynetdicom.presentation import StoragePresentationContexts
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    BreastProjectionXRayImageStorageForPresentation,
    BreastProjectionXRayImageStorageForProcessing,
    DigitalMammographyXRayImageStorageForPresentation,
    DigitalMammographyXRayImageStorageForProcessing,
    Verification,
)
from pynetdicom.transport import ThreadedAssociationServer

from worker.config import Config
from worker.intake.folders import ensure_inbox
from worker.intake.stop_signals import stopping_on_signals
from worker.records.durable import remove_dead_temps, temp_path, write_new
from worker.records.paths import safe_stem

log = logging.getLogger("mammo_screen")

# Accepted as sent, compressed or not, so the file in the inbox is what the modality produced;
# whether the worker can decode a syntax is its business (it quarantines with the reason).
TRANSFER_SYNTAXES: tuple[str, ...] = (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    RLELossless,
    JPEGLosslessSV1,
    JPEGLossless,
    JPEG2000Lossless,
    JPEG2000,
    JPEGLSLossless,
    JPEGLSNearLossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
)

MAMMOGRAPHY_SOP_CLASSES: tuple[str, ...] = (
    DigitalMammographyXRayImageStorageForPresentation,
    DigitalMammographyXRayImageStorageForProcessing,
    BreastProjectionXRayImageStorageForPresentation,
    BreastProjectionXRayImageStorageForProcessing,
)

# pynetdicom's 120 common storage classes (Secondary Capture, CR, DX, MG, ...) plus the
# mammography ones named explicitly, so they stay accepted whatever that list becomes.
STORAGE_SOP_CLASSES: tuple[str, ...] = tuple(
    dict.fromkeys(
        [*MAMMOGRAPHY_SOP_CLASSES, *(str(cx.abstract_syntax) for cx in StoragePresentationContexts)]
    )
)

# Temporary names: a dot-file with a .part suffix, both of which the watcher ignores.
TEMP_PREFIX = ".receive-"
TEMP_SUFFIX = ".part"
_MAX_SAME_UID = 10_000


class StoreStatus(IntEnum):
    """The C-STORE statuses this receiver answers (DICOM PS3.4 B.2.3)."""

    SUCCESS = 0x0000
    OUT_OF_RESOURCES = 0xA700
    CANNOT_UNDERSTAND = 0xC000


class ReceiverStartError(RuntimeError):
    """The receiver cannot listen (address in use, no such address, no permission)."""


def uid_stem(uid: str) -> str:
    """A file-name stem from a UID: UIDs are digits and dots, but a sender's value is not to be
    trusted with a path (its padding, spaces or a NUL, is dropped first)."""
    return safe_stem(uid.strip().rstrip("\x00").strip(), "unnamed")


def dataset_problem(data: bytes, transfer_syntax: str, sop_instance_uid: str) -> str | None:
    """Why the encoded dataset cannot be understood, or None.

    pydicom reads leniently (a short value is returned short, garbage becomes odd elements),
    so the structure is checked here: every element complete, nothing left over, and the
    dataset's SOP Instance UID the one the request announced. Element values are not decoded.
    """
    ts = UID(transfer_syntax)
    if ts.is_deflated:
        try:
            data = zlib.decompress(data, -zlib.MAX_WBITS)
        except zlib.error as exc:
            return f"deflated dataset does not inflate: {exc}"
    fp = BytesIO(data)
    end = 0
    found_uid: str | None = None
    try:
        for raw in data_element_generator(fp, ts.is_implicit_VR, ts.is_little_endian):
            value = raw.value
            if raw.length != 0xFFFFFFFF and value is not None and len(value) != raw.length:
                return f"element {raw.tag} truncated: {len(value)} of {raw.length} bytes"
            if raw.tag == 0x00080018 and isinstance(value, bytes):
                found_uid = value.rstrip(b"\x00 ").decode("ascii", "replace")
            end = fp.tell()
    except Exception as exc:  # pydicom raises many kinds on bad bytes; all mean the same here
        return f"does not parse: {exc}"
    if end != len(data):
        return f"{len(data) - end} bytes after the last complete element"
    if found_uid is None:
        return "no SOP Instance UID in the dataset"
    if found_uid != sop_instance_uid.rstrip("\x00 "):
        return f"dataset SOP Instance UID {found_uid} differs from the request's"
    return None


@dataclass(frozen=True)
class Stored:
    path: Path
    resend: bool  # an identical copy was already in the inbox; nothing new was written
    status: StoreStatus = StoreStatus.SUCCESS


@dataclass(frozen=True)
class Refused:
    status: StoreStatus
    reason: str


class InboxWriter:
    """Puts bytes into the inbox under a final name atomically, never overwriting a file
    (worker/records/durable.py)."""

    def __init__(self, inbox: Path) -> None:
        self.inbox = inbox

    def put(self, stem: str, data: bytes, dataset_start: int, transfer_syntax: str) -> Stored:
        """`data`: a whole DICOM file, its dataset from `dataset_start`, in `transfer_syntax`."""
        names = (self.inbox / (f"{stem}.dcm" if n == 0 else f"{stem}-{n}.dcm")
                 for n in range(_MAX_SAME_UID))
        placed = write_new(data, temp_path(self.inbox, TEMP_PREFIX, TEMP_SUFFIX), names,
                           lambda final: _same_instance(final, data, dataset_start,
                                                        transfer_syntax))
        if placed is None:
            raise OSError(errno.EEXIST, f"{_MAX_SAME_UID} different files already named {stem}")
        final, written = placed
        return Stored(final, resend=not written)


def _same_instance(existing: Path, data: bytes, dataset_start: int, transfer_syntax: str) -> bool:
    """Same transfer syntax and dataset bytes; the file meta may differ (another sender's AE
    title in it), the instance does not."""
    try:
        meta, offset = split_dataset(existing)
    except Exception:  # not a DICOM file we can read: certainly not the same instance
        return False
    if meta.get("TransferSyntaxUID") != transfer_syntax:
        return False
    with existing.open("rb") as fh:
        fh.seek(offset)
        return fh.read() == memoryview(data)[dataset_start:]


def _status(status: StoreStatus, comment: str | None = None) -> Dataset:
    ds = Dataset()
    ds.Status = int(status)
    if comment:
        ds.ErrorComment = comment[:64]  # LO: at most 64 characters
    return ds


class Receiver:
    """The SCP: `start()` listens in background threads, `stop()` shuts it down.

    Usable as a context manager; `address` is the (host, port) actually bound, which tells a
    caller the port when the config asked for 0 (any free port).
    """

    def __init__(self, config: Config, stop_grace_seconds: float = 5.0) -> None:
        self.config = config
        self.writer = InboxWriter(config.inbox)
        self.stop_grace_seconds = stop_grace_seconds
        self.ae = AE(ae_title=config.receive_ae_title)
        # A sender calling another AE title is misconfigured: refuse it rather than guess.
        self.ae.require_called_aet = True
        self.ae.require_calling_aet = list(config.receive_allowed_calling_ae_titles)
        for uid in STORAGE_SOP_CLASSES:
            self.ae.add_supported_context(uid, list(TRANSFER_SYNTAXES))
        self.ae.add_supported_context(Verification)
        self._server: ThreadedAssociationServer | None = None
        self.counts = {status: 0 for status in StoreStatus}
        self._counts_lock = threading.Lock()

    @property
    def address(self) -> tuple[str, int]:
        if self._server is None:
            raise RuntimeError("receiver not started")
        host, port = self._server.server_address[:2]
        return str(host), int(port)

    def start(self) -> tuple[str, int]:
        ensure_inbox(self.config)
        stale = remove_dead_temps(self.config.inbox, TEMP_PREFIX, TEMP_SUFFIX)
        if stale:
            log.info("removed stale temporary files=%d", stale)
        handlers: list[Any] = [
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_C_ECHO, self._on_echo),
            (evt.EVT_REJECTED, self._on_rejected),
        ]
        bind, port = self.config.receive_bind, self.config.receive_port
        try:
            self._server = self.ae.start_server((bind, port), block=False, evt_handlers=handlers)
        except OSError as exc:
            raise ReceiverStartError(
                f"cannot listen on {bind}:{port}: {exc.strerror or exc}"
            ) from None
        host, port = self.address
        log.info(
            "receiving ae_title=%s address=%s:%d inbox=%s allowed_calling=%s",
            self.config.receive_ae_title,
            host,
            port,
            self.config.inbox,
            ",".join(self.config.receive_allowed_calling_ae_titles) or "any",
        )
        return host, port

    def stop(self) -> None:
        """Stop listening, let associations in progress finish for a while, then abort them.

        An aborted sender has not had success for its unfinished instance and sends it again;
        an instance answered with success is already on disk under its final name."""
        if self._server is None:
            return
        self._server.shutdown()
        self._server = None
        deadline = time.monotonic() + self.stop_grace_seconds
        while self.ae.active_associations and time.monotonic() < deadline:
            time.sleep(0.05)
        self.ae.shutdown()
        log.info(
            "stopped receiving stored=%d refused=%d",
            self.counts[StoreStatus.SUCCESS],
            self.counts[StoreStatus.OUT_OF_RESOURCES] + self.counts[StoreStatus.CANNOT_UNDERSTAND],
        )

    def __enter__(self) -> Receiver:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- event handlers (run in the association's thread) --------------------------------

    def _on_store(self, event: Event) -> Dataset:
        calling = _calling_ae(event)
        uid = str(event.request.AffectedSOPInstanceUID or "")
        outcome = self._store(event, uid)
        with self._counts_lock:
            self.counts[outcome.status] += 1
        if isinstance(outcome, Stored):
            log.info(
                "received calling_ae=%s sop_instance_uid=%s file=%s%s",
                calling,
                uid,
                outcome.path.name,
                " (identical resend: already in the inbox)" if outcome.resend else "",
            )
            return _status(outcome.status)
        log.error(
            "refused calling_ae=%s sop_instance_uid=%s status=0x%04X reason=%s",
            calling,
            uid,
            outcome.status,
            outcome.reason,
        )
        return _status(outcome.status, outcome.reason)

    def _store(self, event: Event, uid: str) -> Stored | Refused:
        try:
            dataset = event.encoded_dataset(include_meta=False)
            problem = dataset_problem(dataset, str(event.context.transfer_syntax), uid)
            if problem:
                return Refused(StoreStatus.CANNOT_UNDERSTAND, problem)
            # File meta from the request alone (no sender's AE title), so every resend of an
            # instance makes the same bytes and the worker knows it as a duplicate by SHA-256.
            data = b"".join(_file_parts(event.file_meta, dataset))
            dataset_start = len(data) - len(dataset)
        except Exception as exc:  # a handler must answer; an exception would abort the sender
            return Refused(StoreStatus.CANNOT_UNDERSTAND, f"{type(exc).__name__}: {exc}")
        try:
            ts = str(event.context.transfer_syntax)
            return self.writer.put(uid_stem(uid), data, dataset_start, ts)
        except OSError as exc:
            reason = exc.strerror or str(exc)
            return Refused(StoreStatus.OUT_OF_RESOURCES, f"cannot write to the inbox: {reason}")

    def _on_echo(self, event: Event) -> int:
        log.info("echo calling_ae=%s", _calling_ae(event))
        return int(StoreStatus.SUCCESS)

    def _on_rejected(self, event: Event) -> None:
        requestor = event.assoc.requestor
        called = getattr(requestor.primitive, "called_ae_title", "?")
        log.warning(
            "rejected association calling_ae=%s called_ae=%s from=%s "
            "(this receiver is %s; allowed calling AE titles: %s)",
            str(requestor.ae_title).strip(),
            str(called).strip(),
            requestor.address,
            self.config.receive_ae_title,
            ",".join(self.config.receive_allowed_calling_ae_titles) or "any",
        )


def _file_parts(meta: Any, dataset: bytes) -> Iterator[bytes]:
    yield b"\x00" * 128
    yield b"DICM"
    yield encode_file_meta(meta)
    yield dataset


def _calling_ae(event: Event) -> str:
    return str(event.assoc.requestor.ae_title).strip()


class _OneLine(logging.Filter):
    """A peer's protocol error is one log line, not a traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.exc_info, record.exc_text = None, None
        return True


def _forward_pynetdicom_problems() -> None:
    """pynetdicom reports aborted associations and protocol errors on its own logger, which is
    silent unless given a handler: give it ours, for warnings and errors only."""
    ours, theirs = logging.getLogger("mammo_screen"), logging.getLogger("pynetdicom")
    if ours.handlers:
        theirs.handlers[:] = list(ours.handlers)
        theirs.filters[:] = [_OneLine()]
        theirs.setLevel(logging.WARNING)
        theirs.propagate = False


def run_receive(config: Config) -> None:
    """Receive until SIGTERM or Ctrl-C (the CLI's `screen receive`)."""
    _forward_pynetdicom_problems()
    stop = threading.Event()
    receiver = Receiver(config)
    receiver.start()
    try:
        with stopping_on_signals(stop.set, doing="stopping the receiver"):
            while not stop.wait(0.5):
                pass
    finally:
        receiver.stop()
