"""``hpo``: run the server, submit and inspect studies, and the end-to-end demo.

Every command except ``serve`` and ``demo`` talks to a running server through the REST client.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
import yaml
from pydantic import ValidationError
from rich.console import Console
from rich.table import Table

from hpo_service.client import APIError, ClientError, HPOClient, make_http_client
from hpo_service.schemas import StudyInfo, StudySpec, TrialSummary

if TYPE_CHECKING:  # the server extra; the client commands work without it
    from hpo_service.config import Settings

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)
console = Console()

ServerOpt = Annotated[
    str, typer.Option("--server", envvar="HPO_SERVER_URL", help="Base URL of the server.")
]
TokenOpt = Annotated[
    str | None, typer.Option("--token", envvar="HPO_TOKEN", help="API token (admin/viewer).")
]
DEFAULT_SERVER = "http://127.0.0.1:8000"


def _client(server: str, token: str | None) -> HPOClient:
    return HPOClient(make_http_client(server, token))


def _fail(message: str, code: int = 1) -> typer.Exit:
    console.print(f"[red]error:[/red] {message}")
    return typer.Exit(code)


def _api_error(error: ClientError) -> typer.Exit:
    if isinstance(error, APIError) and error.details:
        lines = "\n".join(f"  {d.get('field')}: {d.get('reason')}" for d in error.details)
        return _fail(f"{error.message}\n{lines}", 2)
    return _fail(str(error), 2 if isinstance(error, APIError) else 1)


def load_spec(path: Path) -> StudySpec:
    """A study spec from YAML or JSON; raises ``typer.Exit(2)`` naming the bad field."""
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as error:
        raise _fail(f"cannot read {path}: {error}", 2) from error
    try:
        return StudySpec.model_validate(data)
    except ValidationError as error:
        lines = "\n".join(
            f"  {'.'.join(str(p) for p in e['loc']) or 'spec'}: {e['msg']}" for e in error.errors()
        )
        raise _fail(f"invalid spec {path}:\n{lines}", 2) from error


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
    spec_file: Annotated[Path, typer.Argument(help="Study spec (YAML or JSON).")],
    server: ServerOpt = DEFAULT_SERVER,
    token: TokenOpt = None,
    wait: Annotated[bool, typer.Option(help="Follow progress until the study ends.")] = False,
) -> None:
    """Create a study from a spec file."""
    spec = load_spec(spec_file)
    client = _client(server, token)
    try:
        info = client.create_study(spec)
    except ClientError as error:
        raise _api_error(error) from error
    console.print(f"created study [bold]{info.name}[/bold] → {info.links.get('self', '')}")
    if wait:
        _follow(client, info.name)


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
) -> None:
    """List studies."""
    try:
        infos = _client(server, token).list_studies(state)
    except ClientError as error:
        raise _api_error(error) from error
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
    offset: int = 0,
    limit: int = 50,
) -> None:
    """List a study's trials."""
    try:
        client = _client(server, token)
        page = client.list_trials(name, offset, limit)
        info = client.get_study(name)
    except ClientError as error:
        raise _api_error(error) from error
    console.print(
        _trial_table(
            f"{name}: trials {offset}–{offset + len(page.trials)} of {page.total}",
            page.trials,
            info.metric_names,
        )
    )


@app.command()
def best(
    name: str,
    server: ServerOpt = DEFAULT_SERVER,
    token: TokenOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """The best trial (or the Pareto front of a multi-objective study)."""
    try:
        info = _client(server, token).get_study(name)
    except ClientError as error:
        raise _api_error(error) from error
    if as_json:
        print(json.dumps([t.model_dump(mode="json") for t in info.best_trials], indent=2))
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
        raise _api_error(error) from error


@app.command()
def cancel(name: str, server: ServerOpt = DEFAULT_SERVER, token: TokenOpt = None) -> None:
    """No new trials; running ones are told to stop."""
    try:
        console.print(_counts_line(_client(server, token).cancel_study(name)))
    except ClientError as error:
        raise _api_error(error) from error


@app.command()
def demo(
    trials_: Annotated[int, typer.Option("--trials", help="Trials in the demo study.")] = 24,
    epochs: Annotated[int, typer.Option(help="Epochs per trial.")] = 8,
    workers: Annotated[int, typer.Option(help="Local worker processes.")] = 2,
    database: Annotated[Path, typer.Option(help="SQLite file.")] = Path("hpo.db"),
    port: Annotated[int, typer.Option(help="Port of the demo server.")] = 8765,
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


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)
