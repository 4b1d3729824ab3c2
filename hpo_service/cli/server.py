"""The commands that open the database themselves: ``serve``, ``migrate`` and ``scheduler``.

Their server-side imports (uvicorn, SQLAlchemy, the app) stay inside the commands: the client
commands work without the server extra.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Annotated, Any

import typer

from hpo_service.cli._common import _fail, console

if TYPE_CHECKING:  # the server extra; the client commands work without it
    from hpo_service.config import Settings


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
