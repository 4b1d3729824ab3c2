"""The REST API and the worker protocol through TestClient, on SQLite and PostgreSQL."""

from __future__ import annotations

import json
import time
from typing import Any

import optuna
import pytest
from fastapi.testclient import TestClient
from helpers import ADMIN, VIEWER, WORKER, spec


def create(client: TestClient, **overrides: Any) -> dict[str, Any]:
    response = client.post("/v1/studies", json=spec(**overrides), headers=ADMIN)
    assert response.status_code == 201, response.text
    return response.json()


def lease(client: TestClient, worker: str = "w1") -> dict[str, Any] | None:
    response = client.post("/v1/leases", json={"worker_id": worker}, headers=WORKER)
    if response.status_code == 204:
        return None
    assert response.status_code == 200, response.text
    return response.json()


def complete(client: TestClient, granted: dict[str, Any], value: float) -> Any:
    return client.post(
        f"/v1/trials/{granted['trial_id']}/complete",
        json={"lease_token": granted["lease_token"], "values": [value], "metrics": {"x": 1.0}},
        headers=WORKER,
    )


def expire_and_reap(client: TestClient) -> None:
    """Wait past the 1 s lease timeout (by the database clock) and run the reaper once."""
    time.sleep(2.2)
    client.app.state.service.reap()  # type: ignore[attr-defined]


def test_create_study_records_spec_and_metric_names(client: TestClient, database_url: str) -> None:
    body = create(client, name="recorded")
    assert body["state"] == "running"
    assert body["links"]["self"].endswith("/v1/studies/recorded")
    study = optuna.load_study(study_name="recorded", storage=database_url)
    assert study.metric_names == ["val_neg_elbo"]
    assert study.user_attrs["spec"]["budget"]["n_trials"] == 4
    assert study.user_attrs["sampler"]["class"] == "TPESampler"
    assert "base_lr" in study.user_attrs["search_space"]


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"search_space": {"base_lr": {"low": float("nan"), "high": 1e-3}}}, "base_lr"),
        ({"search_space": {"base_lr": {"low": 1e-2, "high": 1e-3}}}, "base_lr"),
        ({"search_space": {"base_lr": {"low": 0.0, "high": 1e-3, "log": True}}}, "base_lr"),
        ({"search_space": {"batch_size": {"choices": [64, 100]}}}, "batch_size"),
        ({"search_space": {"batch_size": {"choices": [0, 64]}}}, "batch_size"),
        ({"search_space": {"not_a_knob": {"low": 1, "high": 2}}}, "not_a_knob"),
        ({"budget": {"n_trials": 10_000_000}}, "budget.n_trials"),
        ({"budget": {"n_trials": 0}}, "budget.n_trials"),
        ({"fixed": {"base_lr": -1.0}}, "base_lr"),
        ({"search_space": {"kl_warmup_epochs": {"low": 0, "high": 50}}}, "kl_warmup_epochs"),
        ({"search_space": {"max_lr_factor": {"low": 0.5, "high": 4}}}, "max_lr_factor"),
        ({"objectives": [{"metric": "accuracy"}]}, "objectives"),
        ({"dataset": "imagenet"}, "dataset"),
        (
            {"dataset": "digits", "search_space": {"batch_size": {"choices": [64, 2048]}}},
            "batch_size",
        ),
        # Issue 13: every dataset whose training split is known, not only the bundled ones.
        ({"fixed": {"synthetic_size": 64, "batch_size": 64}}, "fixed.batch_size"),
        (
            {"dataset": "mnist", "search_space": {"batch_size": {"choices": [64, 65536]}}},
            "search_space.batch_size",
        ),
    ],
)
def test_bad_specs_get_422_naming_the_field_and_write_nothing(
    client: TestClient, overrides: dict[str, Any], field: str
) -> None:
    if "nan" in repr(overrides):
        payload = spec(name="bad", **overrides)
        content = json.dumps(payload)  # httpx refuses NaN in `json=`; the stdlib writes NaN
        response = client.post(
            "/v1/studies", content=content, headers={**ADMIN, "content-type": "application/json"}
        )
    else:
        response = client.post("/v1/studies", json=spec(name="bad", **overrides), headers=ADMIN)
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["code"] in ("invalid_request", "invalid_spec")
    assert any(field in detail["field"] for detail in error["details"]), error
    assert all(detail["reason"] for detail in error["details"])
    assert client.get("/v1/studies", headers=ADMIN).json() == []


