"""Delivering the queued DICOM results (worker/records/pacs_queue.py) to the PACS with C-STORE.

One pass (`Outbound.step`) builds the planned instances, then sends those due, over one
association. `screen watch` runs passes in a thread of its own (`Outbound.run`), woken when an
exam scoring plans results, so that a slow or absent PACS never holds up scoring;
`screen process` makes one pass over everything waiting before it exits (`Outbound.drain`) and
says what still waits. Every outcome is committed before the next instance is touched.

What the PACS answers decides what happens next (PS3.4 Annex B, C-STORE statuses):
- success (0x0000) or a warning (0xB000, 0xB006, 0xB007): sent;
- no association (refused, unreachable, rejected), an abort, a time-out, or 0xA7xx (out of
  resources): transient, retried after a backoff that doubles from
  [send] backoff_initial_seconds up to backoff_max_seconds;
- any other failure status (0xA9xx data set does not match, 0xCxxx cannot understand, 0x01xx
  refused) or a SOP class the PACS does not accept: rejected, recorded with its status code and
  not retried: sending the same bytes again would get the same answer.

A crash after the PACS accepted an instance and before that was recorded re-sends it under the
same UID; the PACS keeps one copy (Orthanc ignores or replaces an instance it has).
"""

from __future__ import annotations

import datetime as dt
import io
import json
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from sqlalchemy import or_, select, update
from sqlalchemy.orm import Session

from worker.config import Config
from worker.faults import crash_point
from worker.imaging.dicom import DicomPolicy, decode_dicom
from worker.imaging.reduction import LongSide
from worker.records.clock import utcnow
from worker.records.durable import write_atomically
from worker.records.heatmaps import heatmap_in
from worker.records.models import BreastResult, ExamResult, ImageRecord, ResultInstance
from worker.records.pacs_queue import (
    COMPREHENSIVE_3D_SR,
    SECONDARY_CAPTURE,
    DeliveryState,
    InstanceKind,
    ResultUids,
)
from worker.records.paths import current_file, path_from_db, path_to_db, safe_stem
from worker.records.store import Store
from worker.results.outbox import images_of
from worker.results.pacs_build import (
    CAPTURE_LONG_SIDE,
    CaptureInput,
    ReportInput,
    Scored,
    build_capture,
    build_report,
    predecessor,
    warm_up,
)

log = logging.getLogger("mammo_screen")

WARNING_STATUSES = {0xB000, 0xB006, 0xB007}
BATCH = 64  # instances per pass and association


def software_version() -> str:
    try:
        return metadata.version("mammo-screen")
    except metadata.PackageNotFoundError:
        return "unknown"


@dataclass(frozen=True)
class Outcome:
    state: DeliveryState  # SENT, READY (transient: retried), REJECTED, or PLANNED (rebuild)
    status_code: int | None = None
    error: str | None = None


def classify(status: int) -> Outcome:
    """A C-STORE status (see the module's docstring)."""
    if status == 0x0000 or status in WARNING_STATUSES:
        return Outcome(DeliveryState.SENT, status)
    if 0xA700 <= status <= 0xA7FF:
        return Outcome(DeliveryState.READY, status, f"PACS out of resources (0x{status:04X})")
    return Outcome(DeliveryState.REJECTED, status, f"PACS refused it (0x{status:04X})")


