"""`screen status`: the backlog, counts, the results waiting for the PACS, the running workers,
the configured model and the site points in force."""

from __future__ import annotations

import json
from typing import Any

import click

from worker.cli.group import config_for, store_options, user_errors


def queue_line(queue: dict[str, Any]) -> str:
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


def site_point_lines(info: dict[str, Any]) -> list[str]:
    """The site points in force, the configured model's first."""
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


def _model_lines(model: dict[str, Any]) -> list[str]:
    """The configured model, its operating points, the one in use starred."""
    if "error" in model:
        return [f"configured model: {model['path']} NOT USABLE: {model['error']}"]
    lines = [f"configured model: {model['path']} version {model['version']} "
             f"operating point {model['operating_point']} (threshold {model['threshold']:.4f})"]
    for name, p in model["operating_points"].items():
        validation = ", ".join(
            f"{k.replace('_', ' ')} {p[k]:.1%}"
            for k in ("sensitivity", "specificity", "recall_rate") if p[k] is not None)
        lines.append(f"  {'*' if name == model['operating_point'] else ' '} {name}: "
                     f"threshold {p['threshold']:.4f}"
                     + (f"; on validation: {validation}" if validation else ""))
    return lines


@click.command()
@store_options
@click.option(
    "--format", "fmt", type=click.Choice(["text", "json"]), default="text", show_default=True,
    help="Text for people, JSON for programs.",
)
@click.pass_context
@user_errors
def status(ctx: click.Context, database: str | None, fmt: str) -> None:
    """Show the backlog, last activity, counts, the running workers and their models.

    Every worker records a heartbeat; one whose last beat is older than [worker]
    heartbeat_stale_seconds is listed as STALE (killed, hung, or its machine is down).

    \b
    Example:
      screen status --format json
    """
    from worker.app import status as get_status

    info = get_status(config_for(ctx))
    if fmt == "json":
        click.echo(json.dumps(info, indent=2))
        return
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
                   + ("; " if send["counts"] else "") + queue_line(send))
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
    for line in _model_lines(info["model"]):
        click.echo(line)
    for line in site_point_lines(info):
        click.echo(line)