def test_duplicate_name_is_409(client: TestClient) -> None:
    create(client, name="dup")
    response = client.post("/v1/studies", json=spec(name="dup"), headers=ADMIN)
    assert response.status_code == 409
    assert response.json()["error"]["code"] == "study_exists"


def test_scopes(client: TestClient) -> None:
    assert client.post("/v1/studies", json=spec(), headers=VIEWER).status_code == 403
    assert client.post("/v1/studies", json=spec()).status_code == 401
    wrong = {"Authorization": "Bearer nope"}
    assert client.get("/v1/studies", headers=wrong).status_code == 401
    create(client, name="scoped")
    assert client.get("/v1/studies/scoped", headers=VIEWER).status_code == 200
    assert client.post("/v1/leases", json={"worker_id": "v"}, headers=VIEWER).status_code == 403
    assert client.post("/v1/studies/scoped/stop", headers=WORKER).status_code == 403


def test_lease_respects_max_concurrent_and_budget(client: TestClient) -> None:
    create(client, name="budget", budget={"n_trials": 3, "max_concurrent": 2})
    first, second = lease(client, "a"), lease(client, "b")
    assert first and second and first["trial_id"] != second["trial_id"]
    assert lease(client, "c") is None  # max_concurrent reached
    assert complete(client, first, 10.0).status_code == 200
    third = lease(client, "c")
    assert third is not None
    assert lease(client, "d") is None  # n_trials reached: 2 running + 1 complete
    for granted, value in ((second, 9.0), (third, 8.0)):
        assert complete(client, granted, value).status_code == 200
    info = client.get("/v1/studies/budget", headers=VIEWER).json()
    assert info["state"] == "completed"
    assert info["counts"]["complete"] == 3
    assert info["best_trials"][0]["values"] == [8.0]


def test_lease_returns_a_full_valid_config(client: TestClient) -> None:
    from hpo_service.schemas import TrainConfig

    create(client, name="config")
    granted = lease(client)
    assert granted is not None
    config = TrainConfig.model_validate(granted["config"])
    assert config.dataset == "synthetic" and config.epochs == 3
    assert granted["report_metric"] == "val_neg_elbo"
    if config.lr_policy in ("triangular", "triangular2", "cosine", "one_cycle"):
        assert config.max_lr is not None and config.max_lr > config.base_lr


def test_complete_is_idempotent_and_conflicts_are_409(client: TestClient) -> None:
    create(client, name="idem")
    granted = lease(client)
    assert granted is not None
    first = complete(client, granted, 5.0)
    again = complete(client, granted, 5.0)
    assert first.status_code == again.status_code == 200
    assert first.json() == again.json()
    different = complete(client, granted, 4.0)
    assert different.status_code == 409
    assert different.json()["error"]["code"] == "result_conflict"
    trials = client.get("/v1/studies/idem/trials", headers=VIEWER).json()
    assert trials["trials"][0]["values"] == [5.0]  # the first result stands
    bad_token = client.post(
        f"/v1/trials/{granted['trial_id']}/complete",
        json={"lease_token": "forged", "values": [5.0]},
        headers=WORKER,
    )
    assert bad_token.status_code == 409 and bad_token.json()["error"]["code"] == "lease_mismatch"


def test_non_finite_values_are_422(client: TestClient) -> None:
    create(client, name="finite")
    granted = lease(client)
    assert granted is not None
    for literal in ("Infinity", "NaN", "-Infinity"):
        response = client.post(
            f"/v1/trials/{granted['trial_id']}/complete",
            content=f'{{"lease_token": "{granted["lease_token"]}", "values": [{literal}]}}',
            headers={**WORKER, "content-type": "application/json"},
        )
        assert response.status_code == 422, literal
    trials = client.get("/v1/studies/finite/trials", headers=VIEWER).json()["trials"]
    assert trials[0]["state"] == "running"


