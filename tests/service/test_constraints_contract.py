"""Collapse and divergence constraints through the real app and the real worker (TestClient),
on SQLite and PostgreSQL: a collapsed trial completes infeasible, a diverged one completes
infeasible with the worst value seen, neither is ever `best`; each constraint can be switched off.
"""

from __future__ import annotations

import json
from typing import Any

import optuna
from fastapi.testclient import TestClient
from helpers import ADMIN, VIEWER, spec

from hpo_service.client import HPOClient
from trainers.errors import NonFiniteLossError
from trainers.train import EpochMetrics, TrainResult, train
from trainers.worker import Worker, WorkerOptions


def _worker(client: TestClient, train_fn: Any = train) -> Worker:
    client.headers.update({"Authorization": "Bearer worker-token"})
    options = WorkerOptions(worker_id="constraints", wait_s=0, idle_exit_s=0)
    return Worker(HPOClient(client), options, train_fn=train_fn)


def _create(client: TestClient, **overrides: Any) -> None:
    response = client.post("/v1/studies", json=spec(**overrides), headers=ADMIN)
    assert response.status_code == 201, response.text


def _trials(client: TestClient, name: str) -> list[dict[str, Any]]:
    return client.get(f"/v1/studies/{name}/trials", headers=VIEWER).json()["trials"]


def _scripted(outcomes: list[str]) -> Any:
    """A stand-in trainer: per trial, "good" (healthy, value 100 + trial index), "collapsed"
    (the best value but no active unit and no KL), or "diverged" (reports two epochs with
    finite values, then NaN)."""
    runs = iter(enumerate(outcomes))

    def scripted(config: dict[str, Any], on_epoch: Any) -> TrainResult:
        index, outcome = next(runs)
        value = 50.0 if outcome == "collapsed" else 100.0 + index
        history = []
        for epoch in range(1, 4):
            if outcome == "diverged" and epoch == 3:
                raise NonFiniteLossError(epoch=3, step=17)
            metrics = EpochMetrics(epoch, {"val_neg_elbo": value + 10 * (3 - epoch)}, [0.0])
            history.append(metrics)
            on_epoch(metrics)
        healthy = outcome == "good"
        final = {
            "val_neg_elbo": value,
            "active_units": 3.0 if healthy else 0.0,
            "val_kl": 12.0 if healthy else 0.003,
        }
        return TrainResult(final, history, 3, 3, False)

    return scripted


def test_collapsed_and_diverged_trials_complete_infeasible_and_are_never_best(
    client: TestClient, database_url: str
) -> None:
    name = "feasibility"
    outcomes = ["good", "collapsed", "good", "diverged"]
    _create(
        client,
        name=name,
        budget={"n_trials": len(outcomes), "max_concurrent": 1},
        pruner={"name": "none"},
    )
    assert _worker(client, _scripted(outcomes)).run() == len(outcomes)
    trials = _trials(client, name)
    assert [t["state"] for t in trials] == ["complete"] * 4  # the divergence is no FAIL
    assert [t["feasible"] for t in trials] == [True, False, True, False]
    # The diverged trial carries the worst value seen: its own last finite report (113 at
    # epoch 2) is worse than every completed value (100, 50, 102), so 113.
    assert trials[3]["values"] == [113.0]

    info = client.get(f"/v1/studies/{name}", headers=VIEWER).json()
    assert info["counts"]["complete"] == 4 and info["counts"]["fail"] == 0
    # The collapsed trial has the best value (50) but is infeasible: best is trial 0 (100).
    assert [t["number"] for t in info["best_trials"]] == [0]

    study = optuna.load_study(study_name=name, storage=database_url)
    collapsed, gone = study.trials[1], study.trials[3]
    # What Optuna's samplers and optuna-dashboard read: the list under `constraints`.
    assert collapsed.system_attrs["constraints"] == [1.0, (0.1 - 0.003) / 0.1, 0.0]
    assert collapsed.user_attrs["feasibility"]["violated"] == ["active_units", "kl"]
    assert gone.system_attrs["constraints"] == [1.0, 1.0, 1.0]
    assert gone.user_attrs["fail_reason"].startswith("NonFiniteLossError")
    assert study.best_trial.number == 0


def test_switched_off_constraints_leave_collapse_feasible_and_divergence_a_failure(
    client: TestClient,
) -> None:
    name = "unconstrained"
    _create(
        client,
        name=name,
        budget={"n_trials": 2, "max_concurrent": 1},
        pruner={"name": "none"},
        constraints={"active_units": False, "kl": False, "finite": False},
    )
    assert _worker(client, _scripted(["collapsed", "diverged"])).run() == 2
    trials = _trials(client, name)
    assert [t["state"] for t in trials] == ["complete", "fail"]
    assert trials[0]["feasible"] is None  # nothing recorded
    info = client.get(f"/v1/studies/{name}", headers=VIEWER).json()
    assert [t["number"] for t in info["best_trials"]] == [0]


