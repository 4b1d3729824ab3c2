"""The ``hpo`` study commands end to end against a live server (uvicorn on 127.0.0.1, real HTTP,
SQLite and PostgreSQL): what a user types and what they read back, errors included."""

from __future__ import annotations

import itertools
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import optuna
import pytest
import yaml
from helpers import TINY_FIXED, TOKENS
from live import LiveServer, free_port
from typer.testing import CliRunner

from hpo_service.cli import app, trials_title
from hpo_service.config import Settings

runner = CliRunner()


@pytest.fixture
def server(database_url: str) -> Iterator[str]:
    settings = Settings(database_url=database_url, tokens=TOKENS, run_scheduler=False)
    with LiveServer(settings) as live:
        yield live.url


def hpo(server: str, *args: str, token: str = "admin-token") -> Any:
    return runner.invoke(app, [*args, "--server", server, "--token", token])


def write_spec(tmp_path: Path, name: str = "cli", **overrides: Any) -> Path:
    spec: dict[str, Any] = {
        "name": name,
        "dataset": "synthetic",
        "epochs": 2,
        "budget": {"n_trials": 3, "max_concurrent": 1},
        "search_space": {"base_lr": {"low": 1e-4, "high": 1e-2, "log": True}},
        "drop": [],
        "fixed": dict(TINY_FIXED),
    }
    spec.update(overrides)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_study_commands_from_submit_to_delete(
    server: str, database_url: str, tmp_path: Path
) -> None:
    submitted = hpo(server, "submit", str(write_spec(tmp_path)))
    assert submitted.exit_code == 0, submitted.output
    assert "created study cli" in submitted.output

    listed = hpo(server, "studies", "--json")
    assert listed.exit_code == 0, listed.output
    (study,) = json.loads(listed.output)
    assert study["name"] == "cli" and study["state"] == "running"
    table = hpo(server, "studies")
    assert "cli" in table.output and "running" in table.output

    queued = hpo(server, "enqueue", "cli", "--param", "base_lr=1e-3", "-p", "batch_size=64")
    assert queued.exit_code == 0, queued.output
    assert "queued 1 trial(s) in cli" in queued.output
    params_file = tmp_path / "more.yaml"
    params_file.write_text(yaml.safe_dump([{"base_lr": 2e-3}, {"base_lr": 3e-3}]))
    assert "queued 2 trial(s)" in hpo(server, "enqueue", "cli", str(params_file)).output

    page = json.loads(hpo(server, "trials", "cli", "--json").output)
    assert page["total"] == 3
    assert {t["state"] for t in page["trials"]} == {"waiting"}
    # Queued parameters live in Optuna's storage until a worker leases the trial.
    queued_params = [
        t.system_attrs["fixed_params"]
        for t in optuna.load_study(study_name="cli", storage=database_url).trials
    ]
    assert sorted(p["base_lr"] for p in queued_params) == [1e-3, 2e-3, 3e-3]
    assert queued_params[0]["batch_size"] == 64
    shown = hpo(server, "trials", "cli")
    assert "cli: trials 0–2 of 3" in shown.output  # the last index shown, not one past it
    assert "cli: trials 1–2 of 3" in hpo(server, "trials", "cli", "--offset", "1").output

    no_best = hpo(server, "best", "cli")
    assert no_best.exit_code == 1 and "no completed trial" in no_best.output
    assert json.loads(hpo(server, "best", "cli", "--json").output) == []

    stopped = hpo(server, "stop", "cli")
    assert stopped.exit_code == 0 and "cli: stopped" in stopped.output
    cancelled = hpo(server, "cancel", "cli")
    assert cancelled.exit_code == 0 and "cli: cancelled" in cancelled.output

    refused = runner.invoke(app, ["delete", "cli", "--server", server, "--token", "admin-token"],
                            input="n\n")  # fmt: skip
    assert refused.exit_code == 1 and "not deleted" in refused.output
    deleted = hpo(server, "delete", "cli", "--yes")
    assert deleted.exit_code == 0 and "deleted study cli" in deleted.output
    assert json.loads(hpo(server, "studies", "--json").output) == []


