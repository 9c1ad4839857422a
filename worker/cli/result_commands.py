"""What was scored and what was true: `screen results` (per image, breast or exam) and
`screen outcomes import` (biopsy results and other ground truth)."""

from __future__ import annotations

from pathlib import Path

import click

from worker.cli.group import config_for, parse_since, since_option, store_options, user_errors
from worker.scoring.levels import Level


@click.command()
@store_options
@click.option(
    "--format", "fmt", type=click.Choice(["csv", "json"]), default="csv", show_default=True,
    help="CSV for spreadsheets, or JSON (more fields per row).",
)
@click.option(
    "--level",
    type=click.Choice([lv.value for lv in Level]),
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
@user_errors
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
    from worker.results.exams import waiting_exams
    from worker.results.listing import (
        BREAST_COLUMNS,
        EXAM_COLUMNS,
        breast_rows,
        describe_waiting,
        exam_rows,
        format_rows,
        result_rows,
    )

    if history and level == "image":
        raise click.UsageError("--history applies to --level breast or exam")
    since_dt = parse_since(since)
    config = config_for(ctx)
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


@click.group()
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


def _listed(header: str, lines: list[str], most: int | None = None) -> None:
    """A header and its lines on stderr, at most `most` of them and a count of the rest."""
    click.echo(header, err=True)
    for line in lines[:most]:
        click.echo(f"  {line}", err=True)
    if most is not None and len(lines) > most:
        click.echo(f"  ... and {len(lines) - most} more", err=True)


@outcomes.command("import", help=_outcomes_import_help())
@store_options
@click.argument("csv_file", type=click.Path(path_type=Path))
@click.option("--skip-invalid", is_flag=True, help="Skip invalid rows (listed); import the rest.")
@click.option("--replace", is_flag=True, help="Replace outcomes recorded with another label.")
@click.pass_context
@user_errors
def outcomes_import(
    ctx: click.Context, database: str | None, csv_file: Path, skip_invalid: bool, replace: bool
) -> None:
    from worker.audit.outcomes import OutcomeFileError, import_outcomes
    from worker.records.connect import open_store

    store = open_store(config_for(ctx))
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
        _listed(f"{len(summary.unmatched)} row(s) matched no screened image:",
                summary.unmatched, most=20)
    if summary.invalid:
        _listed(f"skipped {len(summary.invalid)} invalid row(s):", summary.invalid)
