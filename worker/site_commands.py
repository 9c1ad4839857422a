"""`screen calibrate`: a site operating point from the site's own outcomes.

Registered on the `screen` group by worker/cli.py; a thin layer over worker.audit.calibration.
"""

from __future__ import annotations

import getpass
import json
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import click

from worker.cli import _config, _user_errors, store_options
from worker.scoring.model_file import ModelLoadError

if TYPE_CHECKING:
    from worker.audit.report import Audit
    from worker.config import Config
    from worker.records.store import Store

_TARGETS = (("sensitivity", "sensitivity"), ("specificity", "specificity"),
            ("recall_rate", "recall-rate"))


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
@click.option("--level", type=click.Choice(["image", "breast", "exam"]), default="image",
              show_default=True, help="The unit the target and the figures count.")
@click.option("--name", default="", help="The point's name (default e.g. site-sens90).")
@click.option("--by", "created_by", default=None, help="Who calibrates (default: the user).")
@click.option("--format", "fmt", type=click.Choice(["text", "json"]), default="text",
              show_default=True, help="text for people; json prints the point recorded.")
@click.pass_context
@_user_errors
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
    from worker.scoring.levels import Level
    from worker.scoring.scorer import Scorer
    from worker.scoring.site_points import Target

    given = {t: v for (t, _), v in zip(_TARGETS, (sensitivity, specificity, recall_rate),
                                       strict=True) if v is not None}
    if len(given) != 1:
        raise click.ClickException(
            "give exactly one of --sensitivity, --specificity, --recall-rate")
    (target, value), = given.items()
    config = _config(ctx, database=database)
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


def site_point_lines(info: dict[str, Any]) -> list[str]:
    """`screen status`: the site points in force, the configured model's first."""
    from worker.scoring.site_points import women

    points = info.get("site_points", [])
    if not points:
        return ["site points: none (screen calibrate)"]
    version = info["model"].get("version")
    lines = ["site points (screen calibrate; newest calibration of each name):"]
    for p in sorted(points, key=lambda p: (p["model_version"] != version, p["name"])):
        other = "" if p["model_version"] == version else " (ANOTHER MODEL: not usable with it)"
        lines.append(
            f"  {p['name']}: threshold {p['threshold']:.4f}, model {p['model_version']}{other}; "
            f"{p['target']} {p['target_value']:g} at {p['level']} level on "
            f"{women(p['women'], p['unit'])}, {p['created_at']} by {p['created_by']}; sensitivity "
            f"{p['sensitivity']:.1%}, specificity {p['specificity']:.1%}, recall rate "
            f"{p['recall_rate']:.1%}")
    return lines



def report_extras(config: Config, store: Store) -> tuple[dict, dict, Callable[[Audit], None]]:
    """For `screen report`: each model version's operating points (the configured model's
    own and every site point in force), the configured model's breast and exam rule, and a
    step that adds the site points' history and the fitness verdict to an audit."""
    from worker.audit.fitness import Criteria, assess
    from worker.scoring.levels import Level
    from worker.scoring.scorer import Scorer
    from worker.scoring.site_points import history, in_force

    recorded = history(store)
    points: dict[str, dict] = {}
    rules: dict[str, dict] = {}
    chosen = None
    try:
        try:
            scorer = Scorer.for_config(config)
        except ModelLoadError as exc:  # e.g. a site point of another model: said, not fatal
            click.echo(f"configured operating point not used: {exc}", err=True)
            scorer = Scorer(config.model_path, config.model_sha256)
        meta = scorer.metadata
        points[meta.model_version] = dict(meta.points)
        rules[meta.model_version] = meta.aggregation
        chosen = (meta.model_version, scorer.operating_point, scorer.threshold)
    except ModelLoadError as exc:
        click.echo(f"operating points not shown, breast and exam rule the default, no "
                   f"fitness verdict: {exc}", err=True)
    for (name, version), p in in_force(recorded).items():
        points.setdefault(version, {})[name] = p.as_operating_point()

    def add(audit: Audit) -> None:
        audit.report["site_points"] = [p.to_json() for p in recorded]
        if chosen is None:
            return
        version, name, threshold = chosen
        criteria = Criteria.from_config(config.fitness)
        level = Level(criteria.level)
        rows = (audit.rows.get(version, []) if level is Level.IMAGE
                else audit.units.get((version, level), []))
        audit.report["fitness"] = assess(rows, threshold, criteria, version, name)

    return points, rules, add