class Outbound:
    """Builds and sends the queued results of one database to [send]'s PACS."""

    def __init__(self, store: Store, config: Config,
                 clock: Callable[[], dt.datetime] = utcnow) -> None:
        self.store, self.settings, self.clock = store, config.send, clock
        self.max_pixels = config.max_pixels
        self.policy = DicomPolicy.for_config(config)
        self.software_version = software_version()
        self.peer = (f"{self.settings.called_ae_title}@{self.settings.host}:"
                     f"{self.settings.port}")
        # How long a worker holds a row it builds or sends before another may take it.
        self.lease = dt.timedelta(seconds=4 * self.settings.timeout_seconds + 30)
        self.wake = threading.Event()

    def _release_dead_holds(self) -> None:
        """SQLite has one worker per inbox (its lock, held by now): a hold on a row is then a
        dead worker's, not worth waiting out its lease for. PostgreSQL's wait for their lease."""
        if self.store.is_sqlite:
            self._release(None)

    # ---- the loop --------------------------------------------------------------------------

    def run(self, stop: threading.Event) -> None:
        """Passes until `stop` is set; a pass that fails is logged and retried."""
        log.info("sending results to=%s", self.peer)
        released = False
        while not stop.is_set():
            try:
                if not released:
                    self._release_dead_holds()
                    released = True
                    warm_up()  # once, and never in the way: a failure here is only logged
                self.step()
            except Exception as exc:  # the database or the disk: the next pass retries
                log.error("sending pass failed error=%s (will retry)", str(exc).splitlines()[0])
            self.wake.wait(1.0)
            self.wake.clear()

    def step(self, force: bool = False) -> int:
        """Build the planned instances, then send those due (all waiting with `force`).
        Returns how many were sent."""
        while planned := self._claim_due(DeliveryState.PLANNED, force):
            for row_id in planned:
                self._build(row_id)
        sent = 0
        while True:
            ids = self._claim_due(DeliveryState.READY, force)
            if not ids:
                return sent
            done = self._send(ids)
            sent += done
            if done < len(ids) or len(ids) < BATCH:
                return sent

    def drain(self) -> int:
        """One pass over everything waiting, due or not (`screen process`)."""
        self._release_dead_holds()
        return self.step(force=True)

    # ---- holding rows ---------------------------------------------------------------------

    def _claim_due(self, state: DeliveryState, force: bool) -> list[int]:
        now = self.clock()
        free = or_(ResultInstance.claimed_until.is_(None), ResultInstance.claimed_until < now)
        q = select(ResultInstance.id).where(ResultInstance.state == state.value, free)
        if not force:
            q = q.where(ResultInstance.next_attempt_at <= now)
        with self.store.read() as s:
            ids = list(s.scalars(q.order_by(ResultInstance.id).limit(BATCH)))
        claimed = []
        for row_id in ids:  # one conditional update each: of two workers, one gets the row
            with self.store.write() as s:
                took = s.execute(update(ResultInstance)
                                 .where(ResultInstance.id == row_id, free,
                                        ResultInstance.state == state.value)
                                 .values(claimed_until=now + self.lease))
                if took.rowcount == 1:
                    claimed.append(row_id)
        return claimed

    def _record(self, row_id: int, outcome: Outcome) -> None:
        now = self.clock()
        with self.store.write() as s:
            row = s.get(ResultInstance, row_id)
            assert row is not None
            row.claimed_until = None
            row.status_code = outcome.status_code
            if outcome.state == DeliveryState.PLANNED:
                row.state, row.path, row.next_attempt_at = outcome.state.value, None, now
                log.warning("result to build again kind=%s sop_instance_uid=%s error=%s",
                            row.kind, row.sop_instance_uid, outcome.error)
                return
            if outcome.state == DeliveryState.SENT:
                row.state, row.sent_at, row.sent_to = outcome.state.value, now, self.peer
                log.info("result sent kind=%s sop_instance_uid=%s to=%s", row.kind,
                         row.sop_instance_uid, self.peer)
                return
            row.attempts += 1
            row.last_error = outcome.error
            row.first_failed_at = row.first_failed_at or now
            if outcome.state == DeliveryState.READY:
                wait = min(self.settings.backoff_initial_seconds * 2 ** (row.attempts - 1),
                           self.settings.backoff_max_seconds)
                row.next_attempt_at = now + dt.timedelta(seconds=wait)
                log.warning("result not sent kind=%s sop_instance_uid=%s error=%s "
                            "(retry in %.1fs)", row.kind, row.sop_instance_uid, outcome.error,
                            wait)
            else:
                row.state = outcome.state.value
                log.error("result %s kind=%s sop_instance_uid=%s error=%s", outcome.state.value,
                          row.kind, row.sop_instance_uid, outcome.error)

    # ---- building --------------------------------------------------------------------------

    def _build(self, row_id: int) -> None:
        try:
            with self.store.read() as s:
                row = s.get(ResultInstance, row_id)
                assert row is not None
                dataset = (self._report(s, row) if row.kind == InstanceKind.REPORT.value
                           else self._capture(s, row))
                dest = (self.settings.results_dir / safe_stem(row.study_uid, "exam")
                        / f"{row.kind}-{row.sop_instance_uid}.dcm")
        except Exception as exc:  # the source is gone or unreadable, or it cannot be made
            self._record(row_id, Outcome(DeliveryState.FAILED,
                                         error=f"cannot build: {str(exc).splitlines()[0]}"))
            return
        buffer = io.BytesIO()
        dataset.save_as(buffer, enforce_file_format=True)
        path = write_atomically(dest, buffer.getvalue(), alternative=f"r{row_id}")
        crash_point("after_result_built")
        with self.store.write() as s:
            fresh = s.get(ResultInstance, row_id)
            assert fresh is not None
            fresh.state, fresh.path = DeliveryState.READY.value, path_to_db(path)
            fresh.built_at, fresh.claimed_until = self.clock(), None
            fresh.next_attempt_at = self.clock()

    def _report(self, s: Session, row: ResultInstance) -> Dataset:
        result = s.get(ExamResult, row.exam_result_id)
        assert result is not None
        # Only the DICOM images have a SOP Instance UID for the report to reference.
        images = [r for r in images_of(s, result) if r.sop_instance_uid is not None]
        breasts = s.scalars(select(BreastResult).where(BreastResult.exam_result_id == result.id)
                            .order_by(BreastResult.laterality))
        earlier = None
        if row.supersedes_uid is not None:
            before = s.scalars(select(ResultInstance).where(
                ResultInstance.sop_instance_uid == row.supersedes_uid)).one()
            earlier = predecessor(before.study_uid, before.series_uid, before.sop_instance_uid,
                                  before.sop_class_uid)
        uids = ResultUids(self.settings.uid_prefix, row.study_uid, result.model_version,
                          result.seq)
        return build_report(ReportInput(
            images=[(_header(r), _scored(r)) for r in images],
            breasts=[Scored(b.score, b.label, b.n_images, b.laterality) for b in breasts],
            exam=Scored(result.score, result.label, result.n_images),
            model_version=result.model_version, software_version=self.software_version,
            threshold=result.threshold, operating_point=result.threshold_rule or "default",
            scored_at=result.scored_at, series_uid=row.series_uid,
            sop_instance_uid=row.sop_instance_uid, series_number=9000 + 10 * result.seq + 1,
            supersedes=earlier), uids.uid)

    def _capture(self, s: Session, row: ResultInstance) -> Dataset:
        result = s.get(ExamResult, row.exam_result_id)
        image = s.get(ImageRecord, row.image_id)
        assert result is not None and image is not None
        source, display = capture_picture(current_file(image), self.max_pixels, self.policy)
        number = json.loads(result.image_ids).index(image.id) + 1
        # The model's attention map of the image, when one is stored (None: picture and text).
        found = heatmap_in(s, image.id)
        return build_capture(CaptureInput(
            source=source, display=display, image=_scored(image),
            model_version=result.model_version, software_version=self.software_version,
            threshold=result.threshold, scored_at=result.scored_at, series_uid=row.series_uid,
            sop_instance_uid=row.sop_instance_uid, series_number=9000 + 10 * result.seq + 2,
            instance_number=number), heatmap=None if found is None else found.heat)

    # ---- sending ---------------------------------------------------------------------------

    def _send(self, ids: list[int]) -> int:
        """Send the held rows over one association; returns how many the PACS accepted."""
        from pynetdicom import AE

        ae = AE(ae_title=self.settings.calling_ae_title)
        timeout = self.settings.timeout_seconds
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
        ae.connection_timeout = timeout
        for sop_class in (COMPREHENSIVE_3D_SR, SECONDARY_CAPTURE):
            ae.add_requested_context(sop_class, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
        where = f"{self.settings.host}:{self.settings.port}"
        try:
            assoc = ae.associate(self.settings.host, self.settings.port,
                                 ae_title=self.settings.called_ae_title)
        except OSError as exc:  # a host name that does not resolve, for one
            assoc, why = None, f"cannot reach the PACS at {where}: {exc.strerror or exc}"
        else:
            why = ("association rejected by the PACS (check [send] called_ae_title and "
                   "calling_ae_title against its list of peers)" if assoc.is_rejected
                   else f"cannot reach the PACS at {where}")
        if assoc is None or not assoc.is_established:
            for row_id in ids:
                self._record(row_id, Outcome(DeliveryState.READY, error=why))
            return 0
        sent = 0
        try:
            for i, row_id in enumerate(ids):
                if not assoc.is_established:  # aborted: the rest wait for the next pass
                    self._release(ids[i:])
                    break
                outcome = self._store_one(assoc, row_id)
                if outcome.state == DeliveryState.SENT:
                    crash_point("after_result_sent")
                    sent += 1
                self._record(row_id, outcome)
        finally:
            if assoc.is_established:
                assoc.release()
        return sent

    def _store_one(self, assoc: Any, row_id: int) -> Outcome:
        with self.store.read() as s:
            row = s.get(ResultInstance, row_id)
            assert row is not None and row.path is not None
            path = path_from_db(row.path)
        try:
            dataset = dcmread(path)
        except FileNotFoundError:  # removed from results_dir: built again, the same bytes
            return Outcome(DeliveryState.PLANNED, error=f"built file missing: {path}")
        except OSError as exc:
            return Outcome(DeliveryState.READY, error=f"cannot read {path}: {exc.strerror}")
        try:
            status = assoc.send_c_store(dataset)
        except ValueError as exc:  # no accepted presentation context for its SOP class
            return Outcome(DeliveryState.REJECTED, error=f"PACS does not accept it: {exc}")
        if "Status" not in status:
            return Outcome(DeliveryState.READY,
                           error="no answer from the PACS (time-out or association aborted)")
        return classify(int(status.Status))

    def _release(self, ids: list[int] | None) -> None:
        """Drop the hold on the rows `ids` (None: on every held row)."""
        held = (ResultInstance.claimed_until.is_not(None) if ids is None
                else ResultInstance.id.in_(ids))
        with self.store.write() as s:
            s.execute(update(ResultInstance).where(held).values(claimed_until=None))


def capture_picture(path: Path, max_pixels: int, policy: DicomPolicy
                    ) -> tuple[Dataset, np.ndarray]:
    """A scored image's header and its picture as shown, at most a capture's size: the
    stored values are brought down first, then the grey-level transforms run on the small
    array (worker.imaging.dicom, as for the model)."""
    decoded = decode_dicom(path, max_pixels, policy, LongSide(CAPTURE_LONG_SIDE[1]))
    return decoded.dataset, decoded.pixels


def _header(image: ImageRecord) -> Dataset:
    return dcmread(current_file(image), stop_before_pixels=True)


def _scored(image: ImageRecord) -> Scored:
    assert image.score is not None and image.label is not None
    return Scored(float(image.score), image.label, 1, image.laterality)
