"""W&B sweep files: translated key by key, refused naming every key without a counterpart, and —
one file per method — submitted with the real ``hpo submit`` and run by ``hpo agent`` against a
live server until the study ends."""

from __future__ import annotations

import itertools
import math
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from byo_helpers import admin, live_server, study_trials
from live import LiveServer
from optuna.trial import TrialState

from hpo_service.search_space import default_space
from hpo_service.wandb_sweep import SweepUntranslatable, is_wandb_sweep, translate


def sweep(**overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "method": "random",
        "metric": {"name": "val_neg_elbo", "goal": "minimize"},
        "parameters": {"batch_size": {"values": [32, 64]}},
    }
    body.update(overrides)
    return body


@pytest.mark.parametrize(
    ("method", "sampler"), [("grid", "grid"), ("random", "random"), ("bayes", "tpe")]
)
def test_each_method_maps_to_a_sampler(method: str, sampler: str) -> None:
    translation = translate(sweep(method=method, run_cap=7), "file-name")
    assert translation.spec.sampler.name == sampler
    assert translation.spec.name == "file-name"
    assert translation.spec.budget.n_trials == 7
    assert translation.spec.pruner.name == "none"  # W&B stops no run unless asked to


def test_parameters_distributions_metric_and_hyperband_translate() -> None:
    translation = translate(
        sweep(
            name="lr sweep #1",
            metric={"name": "active_units", "goal": "maximize"},
            parameters={
                "learning_rate": {"min": 1e-4, "max": 1e-2, "distribution": "log_uniform_values"},
                "latent_dim": {"min": 4, "max": 32},
                "free_bits": {"min": 0.0, "max": 1.0},
                "weight_decay": {
                    "min": math.log(1e-5),
                    "max": math.log(1e-2),
                    "distribution": "log_uniform",
                },
                "beta_target": {"min": 0.5, "max": 2.0, "distribution": "q_uniform", "q": 0.5},
                "kl_schedule": {"values": ["linear", "cosine"]},
                "epochs": {"value": 6},
                "dataset": {"value": "digits"},
                "hidden_sizes": {"value": [64]},
            },
            early_terminate={"type": "hyperband", "min_iter": 2, "eta": 2},
            project="vae",
        )
    )
    spec = translation.spec
    assert spec.name == "lr-sweep-1"
    assert (spec.epochs, spec.dataset) == (6, "digits")
    assert spec.fixed == {"hidden_sizes": [64]}
    assert spec.objectives[0].metric == "active_units"
    assert spec.objectives[0].resolved_direction == "maximize"
    space = {name: p.model_dump(exclude_none=True) for name, p in spec.search_space.items()}
    assert space["base_lr"] == {"type": "float", "low": 1e-4, "high": 1e-2, "log": True}
    assert space["latent_dim"] == {"type": "int", "low": 4, "high": 32}
    assert space["free_bits"] == {"type": "float", "low": 0.0, "high": 1.0}
    assert space["weight_decay"]["log"] is True
    assert space["weight_decay"]["low"] == pytest.approx(1e-5)
    assert space["beta_target"]["step"] == 0.5
    assert space["kl_schedule"] == {"choices": ["linear", "cosine"]}
    assert (spec.pruner.name, spec.pruner.min_resource, spec.pruner.reduction_factor) == (
        "hyperband",
        2,
        2,
    )
    # Parameters the sweep does not list stay at their defaults, as in W&B.
    assert set(spec.drop) == {p.name for p in default_space(6)} - set(space)
    assert any("project" in note for note in translation.notes)


def test_hyperband_max_iter_and_s_give_the_smallest_bracket() -> None:
    early = {"type": "hyperband", "max_iter": 27, "s": 2, "eta": 3}
    spec = translate(sweep(early_terminate=early)).spec
    assert (spec.pruner.min_resource, spec.pruner.reduction_factor) == (3, 3)


def test_every_key_without_a_counterpart_is_named() -> None:
    bad = sweep(
        method="bayes",
        metric={"name": "val_loss", "goal": "minimize", "target": 0.1},
        parameters={
            "dropout": {"distribution": "normal", "mu": 0.1, "sigma": 0.02},
            "lr": {"min": 1e-3, "max": 0.1, "distribution": "q_log_uniform_values", "q": 1e-3},
            "encoder": {"parameters": {"width": {"values": [1, 2]}}},
            "batch_size": {"values": [32, 64], "probabilities": [0.5, 0.5]},
            "epochs": {"values": [5, 10]},
        },
        early_terminate={"type": "envelope"},
        controller={"type": "local"},
    )
    with pytest.raises(SweepUntranslatable) as raised:
        translate(bad)
    named = {where for where, _ in raised.value.problems}
    assert {
        "metric.target",
        "metric.name",
        "parameters.dropout",
        "parameters.dropout.mu",
        "parameters.lr.distribution",
        "parameters.encoder.parameters",
        "parameters.batch_size.probabilities",
        "parameters.epochs",
        "early_terminate.type",
        "controller",
    } <= named
    assert "val_neg_elbo" in dict(raised.value.problems)["metric.name"]


