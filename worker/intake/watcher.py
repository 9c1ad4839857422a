"""Run the pipeline over the inbox, once or as files arrive, each file once it has settled.

Events from watchdog are only hints: a start-up scan and a periodic rescan find whatever the
events missed (files that arrived while the worker was down, an overflowed inotify queue, a
network filesystem with no events). A file is read only after its size and mtime have held
still for `settle_seconds` across two looks (`worker.intake.inbox`).
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy.exc import OperationalError
from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer
from watchdog.observers.polling import PollingObserver

from worker.config import Config
from worker.intake.inbox import SettleTracker, is_ignored_name, scan_inbox
from worker.processing.pipeline import Batch, Pipeline
from worker.processing.placement import FileResult
from worker.results.exams import ExamBook, ExamScoring

log = logging.getLogger("mammo_screen")

# Batches begun ahead of the one being finished: each holds at most batch_size files' bytes
# and tensors, so memory stays bounded whatever the backlog. One is enough to keep ONNX
# Runtime busy while this thread commits and moves (more were no faster: bench/README.md).
LOOKAHEAD = 1


@dataclass
class _Begun:
    paths: list[Path]  # as taken from the tracker (unreadable ones are not in the batch)
    batch: Batch


class _Handler(FileSystemEventHandler):
    def __init__(self, hints: queue.Queue[Path]) -> None:
        self.hints = hints

    def on_any_event(self, event: FileSystemEvent) -> None:
        if event.event_type in ("deleted", "closed_no_write", "opened"):
            return
        target = getattr(event, "dest_path", "") or event.src_path
        if isinstance(target, bytes):
            target = os.fsdecode(target)
        self.hints.put(Path(target))


def _pair_moves_quickly() -> None:
    """watchdog's inotify observer holds every event behind an unpaired "moved from" for 0.5 s
    (to pair it with its "moved to"), and each file the worker moves out of the inbox is such
    an event: new files would wait behind it (bench/README.md, watch latency). A rename's two
    events come from the kernel together, and an unpaired one is harmless here: its "moved
    to" half is a hint like any other."""
    try:
        from watchdog.observers.inotify_move_event_grouper import InotifyMoveEventGrouper
    except ImportError:  # not Linux: other observers have no such queue
        return
    InotifyMoveEventGrouper.delay = 0.02