def test_expired_lease_is_reaped_retried_and_a_late_complete_is_409(client: TestClient) -> None:
    create(client, name="reap", budget={"n_trials": 2, "max_concurrent": 2})
    granted = lease(client, "dies")
    assert granted is not None
    expire_and_reap(client)
    late = complete(client, granted, 1.0)
    assert late.status_code == 409
    assert late.json()["error"]["code"] == "trial_reaped"
    retry = lease(client, "other")
    assert retry is not None
    assert retry["trial_number"] != granted["trial_number"]
    assert retry["config"] == granted["config"]  # same parameters
    trials = client.get("/v1/studies/reap/trials", headers=VIEWER).json()["trials"]
    assert [t["state"] for t in trials] == ["fail", "running"]
    assert trials[1]["retry_of"] == granted["trial_number"]


def test_retries_are_bounded(client: TestClient) -> None:
    create(client, name="bounded", max_retries=1, budget={"n_trials": 1, "max_concurrent": 1})
    first = lease(client)
    assert first is not None
    expire_and_reap(client)
    second = lease(client)
    assert second is not None and second["config"] == first["config"]
    expire_and_reap(client)
    assert lease(client) is None  # retry budget spent: the failure is final
    info = client.get("/v1/studies/bounded", headers=VIEWER).json()
    assert info["counts"]["fail"] == 2 and info["counts"]["waiting"] == 0
    assert info["state"] == "completed"


def test_heartbeat_keeps_the_lease_and_cancel_says_stop(client: TestClient) -> None:
    create(client, name="beat")
    granted = lease(client)
    assert granted is not None
    url = f"/v1/trials/{granted['trial_id']}/heartbeat"
    for _ in range(4):  # 2 s of beats across a 1 s lease timeout
        time.sleep(0.5)
        answer = client.post(url, json={"lease_token": granted["lease_token"]}, headers=WORKER)
        assert answer.json() == {"action": "continue", "reason": None}
        client.app.state.service.reap()  # type: ignore[attr-defined]
    assert client.post("/v1/studies/beat/cancel", headers=ADMIN).json()["state"] == "cancelled"
    answer = client.post(url, json={"lease_token": granted["lease_token"]}, headers=WORKER)
    assert answer.json()["action"] == "stop"
    assert lease(client) is None


def test_stop_lets_running_trials_finish(client: TestClient) -> None:
    create(client, name="stopping")
    granted = lease(client)
    assert granted is not None
    assert client.post("/v1/studies/stopping/stop", headers=ADMIN).json()["state"] == "stopped"
    assert lease(client, "late") is None
    assert complete(client, granted, 3.0).status_code == 200


def test_report_stores_intermediate_values_and_prunes(
    client: TestClient, database_url: str
) -> None:
    create(
        client,
        name="prune",
        budget={"n_trials": 3, "max_concurrent": 1},
        pruner={"name": "median", "n_startup_trials": 1, "n_warmup_steps": 0, "phase_aware": False},
    )

    def report(granted: dict[str, Any], epoch: int, value: float) -> str:
        response = client.post(
            f"/v1/trials/{granted['trial_id']}/report",
            json={
                "lease_token": granted["lease_token"],
                "epoch": epoch,
                "value": value,
                "metrics": {"val_kl": 2.0, "kl_per_dim": [0.5, 1.5]},
            },
            headers=WORKER,
        )
        assert response.status_code == 200, response.text
        return str(response.json()["action"])

    good = lease(client)
    assert good is not None
    assert [report(good, e, 100.0 - e) for e in (1, 2, 3)] == ["continue"] * 3
    assert report(good, 3, 97.0) == "continue"  # a repeated epoch is not re-stored
    assert complete(client, good, 97.0).status_code == 200
    bad = lease(client)
    assert bad is not None
    assert report(bad, 1, 500.0) == "prune"
    pruned = client.post(
        f"/v1/trials/{bad['trial_id']}/fail",
        json={"lease_token": bad["lease_token"], "reason": "pruned", "pruned": True},
        headers=WORKER,
    )
    assert pruned.json()["state"] == "pruned"
    study = optuna.load_study(study_name="prune", storage=database_url)
    first, second = study.trials[0], study.trials[1]
    assert first.intermediate_values == {1: 99.0, 2: 98.0, 3: 97.0}
    assert first.user_attrs["metrics"]["x"] == 1.0
    assert second.state == optuna.trial.TrialState.PRUNED
    assert second.user_attrs["metrics"]["kl_per_dim"] == [0.5, 1.5]


