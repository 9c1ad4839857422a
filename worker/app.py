"""The Python API behind the CLI: build the worker's parts from a Config and run them."""

from __future__ import annotations

import datetime as dt
import logging
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from worker.config import Config
from worker.intake.folders import ensure_folder, ensure_folders
from worker.intake.inbox import SettleTracker, scan_inbox
from worker.intake.lock import InboxLock
from worker.intake.stop_signals import stopping_on_signals
from worker.intake.watcher import InboxWatcher
from worker.processing.pipeline import Pipeline
from worker.processing.placement import FileResult
from worker.records.connect import open_store
from worker.records.database_url import shown_url
from worker.records.heartbeat import Heartbeat
from worker.records.overview import overview
from worker.records.pacs_queue import planner, queue_summary
from worker.records.store import Store
from worker.results.exams import ExamBook, ExamScoring
from worker.scoring.model_file import ModelLoadError
from worker.scoring.scorer import Scorer

if TYPE_CHECKING:
    from worker.audit.report import Audit
    from worker.results.pacs_send import Outbound
    from worker.scoring.model_metadata import ModelMetadata

log = logging.getLogger("mammo_screen")


@dataclass
class Worker:
    config: Config
    store: Store
    scorer: Scorer
    pipeline: Pipeline
    watcher: InboxWatcher
    exams: ExamBook
    outbound: Outbound | None = None  # [send]: results to the PACS; None when not sending

    def heartbeat(self, command: str) -> Heartbeat:
        """This worker's row in `workers`, beaten from the watcher's loop."""
        beat = Heartbeat(
            self.store, self.config, str(self.scorer.path), self.scorer.version, command
        )
        self.watcher.on_tick = beat.beat
        beat.on_start = self._started
        return beat

    def _started(self, worker_id: int) -> None:
        self.pipeline.worker_id = worker_id

    def inbox_lock(self) -> AbstractContextManager[object]:
        """SQLite: one worker per inbox (its database lives on one machine, and its WAL
        cannot be shared over a network filesystem). PostgreSQL: any number of workers,
        each file claimed by one of them (worker/processing/claims.py)."""
        if self.store.is_sqlite:
            return InboxLock(self.config.inbox)
        return nullcontext()

    def close(self) -> None:
        self.pipeline.close()
        self.store.dispose()


def open_worker(config: Config, polling: bool | None = None,
                loading: Future[Scorer] | None = None,
                looked: Future[SettleTracker] | None = None) -> Worker:
    """Load the model first (the likeliest mistake), then check folders, then the database.
    ``loading``: the model already loading in a thread (:func:`worker.scoring.scorer.load_scorer`),
    waited for here, so nothing is created on disk for a model that fails. ``looked``: the
    first look at the inbox, taken at start-up (:func:`worker.intake.inbox.look_at_inbox`)."""
    scorer = loading.result() if loading is not None else Scorer.for_config(config)
    ensure_folders(config)
    store = open_store(config, create=True)
    pipeline = Pipeline(config, store, scorer)
    outbound = None
    if config.send.enabled:
        from worker.results.pacs_send import Outbound  # highdicom: only for a worker that sends

        ensure_folder("send results_dir", config.send.results_dir, config.create_missing)
        outbound = Outbound(store, config)
    exams = ExamBook(store, scorer.metadata, config.outbox, config.study_settle_seconds,
                     operating_point=scorer.operating_point,
                     on_scored=None if outbound is None
                     else planner(config.send.uid_prefix, outbound.wake.set))
    tracker = looked.result() if looked is not None else None
    watcher = InboxWatcher(config, pipeline, polling, exams, tracker)
    return Worker(config, store, scorer, pipeline, watcher, exams, outbound)


def run_watch(config: Config, polling: bool | None = None,
              loading: Future[Scorer] | None = None,
              looked: Future[SettleTracker] | None = None) -> None:
    worker = open_worker(config, polling, loading, looked)
    try:
        with (stopping_on_signals(worker.watcher.stop), worker.inbox_lock(),
              worker.heartbeat("watch").running(), sending(worker)):
            worker.watcher.watch()
    finally:
        worker.close()


@contextmanager
def sending(worker: Worker) -> Iterator[None]:
    """The sender's thread while the block runs (`screen watch`): a slow or absent PACS never
    holds up scoring. Stopped and joined after the block."""
    if worker.outbound is None:
        yield
        return
    stop = threading.Event()
    thread = threading.Thread(target=worker.outbound.run, args=(stop,), name="sender")
    thread.start()
    try:
        yield
    finally:
        stop.set()
        worker.outbound.wake.set()
        thread.join(4 * worker.config.send.timeout_seconds + 10)


@dataclass(frozen=True)
class ProcessSummary:
    files: list[FileResult]
    exams_scored: list[ExamScoring]
    exams_waiting: int  # open exams whose study has not been quiet for study_settle_seconds
    results_sent: int = 0  # DICOM results the PACS accepted in this run ([send])
    results: dict[str, Any] | None = None  # the queue after it (pacs_queue.queue_summary)


