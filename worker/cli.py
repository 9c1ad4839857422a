"""`screen`: a thin click layer over worker.app and friends.

Training and export commands come from the `mammo_screen.commands` entry points (see
worker/command_group.py): the worker imports nothing from trainer/ or export/.
"""

from __future__ import annotations

import datetime as dt
import functools
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from worker.command_group import EntryPointGroup
from worker.config import (
    DEFAULT_CONFIG_NAME,
    ENV_CONFIG,
    Config,
    ConfigError,
    MissingPathError,
    load_config,
)
from worker.intake.lock import InboxBusyError
from worker.records.database_url import named_database_exists
from worker.scoring.model_file import ModelLoadError

if TYPE_CHECKING:
    from concurrent.futures import Future

    from worker.intake.inbox import SettleTracker
    from worker.scoring.scorer import Scorer

_USER_ERRORS = (
    ConfigError,
    ModelLoadError,
    InboxBusyError,
    FileNotFoundError,
    PermissionError,
    NotADirectoryError,
    IsADirectoryError,
    FileExistsError,
)


def _describe(exc: Exception) -> str:
    # "No such file or directory: out/x.csv" rather than "[Errno 2] No such file or ...: '...'".
    if isinstance(exc, OSError) and exc.errno is not None and exc.strerror:
        return f"{exc.strerror}: {exc.filename}" if exc.filename else exc.strerror
    return str(exc)


def _no_config_note(exc: Exception) -> str:
    """A path from the built-in defaults is missing because no config file was found: say so,
    and where it was looked for, rather than only naming a path under the current folder."""
    ctx = click.get_current_context(silent=True)
    looked = ctx.obj.get("no_config_in") if ctx is not None and ctx.obj else None
    if looked is None or not isinstance(exc, MissingPathError | ModelLoadError):
        return ""
    return (f"no config file found (no --config, no ${ENV_CONFIG}, no {DEFAULT_CONFIG_NAME} "
            f"in {looked}), so the built-in defaults were used: ")


def _user_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn an operator's mistake into one line and exit status 1, not a traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except _USER_ERRORS as exc:
            raise click.ClickException(_no_config_note(exc) + _describe(exc)) from None

    return wrapper


def _config(ctx: click.Context, **overrides: Any) -> Config:
    names = {
        "inbox": "paths.inbox",
        "processed": "paths.processed",
        "quarantine": "paths.quarantine",
        "database": "database.url",
        "model": "model.path",
        "batch_size": "worker.batch_size",
        "ae_title": "receive.ae_title",
        "bind": "receive.bind",
        "port": "receive.port",
    }
    mapped = {names[k]: v for k, v in overrides.items() if k in names}
    config = load_config(ctx.obj.get("config"), mapped)
    if config.source is None:
        ctx.obj["no_config_in"] = Path.cwd()
    return config


def _start_worker(
    ctx: click.Context, **overrides: Any
) -> tuple[Config, Future[Scorer], Future[SettleTracker]]:
    """A worker's config, then two threads: its first look at the inbox (whose files' settle
    wait starts now) and its model loading. The caller imports the database layer
    (`worker.app`) after this, so that all three overlap at start-up."""
    from worker.intake.inbox import look_at_inbox

    config = _config(ctx, **overrides)
    if overrides.get("database") is not None:
        named_database_exists(config)
    looked = look_at_inbox(config)  # before the scorer's imports (NumPy, OpenCV: ~0.3 s)
    from worker.scoring.scorer import load_scorer

    return config, load_scorer(config), looked


def _since(value: str | None, param_hint: str = "--since") -> dt.datetime | None:
    if value is None:
        return None
    try:
        parsed = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise click.BadParameter(
            f"not an ISO date or time: {value!r}", param_hint=param_hint
        ) from None
    if parsed.tzinfo is not None:
        parsed = parsed.astimezone(dt.UTC).replace(tzinfo=None)
    return parsed


