"""``hpo``: run the server, submit and inspect studies, recurring sweeps, and the demo.

Every command except ``serve``, ``migrate``, ``scheduler`` and ``demo`` talks to a running server
through the REST client; those four open the database themselves.

This module only builds the app; the commands live by job in the modules beside it:
``server`` (serve, migrate, scheduler), ``submit``, ``studies`` (the listings and study actions),
``demo``, ``schedules`` (``hpo schedule …``), and ``_common`` (options, console, errors).
"""

from __future__ import annotations

import sys

import typer

from hpo_service.agent import agent_command
from hpo_service.cli import demo, schedules, server, studies, submit
from hpo_service.cli._common import load_yaml_model
from hpo_service.cli.schedules import load_schedule_spec
from hpo_service.cli.studies import trials_title
from hpo_service.cli.submit import load_spec

__all__ = ["app", "load_schedule_spec", "load_spec", "load_yaml_model", "main", "trials_title"]

# The help the user sees: plain words, no reST markup. `rich_markup_mode=None` gives click's own
# formatting: docstring paragraphs reflowed to the terminal (no line breaks mid-sentence) and
# flags without typer's "<bool>" metavar.
APP_HELP = (
    "hpo: run the server, submit and inspect studies, recurring sweeps, and the demo.\n\n"
    "Every command except serve, migrate, scheduler and demo talks to a running server over "
    "its REST API (--server, --token); those four open the database themselves."
)
app = typer.Typer(add_completion=False, no_args_is_help=True, help=APP_HELP, rich_markup_mode=None)

# `hpo --help` lists the commands in the order they are registered here.
app.command()(server.serve)
app.command()(server.migrate)
app.command()(submit.submit)
app.command()(studies.studies)
app.command()(studies.trials)
app.command()(studies.best)
app.command()(studies.stop)
app.command()(studies.cancel)
app.command()(studies.enqueue)
app.command()(studies.delete)
app.command()(demo.demo)
app.add_typer(schedules.schedule_app, name="schedule")
app.command()(server.scheduler)
# `hpo agent -- COMMAND …`: any program as a worker (hpo_service/agent.py).
app.command("agent", no_args_is_help=True)(agent_command)


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)
