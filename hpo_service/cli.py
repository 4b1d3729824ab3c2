"""``hpo``: run the server, submit and inspect studies, recurring sweeps, and the demo.

Every command except ``serve``, ``migrate``, ``scheduler`` and ``demo`` talks to a running server
through the REST client; those four open the database themselves.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import typer
import yaml
from pydantic import BaseModel, ValidationError
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from hpo_service.client import APIError, ClientError, HPOClient, make_http_client
from hpo_service.schemas import (
    FiringInfo,
    NightReport,
    ScheduleInfo,
    ScheduleReport,
    ScheduleSpec,
    StudyInfo,
    StudySpec,
    TrialSummary,
)
from hpo_service.wandb_sweep import SweepUntranslatable, is_wandb_sweep
from hpo_service.wandb_sweep import translate as translate_sweep

if TYPE_CHECKING:  # the server extra; the client commands work without it
    from hpo_service.config import Settings

# The help the user sees: plain words, no reST markup. `rich_markup_mode=None` gives click's own
# formatting: docstring paragraphs reflowed to the terminal (no line breaks mid-sentence) and
# flags without typer's "<bool>" metavar.
APP_HELP = (
    "hpo: run the server, submit and inspect studies, recurring sweeps, and the demo.\n\n"
    "Every command except serve, migrate, scheduler and demo talks to a running server over "
    "its REST API (--server, --token); those four open the database themselves."
)
app = typer.Typer(add_completion=False, no_args_is_help=True, help=APP_HELP, rich_markup_mode=None)
console = Console()

ServerOpt = Annotated[
    str, typer.Option("--server", envvar="HPO_SERVER_URL", help="Base URL of the server.")
]
TokenOpt = Annotated[
    str | None, typer.Option("--token", envvar="HPO_TOKEN", help="API token (admin/viewer).")
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]
DEFAULT_SERVER = "http://127.0.0.1:8000"


def _print_json(data: Any) -> None:
    """Plain JSON on stdout (not through rich: no markup, no wrapping), for scripts and jq."""
    print(json.dumps(data, indent=2))


def _client(server: str, token: str | None) -> HPOClient:
    return HPOClient(make_http_client(server, token))


def _fail(message: str, code: int = 1) -> typer.Exit:
    # soft_wrap: off a terminal rich would break the message at 80 columns, mid-phrase.
    console.print(f"[red]error:[/red] {escape(message)}", soft_wrap=True)
    return typer.Exit(code)


def _field(location: str) -> str:
    """A field as the user wrote it: the request body's ``body.`` prefix dropped."""
    return location.removeprefix("body.")


def _reason(text: str) -> str:
    return text.removeprefix("Value error, ")


def _api_error(error: ClientError, server: str | None = None) -> typer.Exit:
    """The error once: each refused field on its own line (no summary repeating them), and on a
    connection failure the URL that could not be reached."""
    if isinstance(error, APIError) and error.details:
        lines = "\n".join(
            f"  {_field(str(d.get('field')))}: {_reason(str(d.get('reason')))}"
            for d in error.details
        )
        return _fail(f"the server refused the request ({error.status} {error.code}):\n{lines}", 2)
    if isinstance(error, APIError):
        return _fail(f"{error.status} {error.code}: {_reason(error.message)}", 2)
    where = f"cannot reach the server at {server}" if server else "cannot reach the server"
    return _fail(f"{where} ({error}); is it running? (--server, HPO_SERVER_URL)", 1)


ModelT = TypeVar("ModelT", bound=BaseModel)


def load_yaml_model(path: Path, model: type[ModelT], what: str) -> ModelT:
    """A ``model`` from a YAML or JSON file; raises ``typer.Exit(2)`` naming the bad field."""
    try:
        with path.open() as stream:  # a stream, so YAML errors name the file
            data = yaml.safe_load(stream)
    except (OSError, yaml.YAMLError) as error:
        raise _fail(f"cannot read {path}: {error}", 2) from error
    try:
        return model.model_validate(data)
    except ValidationError as error:
        raise _fail(f"invalid {what} {path}:\n{_validation_lines(error, what)}", 2) from error