def test_a_study_spec_is_not_taken_for_a_sweep() -> None:
    assert is_wandb_sweep(sweep())
    assert not is_wandb_sweep({"name": "s", "search_space": {}, "sampler": {"name": "grid"}})


# --- end to end: hpo submit sweep.yaml, then hpo agent runs it to the end ------------------------

TRAIN_SH = """
    #!/bin/sh
    # Reports a value the parameters decide, so every method has something to optimise.
    for epoch in 0 1; do
      echo "HPO_METRIC {\\"epoch\\": $epoch, \\"value\\": $((HPO_CONFIG_BATCH_SIZE + epoch))}"
    done
"""

SWEEPS = {
    "grid": {"parameters": {"batch_size": {"values": [32, 64]}, "latent_dim": {"values": [2, 4]}}},
    "random": {
        "run_cap": 3,
        "parameters": {"batch_size": {"values": [32, 64]}, "free_bits": {"min": 0.0, "max": 1.0}},
    },
    "bayes": {
        "run_cap": 3,
        "parameters": {"batch_size": {"values": [32, 64]}, "latent_dim": {"min": 2, "max": 8}},
        "early_terminate": {"type": "hyperband", "min_iter": 1, "eta": 2},
    },
}


@pytest.fixture
def server(tmp_path: Path) -> Iterator[LiveServer]:
    with live_server(tmp_path) as live:
        yield live


def hpo(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "COLUMNS": "200"}
    return subprocess.run(
        [sys.executable, "-m", "hpo_service", *args],
        capture_output=True,
        text=True,
        timeout=180,
        env=env,
    )


@pytest.mark.parametrize("method", sorted(SWEEPS))
def test_a_sweep_file_is_submitted_and_run_to_the_end(
    server: LiveServer, tmp_path: Path, method: str
) -> None:
    body = {
        "name": f"wandb-{method}",
        "program": "train.sh",
        "method": method,
        "metric": {"name": "val_neg_elbo", "goal": "minimize"},
        **SWEEPS[method],
    }
    body["parameters"] = {
        **body["parameters"],
        "epochs": {"value": 2},
        "dataset": {"value": "synthetic"},
        "hidden_sizes": {"value": [16]},
    }
    sweep_file = tmp_path / "sweep.yaml"
    sweep_file.write_text(yaml.safe_dump(body))
    script = tmp_path / "train.sh"
    script.write_text(textwrap.dedent(TRAIN_SH).lstrip())

    submitted = hpo("submit", str(sweep_file), "--server", server.url, "--token", "admin-token")
    assert submitted.returncode == 0, submitted.stdout + submitted.stderr
    assert "W&B sweep" in submitted.stdout and f"name: wandb-{method}" in submitted.stdout
    assert f"hpo agent --server {server.url} -- python train.sh" in submitted.stdout
    assert "hpo-worker --server" in submitted.stdout and "sdk.trials" in submitted.stdout

    agent = hpo(
        "agent", "--server", server.url, "--token", "worker-token", "--wait", "0.5",
        "--idle-exit", "1", "--", "sh", str(script),
    )  # fmt: skip
    assert agent.returncode == 0, agent.stdout + agent.stderr
    info = admin(server).get_study(f"wandb-{method}")
    assert info.state == "completed", agent.stdout
    trials = study_trials(server, f"wandb-{method}")
    done = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    assert len(done) == len(trials) == (4 if method == "grid" else 3)
    for trial in done:
        assert trial.params["batch_size"] in (32, 64)
        assert set(trial.params) == set(SWEEPS[method]["parameters"])  # nothing else searched
    if method == "grid":
        points = sorted((t.params["batch_size"], t.params["latent_dim"]) for t in done)
        assert points == sorted(itertools.product([32, 64], [2, 4]))


def test_an_untranslatable_sweep_is_refused_and_nothing_is_created(
    server: LiveServer, tmp_path: Path
) -> None:
    sweep_file = tmp_path / "bad.yaml"
    bad = sweep(parameters={"dropout": {"distribution": "normal", "mu": 0.1, "sigma": 0.1}})
    sweep_file.write_text(yaml.safe_dump(bad))
    submitted = hpo("submit", str(sweep_file), "--server", server.url, "--token", "admin-token")
    assert submitted.returncode == 2
    assert "parameters.dropout" in submitted.stdout and "no counterpart" in submitted.stdout
    assert admin(server).list_studies() == []
