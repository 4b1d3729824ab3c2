"""Recurring sweeps over the REST API: ``hpo schedule create|list|show|update|pause|resume|delete|
run|report``. (``hpo scheduler``, the process that fires them, is in hpo_service/cli/server.py.)"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
import yaml
from rich.table import Table

from hpo_service.cli._common import (
    DEFAULT_SERVER,
    JsonOpt,
    ServerOpt,
    TokenOpt,
    _api_error,
    _client,
    _fail,
    _print_json,
    console,
    load_yaml_model,
)
from hpo_service.client import ClientError
from hpo_service.schemas import (
    FiringInfo,
    NightReport,
    ScheduleInfo,
    ScheduleReport,
    ScheduleSpec,
)

schedule_app = typer.Typer(
    rich_markup_mode=None,
    no_args_is_help=True,
    help="Recurring sweeps: a cron in a time zone and a study template.",
)


def load_schedule_spec(path: Path) -> ScheduleSpec:
    """A schedule spec from YAML or JSON; raises ``typer.Exit(2)`` naming the bad field."""
    return load_yaml_model(path, ScheduleSpec, "schedule")


def _schedule_line(info: ScheduleInfo) -> str:
    state = "enabled" if info.enabled else "paused"
    upcoming = f", next {info.next_fire_local} {info.timezone}" if info.next_fire_local else ""
    return f"{info.name}: '{info.cron}' in {info.timezone}, {state}{upcoming}"


def _firing_line(firing: FiringInfo) -> str:
    study = f" → {firing.study}" if firing.study else ""
    detail = f" ({firing.detail})" if firing.detail else ""
    return f"{firing.local_time} {firing.kind} {firing.status}{study}{detail}"


@schedule_app.command("create", short_help="Create a schedule from a spec file.")
def schedule_create(
    spec_file: Annotated[Path, typer.Argument(help="Schedule spec (YAML or JSON).")],
    server: ServerOpt = DEFAULT_SERVER,
    token: TokenOpt = None,
) -> None:
    """Create a schedule: name, cron, timezone, template (a study spec without a name), …"""
    spec = load_schedule_spec(spec_file)
    try:
        info = _client(server, token).create_schedule(spec)
    except ClientError as error:
        raise _api_error(error, server) from error
    console.print(f"created schedule {_schedule_line(info)}")


@schedule_app.command("list")
def schedule_list(
    server: ServerOpt = DEFAULT_SERVER, token: TokenOpt = None, as_json: JsonOpt = False
) -> None:
    """List schedules with their next fire time and last run."""
    try:
        infos = _client(server, token).list_schedules()
    except ClientError as error:
        raise _api_error(error, server) from error
    if as_json:
        _print_json([info.model_dump(mode="json") for info in infos])
        return
    table = Table(title="schedules")
    for column in ("name", "cron", "timezone", "state", "next run", "last run"):
        table.add_column(column)
    for info in infos:
        last = info.last_firing
        table.add_row(
            info.name,
            info.cron,
            info.timezone,
            "enabled" if info.enabled else "paused",
            info.next_fire_local or "-",
            f"{last.study} ({last.status})" if last and last.study else "-",
        )
    console.print(table)


@schedule_app.command("show", short_help="A schedule's settings and its recent firings.")
def schedule_show(
    name: str,
    server: ServerOpt = DEFAULT_SERVER,
    token: TokenOpt = None,
    firings: Annotated[int, typer.Option(help="Recent firings to list.")] = 10,
    as_json: JsonOpt = False,
) -> None:
    """A schedule's settings and its recent firings (created, skipped, failed)."""
    try:
        client = _client(server, token)
        info = client.get_schedule(name)
        recent = client.list_firings(name, firings)
    except ClientError as error:
        raise _api_error(error, server) from error
    if as_json:
        _print_json(
            {
                "schedule": info.model_dump(mode="json"),
                "firings": [f.model_dump(mode="json") for f in recent],
            }
        )
        return
    console.print(_schedule_line(info))
    console.print(
        f"  warm start top-{info.warm_start_top_k}, seed policy {info.seed_policy}, "
        f"catch-up grace {info.catchup_grace_s:g}s, regression threshold "
        f"{info.regression_threshold:.0%}"
    )
    console.print(f"  template: {json.dumps(info.template.model_dump(mode='json'))}")
    for firing in recent:
        console.print(f"  {_firing_line(firing)}")


@schedule_app.command("update")
def schedule_update(
    name: str,
    server: ServerOpt = DEFAULT_SERVER,
    token: TokenOpt = None,
    cron: Annotated[str | None, typer.Option(help="New cron expression.")] = None,
    timezone: Annotated[str | None, typer.Option(help="New IANA zone.")] = None,
    template: Annotated[Path | None, typer.Option(help="New template (YAML or JSON).")] = None,
    top_k: Annotated[int | None, typer.Option(help="Warm-start top-k.")] = None,
    seed_policy: Annotated[str | None, typer.Option(help="fixed | per_night.")] = None,
    grace_s: Annotated[float | None, typer.Option(help="Catch-up grace (seconds).")] = None,
    threshold: Annotated[float | None, typer.Option(help="Regression threshold.")] = None,
) -> None:
    """Change a schedule; a new cron or zone applies from now on."""
    changes: dict[str, Any] = {
        key: value
        for key, value in {
            "cron": cron,
            "timezone": timezone,
            "warm_start_top_k": top_k,
            "seed_policy": seed_policy,
            "catchup_grace_s": grace_s,
            "regression_threshold": threshold,
        }.items()
        if value is not None
    }
    if template is not None:
        try:
            changes["template"] = yaml.safe_load(template.read_text())
        except (OSError, yaml.YAMLError) as error:
            raise _fail(f"cannot read {template}: {error}", 2) from error
    if not changes:
        raise _fail("nothing to change: give at least one option", 2)
    try:
        console.print(_schedule_line(_client(server, token).update_schedule(name, changes)))
    except ClientError as error:
        raise _api_error(error, server) from error