def run_process(
    config: Config,
    timeout: float | None = None,
    progress: Callable[[int, int], None] | None = None,
    settle_now: bool = False,
    loading: Future[Scorer] | None = None,
    looked: Future[SettleTracker] | None = None,
) -> ProcessSummary:
    """Handle the inbox now, then score settled exams (every open one with `settle_now`)."""
    worker = open_worker(config, loading=loading, looked=looked)
    try:
        with (stopping_on_signals(worker.watcher.stop), worker.inbox_lock(),
              worker.heartbeat("process").running()):
            files = worker.watcher.run_once(
                timeout=timeout, progress=progress, settle_now=settle_now
            )
            sent, queue = 0, None
            if worker.outbound is not None:  # leave the queue drained, or say what waits
                sent = worker.outbound.drain()
                with worker.store.read() as s:
                    queue = queue_summary(s)
            return ProcessSummary(files, worker.watcher.exams_scored, worker.exams.waiting(),
                                  sent, queue)
    finally:
        worker.close()


def status(config: Config) -> dict[str, Any]:
    """Backlog, last activity, counts, the running workers and the model each serves, and the
    configured model. That model is loaded (not run) so that a broken or mismatched model file
    shows up here, not only at the next start."""
    from worker.scoring.site_points import history, in_force

    store = open_store(config)
    try:
        seen = overview(store, config.heartbeat_stale_seconds)
        site_points = [p.to_json() for p in in_force(history(store)).values()]
    finally:
        store.dispose()
    backlog = (
        sum(1 for _ in scan_inbox(config.inbox, config.recursive))
        if config.inbox.is_dir()
        else None
    )
    model: dict[str, Any] = {"path": str(config.model_path)}
    try:
        scorer = Scorer.for_config(config)
        model.update(
            version=scorer.version,
            operating_point=scorer.operating_point,
            threshold=scorer.threshold,
            operating_points={k: asdict(v) for k, v in scorer.metadata.points.items()},
            input_size=scorer.metadata.preprocess.size,
        )
    except Exception as exc:  # status reports a broken model rather than failing
        model["error"] = str(exc)
    return {
        "inbox": str(config.inbox),
        "backlog": backlog,
        "unfinished_rows": seen.unfinished_rows,
        "last_received": seen.last_received,
        "counts": seen.counts,
        "exams": seen.exams,  # open (waiting for their study to settle) and scored
        "send": {**seen.send, "to": (f"{config.send.called_ae_title}@{config.send.host}:"
                                     f"{config.send.port}") if config.send.enabled else None},
        "model": model,  # the configured model, which a running worker may not be serving
        "site_points": site_points,  # in force, for any model version
        "workers": seen.workers,
        "stale_after_seconds": config.heartbeat_stale_seconds,
        "database": shown_url(config.database_url),
        "now": dt.datetime.now(dt.UTC).isoformat(),
    }


def audit_site(config: Config, store: Store, since: dt.datetime | None,
               until: dt.datetime | None, warn: Callable[[str], None]) -> Audit:
    """`screen report`'s audit of a period: figures at each model version's operating points
    (the configured model's own and every site point in force), breast and exam figures by
    the configured model's rule, the site points' history and the fitness verdict. What
    cannot be had (the model file, a site point of another model) is said through ``warn``
    and left out."""
    from worker.audit.fitness import Criteria, assess
    from worker.audit.report import audit
    from worker.scoring.levels import Level
    from worker.scoring.site_points import history, in_force

    recorded = history(store)
    points: dict[str, dict] = {}
    rules: dict[str, dict] = {}
    chosen = _configured_model(config, warn)
    if chosen is not None:
        meta, name, threshold = chosen
        points[meta.model_version] = dict(meta.points)
        rules[meta.model_version] = meta.aggregation
    for (point, version), p in in_force(recorded).items():
        points.setdefault(version, {})[point] = p.as_operating_point()
    result = audit(store, since, until, operating_points=points, aggregation=rules)
    result.report["site_points"] = [p.to_json() for p in recorded]
    if chosen is not None:
        criteria = Criteria.from_config(config.fitness)
        level = Level(criteria.level)
        version = chosen[0].model_version
        result.report["fitness"] = assess(result.units_of(version, level), threshold,
                                          criteria, version, name)
    return result


def _configured_model(config: Config, warn: Callable[[str], None]
                      ) -> tuple[ModelMetadata, str, float] | None:
    """The configured model's metadata, operating point and threshold; None (said) when its
    file cannot be read. A configured site point of another model falls back to the model's
    own point (said, not fatal)."""
    try:
        try:
            scorer = Scorer.for_config(config)
        except ModelLoadError as exc:
            warn(f"configured operating point not used: {exc}")
            scorer = Scorer(config.model_path, config.model_sha256)
    except ModelLoadError as exc:
        warn(f"operating points not shown, breast and exam rule the default, no "
             f"fitness verdict: {exc}")
        return None
    return scorer.metadata, scorer.operating_point, scorer.threshold
