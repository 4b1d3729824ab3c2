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

# `hpo --help` lists the commands in the order they are registered here, each with its summary
# below: click would cut a docstring's first sentence at the terminal width with "…".
SUMMARIES = {
    "serve": "Run the API server, the lease reaper and the dashboard.",
    "migrate": "Upgrade the database's schemas (Optuna's and the service's).",
    "submit": "Create a study from a spec file or a W&B sweep config.",
    "studies": "List studies.",
    "trials": "List a study's trials.",
    "best": "The best trial, or the Pareto front of a multi-objective study.",
    "stop": "No new trials; running ones finish.",
    "cancel": "No new trials; running ones are told to stop.",
    "enqueue": "Queue trials with given parameters, ahead of the sampler.",
    "delete": "Delete a study and all its trials.",
    "demo": "Tune a VAE on bundled MNIST: a local server and workers.",
    "schedule": "Recurring sweeps: a cron in a time zone and a study template.",
    "scheduler": "Run the scheduler as its own process, beside the servers.",
    "agent": "Run COMMAND once per trial: your own training code as a worker.",
}
for command in (
    server.serve,
    server.migrate,
    submit.submit,
    studies.studies,
    studies.trials,
    studies.best,
    studies.stop,
    studies.cancel,
    studies.enqueue,
    studies.delete,
    demo.demo,
):
    app.command(short_help=SUMMARIES[command.__name__])(command)
app.add_typer(schedules.schedule_app, name="schedule", short_help=SUMMARIES["schedule"])
app.command(short_help=SUMMARIES["scheduler"])(server.scheduler)
# `hpo agent -- COMMAND …`: any program as a worker (hpo_service/agent.py).
app.command("agent", no_args_is_help=True, short_help=SUMMARIES["agent"])(agent_command)


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)