@schedule_app.command("pause")
def schedule_pause(name: str, server: ServerOpt = DEFAULT_SERVER, token: TokenOpt = None) -> None:
    """Stop firing until resumed."""
    try:
        console.print(_schedule_line(_client(server, token).pause_schedule(name)))
    except ClientError as error:
        raise _api_error(error, server) from error


@schedule_app.command(
    "resume", short_help="Fire again from now on (missed times are not caught up)."
)
def schedule_resume(name: str, server: ServerOpt = DEFAULT_SERVER, token: TokenOpt = None) -> None:
    """Fire again from now on; fire times missed while paused are not caught up."""
    try:
        console.print(_schedule_line(_client(server, token).resume_schedule(name)))
    except ClientError as error:
        raise _api_error(error, server) from error


@schedule_app.command("delete")
def schedule_delete(name: str, server: ServerOpt = DEFAULT_SERVER, token: TokenOpt = None) -> None:
    """Delete a schedule (the studies it created remain)."""
    try:
        _client(server, token).delete_schedule(name)
    except ClientError as error:
        raise _api_error(error, server) from error
    console.print(f"deleted schedule {name}")


@schedule_app.command("run")
def schedule_run(name: str, server: ServerOpt = DEFAULT_SERVER, token: TokenOpt = None) -> None:
    """Start a run now (warm-started like a scheduled one)."""
    try:
        firing = _client(server, token).run_schedule(name)
    except ClientError as error:
        raise _api_error(error, server) from error
    console.print(
        f"started {firing.study} ({firing.warm_started} warm-start trial(s), seed {firing.seed})"
    )


def _night_label(night: NightReport) -> str:
    return night.date if night.kind != "manual" else f"{night.local_time[:16]} manual"


def _report_table(report: ScheduleReport) -> Table:
    table = Table(title=f"{report.schedule}: best {report.metric} ({report.direction}) per run")
    for column in ("run", "best", "vs best", "trials c/p/f/r", ""):
        table.add_column(column, no_wrap=True)
    for night in report.nights:
        t = night.trials
        table.add_row(
            _night_label(night),
            f"{night.best_value:.5g}" if night.best_value is not None else "-",
            f"{night.change_vs_best:+.1%}" if night.change_vs_best is not None else "-",
            f"{t.complete}/{t.pruned}/{t.fail}/{t.running}",
            "[red]REGRESSION[/red]" if night.regression else "",
        )
    return table


def _format_value(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def _night_details(night: NightReport) -> list[str]:
    """Importances and the moves of the best parameters, one line each."""
    lines = []
    if night.note:
        lines.append(night.note)
    if night.importances:
        top = sorted(night.importances.items(), key=lambda kv: -kv[1])[:4]
        lines.append("importances: " + ", ".join(f"{k} {v:.2f}" for k, v in top))
    elif night.importance_note and night.best_value is not None:
        lines.append(f"importances: {night.importance_note}")
    moves = [
        f"{d.name} {_format_value(d.previous)}→{_format_value(d.current)}"
        + (f" ({d.relative_change:+.0%})" if d.relative_change is not None else "")
        for d in night.drift
        if d.changed
    ]
    if moves:
        lines.append("best moved: " + ", ".join(moves))
    return lines


@schedule_app.command("report", short_help="The morning report: best per run, drift, regressions.")
def schedule_report(
    name: str,
    server: ServerOpt = DEFAULT_SERVER,
    token: TokenOpt = None,
    nights: Annotated[int, typer.Option(help="Runs to include (newest).")] = 30,
    png: Annotated[Path | None, typer.Option(help="Also write the plot here.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """The morning report: per run the best value, trials, best parameters and their drift,
    importances, and a flag when a run got worse than the best before it by the threshold."""
    try:
        client = _client(server, token)
        report = client.schedule_report(name, nights)
        image = client.schedule_report_png(name, nights) if png is not None else None
    except ClientError as error:
        raise _api_error(error, server) from error
    if png is not None and image is not None:
        png.write_bytes(image)
    if as_json:
        print(report.model_dump_json(indent=2))
        return
    console.print(_report_table(report))
    console.print("trials c/p/f/r: complete / pruned / failed / running")
    for night in report.nights:
        details = _night_details(night)
        if details:
            console.print(f"[bold]{_night_label(night)}[/bold] {night.study}")
            for line in details:
                console.print(f"  {line}")
    if report.note:
        console.print(f"note: {report.note}")
    if report.best_study is not None:
        console.print(f"best so far: {report.best_value:.5g} in {report.best_study}")
    if report.regressions:
        console.print(
            f"[red]regressions[/red] (> {report.regression_threshold:.0%} worse than the best "
            f"earlier run): {', '.join(report.regressions)}"
        )
    for firing in report.skipped:
        console.print(f"skipped {firing.local_time}: {firing.detail}")
    if png is not None:
        console.print(f"plot written to {png}")
