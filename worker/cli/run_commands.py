"""Running the worker: `screen process` (the inbox now, then exit), `screen watch` (until
stopped) and `screen receive` (DICOM C-STORE into the inbox)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from worker.cli.group import config_for, key_option, user_errors, worker_options
from worker.cli.status_commands import queue_line
from worker.config import Config
from worker.records.database_url import named_database_exists

if TYPE_CHECKING:
    from concurrent.futures import Future

    from worker.intake.inbox import SettleTracker
    from worker.scoring.scorer import Scorer


def _start_worker(ctx: click.Context) -> tuple[Config, Future[Scorer], Future[SettleTracker]]:
    """A worker's config, then two threads: its first look at the inbox (whose files' settle
    wait starts now) and its model loading. The caller imports the database layer
    (`worker.app`) after this, so that all three overlap at start-up."""
    from worker.intake.inbox import look_at_inbox

    config = config_for(ctx)
    if ctx.params.get("database") is not None:
        named_database_exists(config)
    looked = look_at_inbox(config)  # before the scorer's imports (NumPy, OpenCV: ~0.3 s)
    from worker.scoring.scorer import load_scorer

    return config, load_scorer(config), looked


@click.command()
@worker_options
@click.option("--polling/--no-polling", default=None, help="Poll the folder (network filesystems).")
@click.pass_context
@user_errors
def watch(ctx: click.Context, polling: bool | None, **_overrides: Any) -> None:
    """Watch the inbox and score every new file until SIGTERM or Ctrl-C.

    \b
    Example:
      screen watch --inbox /data/inbox
    """
    config, loading, looked = _start_worker(ctx)
    from worker.app import run_watch

    run_watch(config, polling, loading, looked)


@click.command()
@worker_options
@click.option(
    "--timeout",
    type=float,
    default=None,
    help="Seconds to wait for files still being written (default: [worker] stale_write_seconds).",
)
@click.option(
    "--settle-now",
    is_flag=True,
    help="Score every open exam at exit, without waiting for [worker] study_settle_seconds "
    "(for a backlog that holds whole studies).",
)
@click.pass_context
@user_errors
def process(
    ctx: click.Context, timeout: float | None, settle_now: bool, **_overrides: Any
) -> None:
    """Score everything in the inbox now, then the exams whose study has settled, and exit.

    Exams whose latest image arrived less than study_settle_seconds ago stay open: the next
    `screen process` or `screen watch` scores them once settled, or --settle-now scores them now.

    \b
    Example:
      screen process --inbox ./backlog --settle-now
    """
    config, loading, looked = _start_worker(ctx)
    from worker.app import run_process

    tty = sys.stderr.isatty()
    shown = [0]

    def progress(done: int, total: int) -> None:
        # A live counter on a terminal; in a log, a line per tenth of the backlog.
        if tty:
            click.echo(f"\rprocessed {done}/{total}", nl=False, err=True)
        elif done == total or done - shown[0] >= max(total // 10, 1):
            shown[0] = done
            click.echo(f"processed {done}/{total}", err=True)

    outcome = run_process(config, timeout, progress, settle_now, loading, looked)
    results = outcome.files
    if results and tty:
        click.echo("", err=True)
    counts: dict[str, int] = {}
    for r in results:
        counts[r.status] = counts.get(r.status, 0) + 1
    summary = ", ".join(f"{k} {v}" for k, v in sorted(counts.items())) or "nothing to do"
    click.echo(f"processed {len(results)} file(s): {summary}")
    if outcome.exams_scored or outcome.exams_waiting:
        waiting = (
            f", {outcome.exams_waiting} waiting for their study to settle (--settle-now)"
            if outcome.exams_waiting
            else ""
        )
        click.echo(f"scored {len(outcome.exams_scored)} exam(s){waiting}")
    if outcome.results is not None:
        click.echo(f"sent {outcome.results_sent} DICOM result(s) to the PACS; "
                   + queue_line(outcome.results))


@click.command()
@key_option("--inbox", key="paths.inbox", type=click.Path(path_type=Path))
@key_option("--ae-title", key="receive.ae_title")
@key_option("--bind", key="receive.bind", example=", e.g. 0.0.0.0 for every interface")
@key_option("--port", key="receive.port", example=" (0: any free port)",
            type=click.IntRange(0, 65535))
@click.pass_context
@user_errors
def receive(ctx: click.Context, **_overrides: Any) -> None:
    """Receive DICOM instances from a PACS or modality (C-STORE) into the inbox.

    Runs until SIGTERM or Ctrl-C; `screen watch` scores what arrives.

    \b
    Example:
      screen receive --port 11112 --ae-title MAMMO_SCREEN
      storescu -aec MAMMO_SCREEN 127.0.0.1 11112 image.dcm   # from another terminal
    """
    from worker.intake.receive import ReceiverStartError, run_receive

    try:
        run_receive(config_for(ctx))
    except ReceiverStartError as exc:
        raise click.ClickException(str(exc)) from None
