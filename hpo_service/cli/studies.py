"""The study commands over the REST API: ``studies``, ``trials``, ``best``, ``stop``, ``cancel``,
``enqueue`` and ``delete``, with the tables and lines they print."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
import yaml
from rich.table import Table

from hpo_service import lr_range
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
)
from hpo_service.client import ClientError
from hpo_service.final_eval import summary_lines, trial_result
from hpo_service.schemas import StudyInfo, TrialSummary


def _counts_line(info: StudyInfo) -> str:
    c = info.counts
    line = (
        f"{info.name}: {info.state} — complete {c.complete}, pruned {c.pruned}, "
        f"running {c.running}, waiting {c.waiting}, failed {c.fail} "
        f"/ {info.spec.budget.n_trials} trials"
    )
    if info.lr_range_test is not None:
        line += f"; LR range test {lr_range.summary(info.lr_range_test)}"
    return line


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
    lr_tests = any(info.lr_range_test is not None for info in infos)
    columns = ("name", "state", "complete", "pruned", "running", "failed", "best")
    for column in (*columns, "LR range test") if lr_tests else columns:
        table.add_column(column)
    for info in infos:
        lr_cell = [lr_range.summary(info.lr_range_test)] if lr_tests else []
        best = info.best_trials[0].values if info.best_trials else None
        table.add_row(
            info.name,
            info.state,
            str(info.counts.complete),
            str(info.counts.pruned),
            str(info.counts.running),
            str(info.counts.fail),
            ", ".join(f"{v:.4g}" for v in best) if best else "-",
            *lr_cell,
        )
    console.print(table)


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


def best(
    name: str,
    server: ServerOpt = DEFAULT_SERVER,
    token: TokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """The best trial (or the Pareto front of a multi-objective study), with the final
    evaluation of the winners when there is one. With --json: a list of the best trials,
    each with its final_evaluation (test IS-NLL, k, examples, best epoch, when it was
    evaluated; null when it was not)."""
    try:
        info = _client(server, token).get_study(name)
    except ClientError as error:
        raise _api_error(error, server) from error
    if as_json:
        _print_json(
            [
                {
                    **t.model_dump(mode="json"),
                    "final_evaluation": trial_result(info.final_evaluation, t.number),
                }
                for t in info.best_trials
            ]
        )
        return
    if not info.best_trials:
        raise _fail(f"study {name} has no completed trial yet")
    console.print(_trial_table(f"{name}: best", info.best_trials, info.metric_names))
    if info.final_evaluation is not None:  # issue 14.4: the winners' precise test IS-NLL
        when = info.final_evaluation.get("evaluated_at")
        console.print(
            "final evaluation (full test split" + (f", evaluated {when}" if when else "") + "):",
            markup=False,
        )
        for line in summary_lines(info.final_evaluation):
            console.print(f"  {line}", markup=False)


def stop(name: str, server: ServerOpt = DEFAULT_SERVER, token: TokenOpt = None) -> None:
    """No new trials; running ones finish."""
    try:
        console.print(_counts_line(_client(server, token).stop_study(name)))
    except ClientError as error:
        raise _api_error(error, server) from error


def cancel(name: str, server: ServerOpt = DEFAULT_SERVER, token: TokenOpt = None) -> None:
    """No new trials; running ones are told to stop."""
    try:
        console.print(_counts_line(_client(server, token).cancel_study(name)))
    except ClientError as error:
        raise _api_error(error, server) from error


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