def test_a_study_whose_first_trial_diverges_before_reporting_tells_it_pruned(
    client: TestClient,
) -> None:
    """No value anywhere to complete it with: PRUNED with its constraints (TPE still reads it
    as infeasible), never RUNNING, never a FAIL."""
    name = "early-divergence"
    _create(client, name=name, budget={"n_trials": 1, "max_concurrent": 1})

    def diverge_at_once(config: dict[str, Any], on_epoch: Any) -> TrainResult:
        raise NonFiniteLossError(epoch=1, step=0)

    assert _worker(client, diverge_at_once).run() == 1
    [trial] = _trials(client, name)
    assert trial["state"] == "pruned" and trial["feasible"] is False


def test_an_unreachable_minimum_of_active_units_is_a_422(client: TestClient) -> None:
    body = spec(name="too-many", constraints={"min_active_units": 5})  # latent_dim is 4
    response = client.post("/v1/studies", json=body, headers=ADMIN)
    assert response.status_code == 422, response.text
    assert "constraints.min_active_units" in response.text
    assert client.get("/v1/studies/too-many", headers=VIEWER).status_code == 404
    bad = spec(name="bad-kl", constraints={"min_kl": -1})
    response = client.post("/v1/studies", json=bad, headers=ADMIN)
    assert response.status_code == 422 and "min_kl" in response.text


def test_the_dashboard_shows_feasibility(client: TestClient) -> None:
    """optuna-dashboard 0.21 greys out trials whose `constraints` list has a positive value;
    its JSON API must carry our values, and the verdict shows among the user attributes."""
    name = "dashboard-feasibility"
    _create(client, name=name, budget={"n_trials": 2, "max_concurrent": 1}, pruner={"name": "none"})
    assert _worker(client, _scripted(["good", "collapsed"])).run() == 2
    study_id = client.get(f"/v1/studies/{name}", headers=VIEWER).json()["study_id"]
    trials = client.get(f"/api/studies/{study_id}", headers=VIEWER).json()["trials"]
    shown = [t["constraints"] for t in trials]
    assert all(v <= 0 for v in shown[0]) and any(v > 0 for v in shown[1])
    attrs = {a["key"]: a["value"] for a in trials[1]["user_attrs"]}
    assert json.loads(attrs["feasibility"])["feasible"] is False


def test_curated_starts_run_first_and_name_their_source(
    client: TestClient, database_url: str
) -> None:
    name = "curated"
    _create(
        client,
        name=name,
        curated_starts=True,
        budget={"n_trials": 5, "max_concurrent": 1},
        pruner={"name": "none"},
    )
    assert _worker(client, _scripted(["good"] * 5)).run() == 5
    study = optuna.load_study(study_name=name, storage=database_url)
    sources = [t.user_attrs.get("curated_start") for t in study.trials]
    assert sources == ["pytorch-examples", "bowman-warmup", "fu-cyclical", "one-cycle", None]
    assert study.trials[0].user_attrs["config"]["kl_schedule"] == "constant"
    assert study.trials[2].user_attrs["config"]["kl_schedule"] == "cyclical"


def test_a_multi_objective_study_prunes_on_its_primary_metric(client: TestClient) -> None:
    name = "multi-prune"
    _create(
        client,
        name=name,
        objectives=[{"metric": "val_neg_elbo"}, {"metric": "active_units"}],
        budget={"n_trials": 3, "max_concurrent": 1},
        fixed={"kl_schedule": "constant", **spec()["fixed"]},
        pruner={"name": "median", "n_startup_trials": 2, "n_warmup_steps": 0,
                "metric": "val_neg_elbo"},
    )  # fmt: skip
    runs = iter([0.0, 1.0, 1e6])  # the third trial is far worse on the primary metric

    def scripted(config: dict[str, Any], on_epoch: Any) -> TrainResult:
        offset = next(runs)
        history = []
        for epoch in range(1, 4):
            metrics = EpochMetrics(epoch, {"val_neg_elbo": 100.0 + offset}, [0.0])
            history.append(metrics)
            if on_epoch(metrics) == "stop":
                return TrainResult({}, history, epoch, 1, True)
        final = {"val_neg_elbo": 100.0 + offset, "active_units": 3.0, "val_kl": 5.0}
        return TrainResult(final, history, 3, 3, False)

    assert _worker(client, scripted).run() == 3
    trials = _trials(client, name)
    assert [t["state"] for t in trials] == ["complete", "complete", "pruned"]
    assert trials[2]["intermediate_values"] == {"1": 1e6 + 100.0}