def _validation_lines(error: ValidationError, what: str) -> str:
    """One line per error: ``field: reason``. Whole-model checks name their field in backticks
    at the start of the message (`search_space.batch_sise`: unknown parameter): use that."""
    lines = []
    for e in error.errors():
        field, reason = ".".join(str(p) for p in e["loc"]), _reason(str(e["msg"]))
        named = re.match(r"^`([^`]+)`:? (.*)$", reason, re.DOTALL)
        if named and not field:
            field, reason = named.group(1), named.group(2)
        lines.append(f"  {field or what}: {reason}")
    return "\n".join(lines)


def load_spec(path: Path) -> StudySpec:
    """A study spec from YAML or JSON; raises ``typer.Exit(2)`` naming the bad field."""
    return load_yaml_model(path, StudySpec, "spec")


def _counts_line(info: StudyInfo) -> str:
    c = info.counts
    return (
        f"{info.name}: {info.state} — complete {c.complete}, pruned {c.pruned}, "
        f"running {c.running}, waiting {c.waiting}, failed {c.fail} "
        f"/ {info.spec.budget.n_trials} trials"
    )


def _trial_table(title: str, trials: list[TrialSummary], metric_names: list[str]) -> Table:
    table = Table(title=title)
    for column in ("#", "state", *metric_names, "worker", "params"):
        table.add_column(column)
    for trial in trials:
        values = [f"{v:.4g}" for v in trial.values] if trial.values else ["-"] * len(metric_names)
        params = ", ".join(
            f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in trial.params.items()
        )
        table.add_row(str(trial.number), trial.state, *values, trial.worker_id or "-", params)
    return table


@app.command()
def serve(
    host: Annotated[str | None, typer.Option(help="Bind address (default HPO_HOST).")] = None,
    port: Annotated[int | None, typer.Option(help="Port (default HPO_PORT).")] = None,
) -> None:
    """Run the API server (and the lease reaper) on the configured database."""
    import uvicorn
    from sqlalchemy.exc import OperationalError

    from hpo_service.app import create_app
    from hpo_service.errors import SchemaMismatch
    from hpo_service.logging_setup import configure_logging

    settings = _server_settings()
    updates: dict[str, Any] = {}
    if host is not None:
        updates["host"] = host
    if port is not None:
        updates["port"] = port
    settings = settings.model_copy(update=updates)
    configure_logging(settings.log_level, settings.log_format)
    try:
        application = create_app(settings)
    except (ValueError, SchemaMismatch) as error:
        raise _fail(str(error), 2) from error
    except OperationalError as error:
        raise _unreachable(settings, error) from error
    logging.getLogger("hpo_service").info(
        "serving %s on http://%s:%d (API docs: /v1/docs)",
        settings.database_url_redacted,
        settings.host,
        settings.port,
    )
    # log_config=None: uvicorn's loggers go through our handler (JSON or text).
    uvicorn.run(
        application,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level.lower(),
        log_config=None,
    )


def _unreachable(settings: Settings, error: Exception) -> typer.Exit:
    reason = getattr(error, "orig", None) or error
    return _fail(f"database {settings.database_url_redacted} unreachable: {reason}")


def _server_settings() -> Settings:
    """The server's settings from the environment; exits 2 naming a bad variable."""
    from hpo_service.config import get_settings

    try:
        return get_settings()
    except ValueError as error:  # pydantic's ValidationError is a ValueError
        raise _fail(f"invalid settings: {error}", 2) from error


@app.command()
def migrate(
    database_url: Annotated[
        str | None,
        typer.Option("--database-url", help="Storage URL (default HPO_DATABASE_URL)."),
    ] = None,
) -> None:
    """Upgrade the database's schemas (Optuna's and the service's) to this release.

    The server never migrates an existing database at start-up; run this once after an upgrade,
    with the servers stopped. On an up-to-date database it changes nothing.
    """
    from sqlalchemy.exc import OperationalError

    from hpo_service.errors import SchemaMismatch
    from hpo_service.logging_setup import configure_logging
    from hpo_service.migrate import migrate as run_migrations

    settings = _server_settings()
    if database_url is not None:
        settings = settings.model_copy(update={"database_url": database_url})
    configure_logging(settings.log_level, settings.log_format)
    try:
        results = run_migrations(settings)
    except SchemaMismatch as error:
        raise _fail(str(error), 2) from error
    except OperationalError as error:
        raise _unreachable(settings, error) from error
    for before, after in results:
        if before.current == after.current:
            console.print(f"{after.schema} schema: at {after.current} (up to date)")
        else:
            console.print(f"{after.schema} schema: {before.current or 'empty'} -> {after.current}")