def test_worker_restart_gets_its_own_trial_back(client: TestClient) -> None:
    create(client, name="resume")
    granted = lease(client, "gpu-0")
    again = lease(client, "gpu-0")
    assert granted is not None and again is not None
    assert again["trial_id"] == granted["trial_id"]
    assert again["lease_token"] == granted["lease_token"]


def test_enqueued_configurations_go_first(client: TestClient) -> None:
    create(client, name="enq")
    params = {
        "base_lr": 0.0005,
        "batch_size": 64,
        "lr_policy": "constant",
        "kl_schedule": "linear",
        "kl_warmup_epochs": 1.0,
    }
    response = client.post("/v1/studies/enq/enqueue", json={"params": [params]}, headers=ADMIN)
    assert response.json() == {"enqueued": 1}
    granted = lease(client)
    assert granted is not None
    assert granted["config"]["base_lr"] == 0.0005 and granted["config"]["batch_size"] == 64
    bad = client.post(
        "/v1/studies/enq/enqueue", json={"params": [{"batch_size": 100}]}, headers=ADMIN
    )
    assert bad.status_code == 422 and "batch_size" in bad.json()["error"]["details"][0]["field"]


def test_fairness_across_studies(client: TestClient) -> None:
    create(client, name="one", budget={"n_trials": 5, "max_concurrent": 5})
    create(client, name="two", budget={"n_trials": 5, "max_concurrent": 5})
    studies = [lease(client, f"w{i}")["study"] for i in range(4)]  # type: ignore[index]
    assert sorted(studies) == ["one", "one", "two", "two"]


def test_multi_objective_study_has_a_pareto_front(client: TestClient) -> None:
    create(
        client,
        name="pareto",
        objectives=[{"metric": "val_neg_elbo"}, {"metric": "active_units"}],
        budget={"n_trials": 3, "max_concurrent": 3},
    )
    results = [(100.0, 2.0), (90.0, 1.0), (110.0, 1.0)]
    for index, values in enumerate(results):
        granted = lease(client, f"w{index}")
        assert granted is not None and granted["report_metric"] is None
        response = client.post(
            f"/v1/trials/{granted['trial_id']}/complete",
            json={"lease_token": granted["lease_token"], "values": list(values)},
            headers=WORKER,
        )
        assert response.status_code == 200, response.text
    info = client.get("/v1/studies/pareto", headers=VIEWER).json()
    assert info["directions"] == ["minimize", "maximize"]
    front = sorted(tuple(t["values"]) for t in info["best_trials"])
    assert front == [(90.0, 1.0), (100.0, 2.0)]


def test_delete_removes_the_study(client: TestClient, database_url: str) -> None:
    create(client, name="gone")
    assert client.delete("/v1/studies/gone", headers=ADMIN).status_code == 204
    assert client.get("/v1/studies/gone", headers=VIEWER).status_code == 404
    assert optuna.get_all_study_names(database_url) == []


def test_trials_are_paginated(client: TestClient) -> None:
    create(client, name="pages", budget={"n_trials": 5, "max_concurrent": 5})
    for index in range(5):
        assert lease(client, f"w{index}") is not None
    page = client.get("/v1/studies/pages/trials?offset=2&limit=2", headers=VIEWER).json()
    assert page["total"] == 5
    assert [t["number"] for t in page["trials"]] == [2, 3]
    assert page["trials"][0]["worker_id"] == "w2"


def test_open_non_loopback_server_refuses_to_start(database_url: str) -> None:
    from hpo_service.app import create_app
    from hpo_service.config import Settings

    with pytest.raises(ValueError, match="HPO_TOKENS"):
        create_app(Settings(database_url=database_url, host="0.0.0.0"))
