"""The grid sampler through the real app on SQLite and PostgreSQL: the study ends when its grid
is done (a retry runs its failed point, and no point is skipped), and specs without a finite grid
are refused naming the parameter."""

from __future__ import annotations

import itertools
from typing import Any

from fastapi.testclient import TestClient
from helpers import ADMIN, VIEWER, WORKER, spec

from hpo_service.client import HPOClient
from hpo_service.search_space import default_space

EPOCHS = 3


def grid_spec(name: str, search_space: dict[str, Any], n_trials: int = 50) -> dict[str, Any]:
    drop = [p.name for p in default_space(EPOCHS) if p.name not in search_space]
    return spec(
        name,
        epochs=EPOCHS,
        sampler={"name": "grid", "seed": 0},
        pruner={"name": "none"},
        search_space=search_space,
        drop=drop,
        budget={"n_trials": n_trials, "max_concurrent": 1},
    )


def worker(client: TestClient) -> HPOClient:
    client.headers.update(WORKER)
    return HPOClient(client)


def test_a_grid_study_runs_every_point_once_and_then_completes(client: TestClient) -> None:
    space = {"batch_size": {"choices": [32, 64]}, "optimizer": {"choices": ["adamw", "radam"]}}
    created = client.post("/v1/studies", json=grid_spec("grid", space), headers=ADMIN)
    assert created.status_code == 201, created.text
    assert created.json()["spec"]["budget"]["n_trials"] == 4  # capped at the grid's size
    api = worker(client)
    leased = []
    while (lease := api.lease("w", wait_s=0)) is not None:
        leased.append(lease.params)
        if len(leased) == 1:  # the first point's worker dies: its retry must run that point
            api.fail(lease.trial_id, lease.lease_token, "worker lost", retryable=True)
        else:
            api.complete(lease.trial_id, lease.lease_token, [float(len(leased))], {})
        assert len(leased) <= 10, "the grid study did not end"
    assert leased[1] == leased[0]  # the retry first, with the failed point's values
    info = client.get("/v1/studies/grid", headers=VIEWER).json()
    assert info["state"] == "completed"
    assert info["counts"] == {"waiting": 0, "running": 0, "complete": 4, "pruned": 0, "fail": 1}
    trials = client.get("/v1/studies/grid/trials", headers=VIEWER).json()["trials"]
    done = sorted(
        (t["params"]["batch_size"], t["params"]["optimizer"])
        for t in trials
        if t["state"] == "complete"
    )
    assert done == sorted(itertools.product([32, 64], ["adamw", "radam"]))


def test_stepped_ranges_make_grid_points_and_a_smaller_budget_stays(client: TestClient) -> None:
    space = {
        "free_bits": {"low": 0.0, "high": 0.5, "step": 0.25},
        "latent_dim": {"low": 2, "high": 3},
    }
    body = grid_spec("stepped", space, n_trials=5)
    body["fixed"].pop("latent_dim")
    created = client.post("/v1/studies", json=body, headers=ADMIN)
    assert created.status_code == 201, created.text
    assert created.json()["spec"]["budget"]["n_trials"] == 5  # under the 6 points: kept
    api = worker(client)
    seen = []
    while (lease := api.lease("w", wait_s=0)) is not None:
        seen.append((lease.params["free_bits"], lease.params["latent_dim"]))
        api.complete(lease.trial_id, lease.lease_token, [1.0], {})
    assert len(seen) == 5 and len(set(seen)) == 5
    assert set(seen) <= set(itertools.product([0.0, 0.25, 0.5], [2, 3]))


def test_a_float_range_without_a_step_is_refused_naming_it(client: TestClient) -> None:
    space = {"batch_size": {"choices": [32, 64]}, "base_lr": {"low": 1e-4, "high": 1e-2}}
    response = client.post("/v1/studies", json=grid_spec("nostep", space), headers=ADMIN)
    assert response.status_code == 422, response.text
    (detail,) = response.json()["error"]["details"]
    assert detail["field"] == "body.search_space.base_lr"
    assert "step" in detail["reason"]
    assert client.get("/v1/studies/nostep", headers=VIEWER).status_code == 404  # nothing written


def test_a_conditional_parameter_under_a_searched_parent_is_refused(client: TestClient) -> None:
    space = {
        "kl_schedule": {"choices": ["linear", "cyclical"]},
        "kl_cycles": {"choices": [2, 4]},
        "kl_warmup_epochs": {"choices": [1.0]},
        "kl_ratio": {"choices": [0.5]},
    }
    response = client.post("/v1/studies", json=grid_spec("cond", space), headers=ADMIN)
    assert response.status_code == 422, response.text
    (detail,) = response.json()["error"]["details"]
    assert detail["field"] in {"body.search_space.kl_warmup_epochs", "body.search_space.kl_cycles"}
    assert "conditional" in detail["reason"] and "kl_schedule" in detail["reason"]