@app.command()
def submit(
    spec_file: Annotated[
        Path, typer.Argument(help="Study spec, or a W&B sweep config (YAML or JSON).")
    ],
    server: ServerOpt = DEFAULT_SERVER,
    token: TokenOpt = None,
    wait: Annotated[bool, typer.Option(help="Follow progress until the study ends.")] = False,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Print a W&B sweep's translation; submit nothing.")
    ] = False,
) -> None:
    """Create a study from a spec file (a W&B sweep config is translated and printed first)."""
    # --- bring your own code: W&B sweeps and the worker command to run next (issue 15) ---
    program = None
    if is_wandb_sweep(_raw_yaml(spec_file)):
        spec, program = _translate_sweep(spec_file)
    else:
        spec = load_spec(spec_file)
    if dry_run:
        return
    # ---
    client = _client(server, token)
    try:
        info = client.create_study(spec)
    except ClientError as error:
        raise _api_error(error, server) from error
    console.print(f"created study [bold]{info.name}[/bold] → {info.links.get('self', '')}")
    _print_worker_commands(server, program)
    if wait:
        _follow(client, info.name)


# --- bring your own code (issue 15): W&B sweep files and the worker commands -----------------


def _raw_yaml(path: Path) -> Any:
    try:
        return yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return None  # load_spec reports it


def _translate_sweep(path: Path) -> tuple[StudySpec, list[str] | None]:
    try:
        translation = translate_sweep(_raw_yaml(path), fallback_name=path.stem)
    except SweepUntranslatable as error:
        raise _fail(str(error), 2) from error
    except ValidationError as error:
        lines = "\n".join(
            f"  {'.'.join(str(p) for p in e['loc']) or 'spec'}: {e['msg']}" for e in error.errors()
        )
        raise _fail(f"the W&B sweep {path} translates to an invalid spec:\n{lines}", 2) from error
    full = translation.spec.model_dump(mode="json", exclude_none=True)
    body = {key: full[key] for key in full if key not in ("drop", "max_retries")}
    body["drop"] = ", ".join(translation.spec.drop) + " (defaults the sweep does not list)"
    console.print(f"W&B sweep {path} → study spec:")
    text = yaml.safe_dump(body, sort_keys=False, width=1000).rstrip()
    console.print(text, markup=False, highlight=False, soft_wrap=True)
    for note in translation.notes:
        console.print(f"  note: {note}", markup=False, highlight=False, soft_wrap=True)
    return translation.spec, translation.program


def _print_worker_commands(server: str, program: list[str] | None) -> None:
    """What to run next: the built-in trainer, your code through the SDK, or any program."""
    agent = " ".join(program) if program else "./train.sh"
    lines = [
        "run workers next, one per GPU — whichever fits your code:",
        f"  built-in VAE trainer:  hpo-worker --server {server} --device cuda:0",
        f"  your Python loop:      for trial in hpo_service.sdk.trials({server!r}): ..."
        "  (examples/own_vae/train.py)",
        f"  any program:           hpo agent --server {server} -- {agent}",
    ]
    console.print("\n".join(lines), markup=False, highlight=False, soft_wrap=True)


def _follow(client: HPOClient, name: str, poll_s: float = 2.0) -> StudyInfo:
    last = ""
    while True:
        info = client.get_study(name)
        line = _counts_line(info)
        if line != last:
            console.print(line)
            last = line
        if info.state in ("completed", "failed") or (
            info.state in ("stopped", "cancelled") and info.counts.running == 0
        ):
            return info
        time.sleep(poll_s)