def worker_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Options that override single config keys for the commands that run the worker."""
    for option in reversed(
        [
            click.option(
                "--inbox", type=click.Path(path_type=Path), help="Overrides [paths] inbox."
            ),
            click.option(
                "--processed", type=click.Path(path_type=Path), help="Overrides [paths] processed."
            ),
            click.option(
                "--quarantine",
                type=click.Path(path_type=Path),
                help="Overrides [paths] quarantine.",
            ),
            click.option("--database", help="Overrides [database] url, e.g. sqlite:///screen.db."),
            click.option(
                "--model", type=click.Path(path_type=Path), help="Overrides [model] path."
            ),
            click.option(
                "--batch-size", type=click.IntRange(min=1), help="Overrides [worker] batch_size."
            ),
        ]
    ):
        fn = option(fn)
    return fn


since_option = click.option("--since", help="Only images received at or after this ISO time (UTC).")


def store_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    return click.option("--database", help="Overrides [database] url.")(fn)


@click.group(cls=EntryPointGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--config",
    "config_path",
    type=click.Path(path_type=Path),
    help="Config file (default: $MAMMO_SCREEN_CONFIG, else ./config.toml, else built-in defaults).",
)
@click.option(
    "--log-level", default="INFO", type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"]),
    show_default=True, help="Least severe log lines written to stderr.",
)
@click.version_option(package_name="mammo-screen")
@click.pass_context
def cli(ctx: click.Context, config_path: Path | None, log_level: str) -> None:
    """mammo-screen: score mammograms dropped into an inbox folder and record every result.

    A research tool, not a medical device.

    \b
    Example:
      screen watch                     # run the worker on the default config
      screen results --format csv      # what was scored
      screen report                    # counts and, with outcomes, confusion figures
    """
    from worker.logs import setup_logging

    setup_logging(log_level)
    ctx.ensure_object(dict)
    ctx.obj["config"] = config_path


@cli.command()
@worker_options
@click.option("--polling/--no-polling", default=None, help="Poll the folder (network filesystems).")
@click.pass_context
@_user_errors
def watch(ctx: click.Context, polling: bool | None, **overrides: Any) -> None:
    """Watch the inbox and score every new file until SIGTERM or Ctrl-C.

    \b
    Example:
      screen watch --inbox /data/inbox
    """
    config, loading, looked = _start_worker(ctx, **overrides)
    from worker.app import run_watch

    run_watch(config, polling, loading, looked)


@cli.command()
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
@_user_errors
def process(
    ctx: click.Context, timeout: float | None, settle_now: bool, **overrides: Any
) -> None:
    """Score everything in the inbox now, then the exams whose study has settled, and exit.

    Exams whose latest image arrived less than study_settle_seconds ago stay open: the next
    `screen process` or `screen watch` scores them once settled, or --settle-now scores them now.

    \b
    Example:
      screen process --inbox ./backlog --settle-now
    """
    config, loading, looked = _start_worker(ctx, **overrides)
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
                   + _send_line(outcome.results))


def _send_line(queue: dict[str, Any]) -> str:
    """What waits in the PACS queue and why (`screen status`, `screen process`)."""
    counts = queue["counts"]
    line = f"{queue['waiting']} waiting"
    for state in ("rejected", "failed"):
        if counts.get(state):
            line += f", {counts[state]} {state}"
    if queue["oldest_failure"] is not None:
        f = queue["oldest_failure"]
        line += (f" (oldest failure: {f['error']}, {f['attempts']} attempt(s) since "
                 f"{f['since']})")
    if queue["first_refused"] is not None:
        f = queue["first_refused"]
        code = "" if f["status_code"] is None else f" status 0x{f['status_code']:04X}"
        line += f"; first {f['state']}: {f['error']}{code}"
    return line


@cli.command()
@click.option("--inbox", type=click.Path(path_type=Path), help="Overrides [paths] inbox.")
@click.option("--ae-title", help="Overrides [receive] ae_title.")
@click.option("--bind", help="Overrides [receive] bind, e.g. 0.0.0.0 for every interface.")
@click.option(
    "--port", type=click.IntRange(0, 65535), help="Overrides [receive] port (0: any free port)."
)
@click.pass_context
@_user_errors
def receive(ctx: click.Context, **overrides: Any) -> None:
    """Receive DICOM instances from a PACS or modality (C-STORE) into the inbox.

    Runs until SIGTERM or Ctrl-C; `screen watch` scores what arrives.

    \b
    Example:
      screen receive --port 11112 --ae-title MAMMO_SCREEN
      storescu -aec MAMMO_SCREEN 127.0.0.1 11112 image.dcm   # from another terminal
    """
    from worker.intake.receive import ReceiverStartError, run_receive

    try:
        run_receive(_config(ctx, **overrides))
    except ReceiverStartError as exc:
        raise click.ClickException(str(exc)) from None


@cli.command()
@store_options
@click.option(
    "--format", "fmt", type=click.Choice(["csv", "json"]), default="csv", show_default=True,
    help="CSV for spreadsheets, or JSON (more fields per row).",
)
@click.option(
    "--level",
    type=click.Choice(["image", "breast", "exam"]),
    default="image",
    show_default=True,
    help="One row per image, per breast, or per exam (study).",
)
@click.option(
    "--history",
    is_flag=True,
    help="Breast and exam levels: every scoring of each exam, not only its latest.",
)
@since_option
@click.option(
    "--output", "-o", type=click.Path(path_type=Path), help="Write to a file instead of stdout."
)
@click.pass_context
@_user_errors
def results(
    ctx: click.Context,
    database: str | None,
    fmt: str,
    level: str,
    history: bool,
    since: str | None,
    output: Path | None,
) -> None:
    """List recorded results: every image (score, label, model, status, identity), or each
    breast or exam's latest scoring.

    \b
    Example:
      screen results --format json --since 2026-01-01
      screen results --level exam --format csv   # patient_id,study_uid,n_images,score,label
    """
    from worker.records.connect import open_store
    from worker.results.listing import (
        BREAST_COLUMNS,
        EXAM_COLUMNS,
        breast_rows,
        describe_waiting,
        exam_rows,
        format_rows,
        result_rows,
        waiting_exams,
    )

    if history and level == "image":
        raise click.UsageError("--history applies to --level breast or exam")
    since_dt = _since(since)
    config = _config(ctx, database=database)
    store = open_store(config)
    try:
        if level != "image":
            waiting = describe_waiting(waiting_exams(store, config.study_settle_seconds))
            if waiting:
                click.echo(waiting, err=True)
        if level == "exam":
            text = format_rows(exam_rows(store, history, since_dt), fmt, EXAM_COLUMNS)
        elif level == "breast":
            text = format_rows(breast_rows(store, history, since_dt), fmt, BREAST_COLUMNS)
        else:
            text = format_rows(result_rows(store, since_dt), fmt)
    finally:
        store.dispose()
    if output:
        output.write_text(text)
    else:
        click.echo(text, nl=fmt == "json")


@cli.group()
def outcomes() -> None:
    """Ground truth (e.g. biopsy results) for screened images."""


def _outcomes_import_help() -> str:
    from worker.audit.outcome_labels import describe_vocabulary

    return f"""Import true labels from CSV_FILE (columns: filename or sha256, and label).

    Labels (case-insensitive): {describe_vocabulary()}. Nothing else is accepted.

    All or nothing: an invalid row (another label, or no filename or sha256) stops the
    import with its line number and records nothing, unless --skip-invalid. A row that would
    change an outcome already recorded stops it too, unless --replace; the replaced label stays
    in the history. Importing the same file again changes nothing and says so.

    \b
    Example:
      screen outcomes import biopsy.csv
    """


@outcomes.command("import", help=_outcomes_import_help())
@store_options
@click.argument("csv_file", type=click.Path(path_type=Path))
@click.option("--skip-invalid", is_flag=True, help="Skip invalid rows (listed); import the rest.")
@click.option("--replace", is_flag=True, help="Replace outcomes recorded with another label.")
@click.pass_context
@_user_errors
def outcomes_import(
    ctx: click.Context, database: str | None, csv_file: Path, skip_invalid: bool, replace: bool
) -> None:
    from worker.records.connect import open_store
    from worker.results.listing import OutcomeFileError, import_outcomes

    store = open_store(_config(ctx, database=database))
    try:
        summary = import_outcomes(store, csv_file, skip_invalid=skip_invalid, replace=replace)
    except OutcomeFileError as exc:
        raise click.ClickException(str(exc)) from None
    finally:
        store.dispose()
    if summary.updated:
        click.echo(
            f"matched {summary.matched} row(s): recorded {summary.added} new outcome(s), "
            f"replaced {summary.replaced}, {summary.unchanged} already recorded"
        )
    else:
        click.echo(
            f"matched {summary.matched} row(s): nothing changed "
            f"({summary.unchanged} outcome(s) already recorded with the same label)"
        )
    if summary.unmatched:
        click.echo(f"{len(summary.unmatched)} row(s) matched no screened image:", err=True)
        for name in summary.unmatched[:20]:
            click.echo(f"  {name}", err=True)
        if len(summary.unmatched) > 20:
            click.echo(f"  ... and {len(summary.unmatched) - 20} more", err=True)
    if summary.invalid:
        click.echo(f"skipped {len(summary.invalid)} invalid row(s):", err=True)
        for line in summary.invalid:
            click.echo(f"  {line}", err=True)


@cli.command()
@store_options
@click.option(
    "--format", "fmt", type=click.Choice(["text", "json"]), default="text", show_default=True,
    help="Text for people, JSON for programs.",
)
@since_option
@click.option(
    "--until", help="Only images received before this ISO time (UTC); with --since, a period."
)
@click.option(
    "--plot",
    type=click.Path(path_type=Path),
    help="Also draw the confusion matrix, ROC, calibration and score distributions to this PNG.",
)
@click.option(
    "--html",
    "html_out",
    type=click.Path(path_type=Path),
    help="Also write the audit as one self-contained HTML page to this file.",
)
@click.pass_context
@_user_errors
def report(
    ctx: click.Context,
    database: str | None,
    fmt: str,
    since: str | None,
    until: str | None,
    plot: Path | None,
    html_out: Path | None,
) -> None:
    """Audit what was screened: per model version, the calls against known outcomes.

    At image level, and at breast and exam level where images carry a study (and a side).
    Confusion matrix (rows truth, columns call), sensitivity, specificity, PPV, NPV, recall
    rate, accuracy and ROC AUC, each with a 95% bootstrap interval, and caveats where a figure
    rests on too few cases.

    \b
    Example:
      screen report --since 2026-01-01 --until 2026-04-01 --html audit.html
    """
    from worker.audit.report import audit, format_report
    from worker.records.connect import open_store

    since_dt, until_dt = _since(since), _since(until, "--until")
    config = _config(ctx, database=database)
    store = open_store(config)  # first: a wrong database is the one line the operator sees
    try:
        # The operating points (the model's and the site's), the breast and exam rule, and
        # the site points' history and fitness verdict added to the audit.
        points, rules, add_site_figures = report_extras(config, store)
        result = audit(store, since_dt, until_dt, operating_points=points, aggregation=rules)
        add_site_figures(result)
        if html_out:
            from worker.audit.overlays import overlays_html
            from worker.imaging.dicom import DicomPolicy

            overlays = overlays_html(store, DicomPolicy.for_config(config), since=since_dt,
                                     until=until_dt)
    finally:
        store.dispose()
    click.echo(format_report(result.report, fmt))
    if plot:
        from worker.audit.report_plots import write_png

        write_png(result, plot)
        click.echo(f"wrote {plot}", err=True)
    if html_out:
        from worker.audit.report_html import write_html

        write_html(result, html_out, overlays)
        click.echo(f"wrote {html_out}", err=True)


@cli.command()
@click.argument("image")
@click.option("--out", "out_path", type=click.Path(path_type=Path, dir_okay=False),
              required=True, help="PNG file to write.")
@click.option("--max-side", default=1024, show_default=True, type=click.IntRange(min=16),
              help="Longest side of the picture written, in pixels.")
@store_options
@click.pass_context
@_user_errors
def heatmap(ctx: click.Context, image: str, out_path: Path, max_side: int,
            database: str | None) -> None:
    """Draw where the model looked on one IMAGE as a PNG: an image id from the database (its
    stored heatmap over its file), or an image file (scored now with the configured model).

    The colour is the model's attention, not a lesion outline (see the model card).

    \b
    Example:
      screen heatmap 42 --out overlay.png
    """
    from worker.audit.overlays import OverlayError, overlay_of_file, overlay_of_image
    from worker.imaging.dicom import DicomPolicy

    config = _config(ctx, database=database)
    policy = DicomPolicy.for_config(config)
    try:
        if Path(image).is_file():
            from worker.scoring.scorer import Scorer

            overlay = overlay_of_file(Scorer.for_config(config), Path(image), policy, max_side,
                                      config.max_pixels)
        elif image.isdigit():
            from worker.records.connect import open_store

            store = open_store(config)
            try:
                overlay = overlay_of_image(store, int(image), policy, max_side,
                                           config.max_pixels)
            finally:
                store.dispose()
        else:
            raise OverlayError(f"{image} is neither an image file nor an image id")
    except OverlayError as exc:
        raise click.ClickException(str(exc)) from exc
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_bytes(overlay.png)
    score = "-" if overlay.score is None else f"{overlay.score:.4f}"
    click.echo(f"wrote {out_path}: {overlay.source} score {score} ({overlay.label or '-'}), "
               f"model {overlay.model_version}")


@cli.command()
@store_options
@click.option(
    "--format", "fmt", type=click.Choice(["text", "json"]), default="text", show_default=True,
    help="Text for people, JSON for programs.",
)
@click.pass_context
@_user_errors
def status(ctx: click.Context, database: str | None, fmt: str) -> None:
    """Show the backlog, last activity, counts, the running workers and their models.

    Every worker records a heartbeat; one whose last beat is older than [worker]
    heartbeat_stale_seconds is listed as STALE (killed, hung, or its machine is down).

    \b
    Example:
      screen status --format json
    """
    from worker.app import status as get_status

    info = get_status(_config(ctx, database=database))
    if fmt == "json":
        click.echo(json.dumps(info, indent=2))
        return
    model = info["model"]
    click.echo(f"inbox: {info['inbox']} (backlog {info['backlog']})")
    click.echo(f"database: {info['database']}")
    click.echo(f"last received: {info['last_received'] or 'never'}")
    click.echo(
        "counts: " + (", ".join(f"{k} {v}" for k, v in sorted(info["counts"].items())) or "none")
    )
    click.echo(f"unfinished rows: {info['unfinished_rows']}")
    click.echo(
        "exams: " + (", ".join(f"{k} {v}" for k, v in sorted(info["exams"].items())) or "none")
    )
    send = info["send"]
    if send["to"] is not None or send["counts"]:
        click.echo(f"results to PACS {send['to'] or '(sending off)'}: "
                   + ", ".join(f"{k} {v}" for k, v in sorted(send["counts"].items()))
                   + ("; " if send["counts"] else "") + _send_line(send))
    workers = info["workers"]
    live = sum(w["state"] == "live" for w in workers)
    click.echo(f"workers: {live} live, {len(workers) - live} stale" if workers else "workers: none")
    for w in workers:
        click.echo(
            f"  {'live ' if w['state'] == 'live' else 'STALE'} worker {w['id']} "
            f"({w['command']}, pid {w['pid']} on {w['host']}, since {w['started_at']}): "
            f"model {w['model_path']} version {w['model_version']}, "
            f"last beat {w['seconds_since_beat']:.0f}s ago"
        )
    if "error" in model:
        click.echo(f"configured model: {model['path']} NOT USABLE: {model['error']}")
    else:
        click.echo(
            f"configured model: {model['path']} version {model['version']} "
            f"operating point {model['operating_point']} (threshold {model['threshold']:.4f})"
        )
        for name, p in model["operating_points"].items():
            validation = ", ".join(
                f"{k.replace('_', ' ')} {p[k]:.1%}"
                for k in ("sensitivity", "specificity", "recall_rate") if p[k] is not None)
            click.echo(f"  {'*' if name == model['operating_point'] else ' '} {name}: "
                       f"threshold {p['threshold']:.4f}"
                       + (f"; on validation: {validation}" if validation else ""))
    for line in site_point_lines(info):
        click.echo(line)


from worker.site_commands import (  # noqa: E402 (needs the group above)
    calibrate,
    report_extras,
    site_point_lines,
)

cli.add_command(calibrate)


def main() -> None:
    cli(obj={}, prog_name=Path(sys.argv[0]).name if sys.argv else "screen")


if __name__ == "__main__":
    main()