def test_a_refused_spec_is_printed_once_naming_the_field_without_pydantic_prefixes(
    server: str, tmp_path: Path
) -> None:
    # Refused by the server: one line per field, no summary that repeats it, no "body." prefix.
    bad_batch = write_spec(tmp_path, "b1", search_space={"batch_size": {"choices": [64, 100]}})
    result = hpo(server, "submit", str(bad_batch))
    assert result.exit_code == 2
    assert result.output.count("powers of two") == 1, result.output
    assert "search_space.batch_size.choices: batch sizes must be positive powers of two" in (
        result.output
    )
    assert "body." not in result.output and "Value error" not in result.output

    # The same rule for a fixed batch size as for searched ones.
    fixed_batch = write_spec(tmp_path, "b0", fixed={**TINY_FIXED, "batch_size": 100})
    result = hpo(server, "submit", str(fixed_batch))
    assert result.exit_code == 2, result.output
    assert "fixed.batch_size: batch sizes must be positive powers of two (got 100)" in (
        result.output
    )

    # Refused before sending: the unknown parameter by its name, not "spec".
    unknown = write_spec(tmp_path, "b2", search_space={"batch_sise": {"choices": [64]}})
    result = hpo(server, "submit", str(unknown))
    assert result.exit_code == 2
    assert "search_space.batch_sise: unknown parameter" in result.output, result.output
    assert "Value error" not in result.output and "  spec:" not in result.output

    # A YAML syntax error names the file and the line.
    broken = tmp_path / "broken.yaml"
    broken.write_text("name: x\nbudget: {n_trials: [\n")
    result = hpo(server, "submit", str(broken))
    assert result.exit_code == 2
    assert f'in "{broken}", line 3' in result.output and "<unicode string>" not in result.output

    # Nothing was half-created.
    assert json.loads(hpo(server, "studies", "--json").output) == []


def test_unknown_study_bad_token_and_bad_params_are_errors_not_tracebacks(
    server: str, tmp_path: Path
) -> None:
    for args in (("trials", "ghost"), ("best", "ghost"), ("stop", "ghost"), ("delete", "ghost",
                 "--yes"), ("enqueue", "ghost", "-p", "base_lr=1e-3")):  # fmt: skip
        result = hpo(server, *args)
        assert result.exit_code == 2, (args, result.output)
        assert "404 study_not_found" in result.output and "ghost" in result.output
        assert result.exception is None or isinstance(result.exception, SystemExit)
    denied = hpo(server, "studies", token="not-a-token")
    assert denied.exit_code == 2 and "401" in denied.output
    assert hpo(server, "submit", str(write_spec(tmp_path))).exit_code == 0
    assert hpo(server, "enqueue", "cli", "-p", "nonsense").exit_code == 2
    both = hpo(server, "enqueue", "cli")
    assert both.exit_code == 2 and "--param" in both.output
    outside = hpo(server, "enqueue", "cli", "-p", "base_lr=5.0")  # outside [1e-4, 1e-2]
    assert outside.exit_code == 2 and "base_lr" in outside.output


def test_a_connection_error_names_the_url() -> None:
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    for args in (("studies",), ("trials", "x"), ("schedule", "list")):
        result = runner.invoke(app, [*args, "--server", url])
        assert result.exit_code == 1
        assert f"cannot reach the server at {url}" in result.output, result.output


def test_trials_title_counts_the_last_trial_shown() -> None:
    assert trials_title("s", 0, 12, 12) == "s: trials 0–11 of 12"
    assert trials_title("s", 50, 7, 57) == "s: trials 50–56 of 57"
    assert trials_title("s", 0, 0, 0) == "s: no trials from 0 on, of 0"


@pytest.mark.parametrize(
    "command",
    [[], ["submit"], ["studies"], ["trials"], ["best"], ["enqueue"], ["delete"], ["demo"],
     ["schedule"], ["schedule", "list"], ["schedule", "report"]],
)  # fmt: skip
def test_help_texts_are_plain_words(command: list[str]) -> None:
    result = runner.invoke(app, [*command, "--help"])
    assert result.exit_code == 0, result.output
    text = result.output
    assert "``" not in text and "<bool>" not in text
    # Paragraphs are reflowed to the width: a line that continues a sentence (next line, same
    # indent, lower case) follows a filled line, never a short one cut off mid-sentence.
    lines = re.split(r"^(?:Arguments|Options):", text, flags=re.MULTILINE)[0].splitlines()
    for line, after in itertools.pairwise(lines):
        indent = len(line) - len(line.lstrip())
        continues = after.strip() and after[indent : indent + 1].islower()
        if line.strip() and continues and len(after) - len(after.lstrip()) == indent:
            assert len(line.rstrip()) >= 60, (line, after)


@pytest.mark.parametrize("cli", ["hpo", "hpo schedule", "hpo-train", "hpo-worker"])
def test_command_listings_show_whole_summaries(cli: str) -> None:
    """click cuts a first sentence that does not fit with "..."; every listed summary is whole,
    and the trainer's CLIs are plain words too (no reST backquotes, no "<bool>")."""
    from trainers.cli import app as train_app
    from trainers.worker_cli import app as worker_app

    apps = {"hpo": (app, []), "hpo schedule": (app, ["schedule"]), "hpo-train": (train_app, [])}
    apps["hpo-worker"] = (worker_app, [])
    target, prefix = apps[cli]
    result = runner.invoke(target, [*prefix, "--help"], env={"COLUMNS": "80"})
    assert result.exit_code == 0, result.output
    body = result.output.split("\n", 1)[1]  # after "Usage: … [ARGS]..."
    assert "..." not in body and "…" not in body, body
    assert "``" not in body and "<bool>" not in body, body
    if cli != "hpo-worker":
        listing = body.split("Commands:")[1].strip().splitlines()
        assert len(listing) >= 3 and all(len(line.split()) >= 3 for line in listing), listing