@app.command()
def studies(
    server: ServerOpt = DEFAULT_SERVER,
    token: TokenOpt = None,
    state: Annotated[str | None, typer.Option(help="Filter by state.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """List studies."""
    try:
        infos = _client(server, token).list_studies(state)
    except ClientError as error:
        raise _api_error(error, server) from error
    if as_json:
        _print_json([info.model_dump(mode="json") for info in infos])
        return
    table = Table(title="studies")
    for column in ("name", "state", "complete", "pruned", "running", "failed", "best"):
        table.add_column(column)
    for info in infos:
        best = info.best_trials[0].values if info.best_trials else None
        table.add_row(
            info.name,
            info.state,
            str(info.counts.complete),
            str(info.counts.pruned),
            str(info.counts.running),
            str(info.counts.fail),
            ", ".join(f"{v:.4g}" for v in best) if best else "-",
        )
    console.print(table)


@app.command()
def trials(
    name: str,
    server: ServerOpt = DEFAULT_SERVER,
    token: TokenOpt = None,
    offset: Annotated[int, typer.Option(help="Skip this many trials (by number).")] = 0,
    limit: Annotated[int, typer.Option(help="At most this many trials.")] = 50,
    as_json: JsonOpt = False,
) -> None:
    """List a study's trials."""
    try:
        client = _client(server, token)
        page = client.list_trials(name, offset, limit)
        info = client.get_study(name)
    except ClientError as error:
        raise _api_error(error, server) from error
    if as_json:
        _print_json(page.model_dump(mode="json"))
        return
    console.print(_trial_table(trials_title(name, offset, len(page.trials), page.total),
                               page.trials, info.metric_names))  # fmt: skip


def trials_title(name: str, offset: int, shown: int, total: int) -> str:
    """``trials 0–11 of 12``: the first and last index shown (inclusive), of how many."""
    if shown == 0:
        return f"{name}: no trials from {offset} on, of {total}"
    return f"{name}: trials {offset}–{offset + shown - 1} of {total}"


@app.command()
def best(
    name: str,
    server: ServerOpt = DEFAULT_SERVER,
    token: TokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """The best trial (or the Pareto front of a multi-objective study)."""
    try:
        info = _client(server, token).get_study(name)
    except ClientError as error:
        raise _api_error(error, server) from error
    if as_json:
        _print_json([t.model_dump(mode="json") for t in info.best_trials])
        return
    if not info.best_trials:
        raise _fail(f"study {name} has no completed trial yet")
    console.print(_trial_table(f"{name}: best", info.best_trials, info.metric_names))


@app.command()
def stop(name: str, server: ServerOpt = DEFAULT_SERVER, token: TokenOpt = None) -> None:
    """No new trials; running ones finish."""
    try:
        console.print(_counts_line(_client(server, token).stop_study(name)))
    except ClientError as error:
        raise _api_error(error, server) from error


@app.command()
def cancel(name: str, server: ServerOpt = DEFAULT_SERVER, token: TokenOpt = None) -> None:
    """No new trials; running ones are told to stop."""
    try:
        console.print(_counts_line(_client(server, token).cancel_study(name)))
    except ClientError as error:
        raise _api_error(error, server) from error


@app.command()
def enqueue(
    name: str,
    params_file: Annotated[
        Path | None,
        typer.Argument(help="YAML or JSON: one mapping of parameters, or a list of them."),
    ] = None,
    param: Annotated[
        list[str] | None,
        typer.Option("--param", "-p", help="NAME=VALUE (a YAML value); repeat for several."),
    ] = None,
    server: ServerOpt = DEFAULT_SERVER,
    token: TokenOpt = None,
) -> None:
    """Queue trials with given parameters: workers get them before any sampled trial."""
    if (params_file is None) == (not param):
        raise _fail("give a parameters file or --param NAME=VALUE options, not both or neither", 2)
    if params_file is not None:
        try:
            with params_file.open() as stream:
                loaded = yaml.safe_load(stream)
        except (OSError, yaml.YAMLError) as error:
            raise _fail(f"cannot read {params_file}: {error}", 2) from error
        batch = loaded if isinstance(loaded, list) else [loaded]
        if not all(isinstance(item, dict) and item for item in batch):
            raise _fail(f"{params_file}: expected a mapping of parameters or a list of them", 2)
    else:
        one: dict[str, Any] = {}
        for item in param or []:
            key, sep, value = item.partition("=")
            if not sep or not key:
                raise _fail(f"--param {item!r}: expected NAME=VALUE", 2)
            one[key.strip()] = _yaml_value(value)
        batch = [one]
    try:
        count = _client(server, token).enqueue(name, batch)
    except ClientError as error:
        raise _api_error(error, server) from error
    console.print(f"queued {count} trial(s) in {name}", soft_wrap=True)


def _yaml_value(text: str) -> Any:
    """A command-line value as YAML, with ``1e-3`` a float (YAML 1.1 keeps it a string)."""
    value = yaml.safe_load(text)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


@app.command()
def delete(
    name: str,
    yes: Annotated[bool, typer.Option("--yes", help="Do not ask for confirmation.")] = False,
    server: ServerOpt = DEFAULT_SERVER,
    token: TokenOpt = None,
) -> None:
    """Delete a study and all its trials (from the Optuna storage too)."""
    if not yes and not typer.confirm(f"delete study {name} and all its trials?"):
        raise _fail("not deleted", 1)
    try:
        _client(server, token).delete_study(name)
    except ClientError as error:
        raise _api_error(error, server) from error
    console.print(f"deleted study {name}", soft_wrap=True)


@app.command()
def demo(
    # 12 trials of 4 epochs on 2 workers: under three minutes on two busy CPU cores.
    trials_: Annotated[int, typer.Option("--trials", help="Trials in the demo study.")] = 12,
    epochs: Annotated[int, typer.Option(help="Epochs per trial.")] = 4,
    workers: Annotated[int, typer.Option(help="Local worker processes.")] = 2,
    database: Annotated[Path, typer.Option(help="SQLite file.")] = Path("hpo.db"),
    port: Annotated[
        int | None, typer.Option(help="Port of the demo server (default: a free one).")
    ] = None,
) -> None:
    """Start a server and local workers, tune a VAE on bundled MNIST digits, compare with the
    untuned default configuration."""
    from hpo_service.demo import run_demo

    try:
        run_demo(
            console,
            n_trials=trials_,
            epochs=epochs,
            n_workers=workers,
            database=database.resolve(),
            port=port,
        )
    except RuntimeError as error:
        raise _fail(str(error)) from error


# --- recurring sweeps: `hpo schedule …` and `hpo scheduler` ----------------------------------

schedule_app = typer.Typer(
    rich_markup_mode=None,
    no_args_is_help=True,
    help="Recurring sweeps: a cron in a time zone and a study template.",
)
app.add_typer(schedule_app, name="schedule")


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


@schedule_app.command("create")
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


@schedule_app.command("show")
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


@schedule_app.command("resume")
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


@schedule_app.command("report")
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


@app.command()
def scheduler(
    once: Annotated[bool, typer.Option(help="Tick once and exit.")] = False,
) -> None:
    """Run the scheduler as its own process (PostgreSQL), beside servers started with
    HPO_RUN_SCHEDULER=false or not; several may run, each fire time still runs once."""
    import signal
    import threading

    from sqlalchemy.exc import OperationalError

    from hpo_service.errors import SchemaMismatch
    from hpo_service.logging_setup import configure_logging
    from hpo_service.scheduler import Scheduler, run_scheduler
    from hpo_service.studies import StudyService

    settings = _server_settings()
    configure_logging(settings.log_level, settings.log_format)  # HPO_LOG_FORMAT, as `serve`
    if settings.is_sqlite:
        raise _fail(
            "a SQLite database has one writer process, the server: leave the scheduler inside "
            "`hpo serve` (HPO_RUN_SCHEDULER=true) or use PostgreSQL",
            2,
        )
    try:
        service = StudyService(settings)
    except SchemaMismatch as error:
        raise _fail(str(error), 2) from error
    except OperationalError as error:
        raise _unreachable(settings, error) from error
    ticker = Scheduler(service, settings)
    try:
        if once:
            ticker.tick()
            return
        stop = threading.Event()
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda *_: stop.set())
        console.print(f"scheduler ticking every {settings.scheduler_tick_s:g}s")
        run_scheduler(ticker, settings.scheduler_tick_s, stop)
        console.print("scheduler stopped")
    finally:
        service.storage.engine.dispose()


# `hpo agent -- COMMAND …`: any program as a worker (hpo_service/agent.py).
from hpo_service.agent import agent_command  # noqa: E402 - registered next to its peers

app.command("agent", no_args_is_help=True)(agent_command)


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)