class InboxWatcher:
    """Runs the pipeline over the inbox: once (`run_once`) or until stopped (`watch`)."""

    def __init__(
        self,
        config: Config,
        pipeline: Pipeline,
        polling: bool | None = None,
        exams: ExamBook | None = None,
        tracker: SettleTracker | None = None,
    ) -> None:
        self.config = config
        self.pipeline = pipeline
        self.exams = exams
        self.exams_scored: list[ExamScoring] = []
        self.polling = config.polling if polling is None else polling
        # Given: the worker's first look at the inbox (`worker.intake.inbox.look_at_inbox`),
        # taken at start-up, whose files' settle wait has been running since.
        self.tracker = tracker if tracker is not None else SettleTracker(config.settle_seconds)
        self.hints: queue.Queue[Path] = queue.Queue()
        self.stop_event = threading.Event()
        self.processed = 0
        self.last_activity: float | None = None
        self._backoff = 0.0
        # Batches begun (received; preprocessing and scoring in the pipeline's threads) and
        # not yet finished, oldest first: up to `lookahead` ahead of the one being finished.
        self.lookahead = LOOKAHEAD
        self._ahead: deque[_Begun] = deque()
        self._reported_stale: set[Path] = set()
        # Called on every pass of the loop (the worker's heartbeat); must be cheap.
        self.on_tick: Callable[[], None] = lambda: None

    def _accept(self, path: Path) -> bool:
        try:
            rel = path.relative_to(self.config.inbox)
        except ValueError:
            return False
        if any(is_ignored_name(part) for part in rel.parts):
            return False
        if not self.config.recursive and len(rel.parts) > 1:
            return False
        return not path.is_symlink() and path.is_file()

    def _idle_wait(self, longest: float) -> float:
        """How long a pass with nothing to do waits before the next look: until the first
        waiting file can have settled, at most `longest` or half the settle time. A fixed
        poll would make a file wait up to one more poll after it has settled."""
        wait = min(longest, self.config.settle_seconds / 2)
        due = self.tracker.next_due()
        if due:  # None: nothing waits; 0: one has settled and was left (a retry): keep the poll
            wait = min(wait, due + 0.005)  # a little after, so that the look finds it settled
        return wait

    def rescan(self) -> int:
        return self.tracker.add_new(scan_inbox(self.config.inbox, self.config.recursive))

    def _drain_hints(self) -> None:
        # A file sends several events (created, modified, closed) and its folder a "modified"
        # for each: each path is looked at once per pass, so a burst of N files costs a scan
        # of the inbox per pass, not per event. The folder's events stay hints: a scan on
        # them finds a file whose own events are still queued behind the worker's own moves.
        paths: dict[Path, None] = {}
        while True:
            try:
                paths[self.hints.get_nowait()] = None
            except queue.Empty:
                break
        for path in paths:
            if path.is_dir() and self.config.recursive:
                for inner in scan_inbox(path, True):
                    self.tracker.observe(inner)
            elif self._accept(path):
                self.tracker.observe(path)

    def _take(self) -> _Begun | None:
        """Begin the next batch of settled files (read, received, preprocessing under way)."""
        paths = self.tracker.ready(self.config.batch_size)
        if not paths:
            return None
        for path in paths:
            self.tracker.forget(path)  # taken: the next look must not hand it out again
        return _Begun(paths, self.pipeline.begin(paths))

    def _process_ready(self, take_next: bool = True) -> list[FileResult]:
        """Finish one batch, the oldest begun. Batches after it are begun first, up to
        `lookahead` of them (unless `take_next` is false), so that ONNX Runtime scores them
        in the pipeline's scoring thread while this thread commits this one's decisions and
        moves; their decisions are committed on later passes, after this one's."""
        try:
            if not self._ahead:
                first = self._take()
                if first is None:
                    return []
                self._ahead.append(first)
            current = self._ahead.popleft()
            while take_next and len(self._ahead) < self.lookahead:
                begun = self._take()
                if begun is None:
                    break
                self._ahead.append(begun)
            results = self.pipeline.finish(current.batch)
        except (OperationalError, OSError) as exc:
            # Database busy past its timeout, disk full, ...: nothing is lost (rows and files
            # stay as they were), so back off and let the next scan pick the files up again.
            self._backoff = min(max(self._backoff * 2, 0.5), 30.0)
            log.error(
                "batch failed error=%s (retrying in %.1fs)", str(exc).splitlines()[0], self._backoff
            )
            self._ahead.clear()  # their files, taken from the tracker, come back with the scan
            self.stop_event.wait(self._backoff)
            return []
        self._backoff = 0.0
        handled = {r.path for r in results} | set(current.batch.elsewhere)
        for path in current.paths:
            if path not in handled and os.path.lexists(path):
                self.tracker.observe(path)  # changed while read, or a read error: look again
        self.processed += len(results)
        self.last_activity = time.time()
        return results

    def _finish_ahead(self) -> list[FileResult]:
        """Finish the batches begun and not yet finished (before returning or stopping)."""
        out: list[FileResult] = []
        while self._ahead:
            out.extend(self._process_ready(take_next=False))
        return out

    def _exam_step(self, settle_now: bool = False) -> None:
        """Score the exams whose study has settled; a failure waits for the next step."""
        if self.exams is None:
            return
        try:
            self.exams_scored.extend(self.exams.step(settle_now))
        except (OperationalError, OSError) as exc:
            log.error("exam step failed error=%s (will retry)", str(exc).splitlines()[0])

    def _report_stale(self) -> None:
        """Files that have kept changing for longer than stale_write_seconds: say so, once."""
        # Forget files no longer waiting, so the set stays as small as the backlog.
        self._reported_stale.intersection_update(self.tracker.pending())
        for path in self.tracker.stale(self.config.stale_write_seconds):
            if path not in self._reported_stale:
                self._reported_stale.add(path)
                log.warning(
                    "incomplete file=%s still being written after %.0fs (waiting)",
                    path,
                    self.config.stale_write_seconds,
                )

    def run_once(
        self,
        timeout: float | None = None,
        progress: Callable[[int, int], None] | None = None,
        settle_now: bool = False,
    ) -> list[FileResult]:
        """Process everything in the inbox now, then return. Files still being written after
        `timeout` seconds (default: stale_write_seconds) are left and reported. At the end,
        exams whose study has settled are scored (with `settle_now`, every open exam);
        the others stay open for a later run."""
        self.pipeline.reconcile()
        self.rescan()
        total = len(self.tracker)
        deadline = time.monotonic() + (
            self.config.stale_write_seconds if timeout is None else timeout
        )
        results: list[FileResult] = []
        while (len(self.tracker) or self._ahead) and not self.stop_event.is_set():
            self.on_tick()
            done = self._process_ready()
            results.extend(done)
            if progress is not None and done:
                progress(len(results), total)
            if not done:
                if time.monotonic() > deadline:
                    for path in self.tracker.pending():
                        log.warning("still being written file=%s (left in inbox)", path)
                    break
                time.sleep(self._idle_wait(0.2))
        results.extend(self._finish_ahead())
        self._exam_step(settle_now)
        return results

    def watch(self, ready: threading.Event | None = None) -> None:
        """Watch until `stop_event` is set; the batch in progress is finished first.

        The first pass of the loop reconciles and scans at once, and again every
        rescan_seconds."""
        _pair_moves_quickly()
        observer = PollingObserver(timeout=1.0) if self.polling else Observer()
        observer.schedule(
            _Handler(self.hints), str(self.config.inbox), recursive=self.config.recursive
        )
        observer.start()
        log.info(
            "watching inbox=%s model=%s polling=%s",
            self.config.inbox,
            self.pipeline.scorer.version,
            self.polling,
        )
        try:
            next_scan = 0.0
            next_exam_step = 0.0
            if ready is not None:
                ready.set()
            while not self.stop_event.is_set():
                self.on_tick()
                if time.monotonic() >= next_scan:
                    self.pipeline.reconcile()  # moves owed after a full disk, for example
                    self.rescan()
                    self._report_stale()
                    next_scan = time.monotonic() + self.config.rescan_seconds
                self._drain_hints()
                done = self._process_ready()
                if time.monotonic() >= next_exam_step:
                    self._exam_step()
                    next_exam_step = time.monotonic() + 1.0
                if not done:
                    # Wait for a hint or the next settle check, whichever is first.
                    try:
                        path = self.hints.get(timeout=self._idle_wait(0.25))
                        self.hints.put(path)
                    except queue.Empty:
                        pass
            self._finish_ahead()
        finally:
            observer.stop()
            observer.join(timeout=5)
            log.info("stopped processed=%d", self.processed)

    def stop(self) -> None:
        self.stop_event.set()
