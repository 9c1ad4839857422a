"""The audit against outcomes: `screen report`, `screen heatmap` (where the model looked) and
`screen calibrate` (a site operating point from the site's own outcomes); thin layers over
worker.audit.
"""

from __future__ import annotations

import getpass
import json
from pathlib import Path

import click

from worker.cli.group import config_for, parse_since, since_option, store_options, user_errors
from worker.scoring.levels import Level


@click.command()
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
@user_errors
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
    from worker.app import audit_site
    from worker.audit.report_text import format_report
    from worker.records.connect import open_store

    since_dt, until_dt = parse_since(since), parse_since(until, "--until")
    config = config_for(ctx)
    store = open_store(config)  # first: a wrong database is the one line the operator sees
    try:
        result = audit_site(config, store, since_dt, until_dt,
                            warn=lambda line: click.echo(line, err=True))
        if html_out:
            from worker.audit.overlays import overlays_html
            from worker.imaging.dicom import DicomPolicy

            overlays = overlays_html(store, DicomPolicy.for_config(config), since=since_dt,
                                     until=until_dt, max_pixels=config.max_pixels)
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


@click.command()
@click.argument("image")
@click.option("--out", "out_path", type=click.Path(path_type=Path, dir_okay=False),
              required=True, help="PNG file to write.")
@click.option("--max-side", default=1024, show_default=True, type=click.IntRange(min=16),
              help="Longest side of the picture written, in pixels.")
@store_options
@click.pass_context
@user_errors
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

    config = config_for(ctx)
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


_TARGETS = ("sensitivity", "specificity", "recall_rate")  # Target's values, in option order


def _who() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no user name for this uid (some containers)
        return "unknown"


@click.command()
@store_options
@click.option("--sensitivity", type=float, help="Target sensitivity, e.g. 0.90.")
@click.option("--specificity", type=float, help="Target specificity, e.g. 0.85.")
@click.option("--recall-rate", "recall_rate", type=float,
              help="Target share called malignant, e.g. 0.10.")
@click.option("--level", type=click.Choice([lv.value for lv in Level]), default="image",
              show_default=True, help="The unit the target and the figures count.")
@click.option("--name", default="", help="The point's name (default e.g. site-sens90).")
@click.option("--by", "created_by", default=None, help="Who calibrates (default: the user).")
@click.option("--format", "fmt", type=click.Choice(["text", "json"]), default="text",
              show_default=True, help="text for people; json prints the point recorded.")
@click.pass_context
@user_errors
def calibrate(ctx: click.Context, database: str | None, sensitivity: float | None,
              specificity: float | None, recall_rate: float | None, level: str, name: str,
              created_by: str | None, fmt: str) -> None:
    """Choose and record a site operating point for the configured model.

    The threshold meeting one target (--sensitivity, --specificity or --recall-rate) on the
    scored images with an imported outcome (screen outcomes import), at image, breast or
    exam level, with patient-bootstrap 95% intervals for the sensitivity, specificity and
    recall rate it implies. Calibrating a name again records a new point and keeps the
    old one in the history. Select it with [model] operating_point = "NAME": images scored
    from then on are called at it.

    \b
    Example:
      screen calibrate --sensitivity 0.90 --level breast
    """
    from worker.audit.calibration import CalibrationError, format_point
    from worker.audit.calibration import calibrate as choose_point
    from worker.records.connect import open_store
    from worker.scoring.scorer import Scorer
    from worker.scoring.site_points import Target

    given = {t: v for t, v in zip(_TARGETS, (sensitivity, specificity, recall_rate), strict=True)
             if v is not None}
    if len(given) != 1:
        raise click.ClickException(
            "give exactly one of --sensitivity, --specificity, --recall-rate")
    (target, value), = given.items()
    config = config_for(ctx)
    store = open_store(config)
    try:
        meta = Scorer(config.model_path, config.model_sha256).metadata
        point = choose_point(store, meta.model_version, Target(target), value, Level(level),
                             meta.aggregation, name, created_by or _who(), set(meta.points))
    except CalibrationError as exc:
        raise click.ClickException(str(exc)) from None
    finally:
        store.dispose()
    if fmt == "json":
        click.echo(json.dumps(point.to_json(), indent=2))
        return
    click.echo("\n".join(format_point(point)))
    click.echo(f'select it with [model] operating_point = "{point.name}"', err=True)
