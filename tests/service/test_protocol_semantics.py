"""The worker protocol's answers after the trial's fate is decided (issue 16 item 1): a prune
answer ends the trial, a re-reported epoch must agree, NaN has its own code, a finished trial
says how it ended, and an empty lease answer says whether work may still come."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import optuna
from fastapi.testclient import TestClient
from helpers import ADMIN, TINY_FIXED, VIEWER, WORKER, spec
from live import LiveServer, stop

from hpo_service.config import Settings

MEDIAN = {"name": "median", "n_startup_trials": 1, "n_warmup_steps": 0, "phase_aware": False}


def create(client: TestClient, **overrides: Any) -> None:
    response = client.post("/v1/studies", json=spec(**overrides), headers=ADMIN)
    assert response.status_code == 201, response.text


def lease(client: TestClient, worker: str = "w1") -> dict[str, Any]:
    response = client.post("/v1/leases", json={"worker_id": worker}, headers=WORKER)
    assert response.status_code == 200, response.text
    return dict(response.json())


def empty_lease(client: TestClient) -> str:
    """The ``HPO-Work`` header of a lease answered with no trial."""
    response = client.post("/v1/leases", json={"worker_id": "w-empty"}, headers=WORKER)
    assert response.status_code == 204, response.text
    return str(response.headers.get("HPO-Work"))


def call(client: TestClient, granted: dict[str, Any], route: str, **body: Any) -> Any:
    return client.post(
        f"/v1/trials/{granted['trial_id']}/{route}",
        json={"lease_token": granted["lease_token"], **body},
        headers=WORKER,
    )


def trial_states(client: TestClient, name: str) -> list[str]:
    trials = client.get(f"/v1/studies/{name}/trials", headers=VIEWER).json()["trials"]
    return [t["state"] for t in trials]


def test_a_prune_answer_ends_the_trial_pruned_and_a_complete_after_it_is_409(
    client: TestClient, database_url: str
) -> None:
    create(client, name="pr", budget={"n_trials": 3, "max_concurrent": 1}, pruner=MEDIAN)
    good = lease(client)
    assert call(client, good, "report", epoch=1, value=100.0).json()["action"] == "continue"
    assert call(client, good, "complete", values=[100.0]).status_code == 200
    bad = lease(client)
    answer = call(client, bad, "report", epoch=1, value=500.0)
    assert answer.status_code == 200 and answer.json()["action"] == "prune"
    # Ended by the answer itself, before the worker says anything more.
    assert trial_states(client, "pr") == ["complete", "pruned"]
    trial = optuna.load_study(study_name="pr", storage=database_url).trials[1]
    assert trial.state == optuna.trial.TrialState.PRUNED
    assert trial.value == 500.0  # Optuna keeps a pruned trial's last intermediate value

    refused = call(client, bad, "complete", values=[1.0])
    assert refused.status_code == 409
    error = refused.json()["error"]
    assert error["code"] == "trial_finished" and error["state"] == "pruned"
    beat = call(client, bad, "heartbeat")
    assert beat.status_code == 409 and beat.json()["error"]["state"] == "pruned"
    # What the shipped workers send after a prune answer reads the stored answer.
    settled = call(client, bad, "fail", reason="pruned", pruned=True)
    assert settled.status_code == 200 and settled.json()["state"] == "pruned"
    assert trial_states(client, "pr") == ["complete", "pruned"]


def test_a_re_reported_epoch_must_carry_the_same_value(
    client: TestClient, database_url: str
) -> None:
    create(client, name="rr", budget={"n_trials": 1, "max_concurrent": 1}, pruner=MEDIAN)
    granted = lease(client)
    first = call(client, granted, "report", epoch=1, value=5.0, metrics={"kl": 1.0})
    assert first.status_code == 200
    again = call(client, granted, "report", epoch=1, value=5.0, metrics={"kl": 1.0})
    assert again.status_code == 200 and again.json() == first.json()  # an idempotent repeat
    other = call(client, granted, "report", epoch=1, value=6.0, metrics={"kl": 9.0})
    assert other.status_code == 409
    assert other.json()["error"]["code"] == "report_conflict"
    trial = optuna.load_study(study_name="rr", storage=database_url).trials[0]
    assert trial.intermediate_values == {1: 5.0}  # the first value stands
    assert trial.user_attrs["metrics"]["kl"] == 1.0  # and the refused report wrote nothing
    assert trial.state == optuna.trial.TrialState.RUNNING


def test_a_non_finite_report_value_is_invalid_value(client: TestClient) -> None:
    create(client, name="nan", budget={"n_trials": 1, "max_concurrent": 1})
    granted = lease(client)
    token = granted["lease_token"]
    for literal in ("NaN", "Infinity", "-Infinity"):
        response = client.post(
            f"/v1/trials/{granted['trial_id']}/report",
            content=f'{{"lease_token": "{token}", "epoch": 1, "value": {literal}}}',
            headers={**WORKER, "content-type": "application/json"},
        )
        assert response.status_code == 422, literal
        error = response.json()["error"]
        assert error["code"] == "invalid_value", literal
        assert error["details"][0]["field"] == "body.value"
    assert trial_states(client, "nan") == ["running"]


def test_every_call_after_complete_says_trial_finished_with_its_state(
    client: TestClient,
) -> None:
    create(client, name="done", budget={"n_trials": 1, "max_concurrent": 1})
    granted = lease(client)
    assert call(client, granted, "complete", values=[3.0]).status_code == 200
    for route, body in (
        ("heartbeat", {}),
        ("report", {"epoch": 2, "value": 3.0}),
        ("fail", {"reason": "late"}),
    ):
        response = call(client, granted, route, **body)
        assert response.status_code == 409, route
        error = response.json()["error"]
        assert (error["code"], error["state"]) == ("trial_finished", "complete"), route
    assert call(client, granted, "complete", values=[3.0]).status_code == 200  # a repeat


def test_after_a_cancel_the_worker_sends_fail_and_the_trial_ends_without_retry(
    client: TestClient,
) -> None:
    create(client, name="cx", budget={"n_trials": 2, "max_concurrent": 1})
    granted = lease(client)
    assert client.post("/v1/studies/cx/cancel", headers=ADMIN).status_code == 200
    answer = call(client, granted, "report", epoch=1, value=1.0).json()
    assert answer["action"] == "stop"
    # What the API documents for `stop`, and what the shipped workers send.
    failed = call(client, granted, "fail", reason=answer["reason"], retryable=False)
    assert failed.status_code == 200
    assert failed.json()["state"] == "fail" and failed.json()["retry_trial_number"] is None
    assert trial_states(client, "cx") == ["fail"]
    document = client.get("/v1/openapi.json", headers=VIEWER).json()
    heartbeat = document["paths"]["/v1/trials/{trial_id}/heartbeat"]["post"]["description"]
    assert "send `fail` with `retryable: false`" in " ".join(heartbeat.split())


def test_an_empty_lease_answer_tells_idle_from_wait(client: TestClient) -> None:
    assert empty_lease(client) == "idle"  # no study at all
    create(client, name="cap", budget={"n_trials": 2, "max_concurrent": 1})
    first = lease(client)
    assert empty_lease(client) == "wait"  # at its concurrency cap
    assert call(client, first, "complete", values=[1.0]).status_code == 200
    second = lease(client)
    assert empty_lease(client) == "wait"  # the budget is spent but a trial still runs
    batch = client.post("/v1/batch/leases", json={"worker_id": "b", "count": 2}, headers=WORKER)
    assert batch.json() == {"leases": [], "idle": False}
    assert call(client, second, "complete", values=[2.0]).status_code == 200
    assert empty_lease(client) == "idle"  # completed: no study can give work now
    batch = client.post("/v1/batch/leases", json={"worker_id": "b", "count": 2}, headers=WORKER)
    assert batch.json() == {"leases": [], "idle": True}
    create(client, name="held", budget={"n_trials": 2, "max_concurrent": 1})
    assert client.post("/v1/studies/held/stop", headers=ADMIN).status_code == 200
    assert empty_lease(client) == "idle"  # a stopped study gives no new trials


def test_hpo_worker_exit_when_idle_exits_0_once_the_study_is_done(tmp_path: Path) -> None:
    settings = Settings(
        database_url=f"sqlite:///{tmp_path / 'idle.db'}",
        tokens="admin:admin-token,worker:worker-token,viewer:viewer-token",  # type: ignore[arg-type]
        heartbeat_interval_s=0.5,
        lease_timeout_s=30,  # not a reaping test: a loaded box must not expire it
        run_scheduler=False,
    )
    fixed = {**TINY_FIXED, "synthetic_size": 64, "batch_size": 16, "final_is_samples": 0}
    body = spec(name="once", epochs=1, budget={"n_trials": 1, "max_concurrent": 1}, fixed=fixed)
    with LiveServer(settings) as server:
        import httpx

        created = httpx.post(f"{server.url}/v1/studies", json=body, headers=ADMIN, timeout=60)
        assert created.status_code == 201, created.text
        log = tmp_path / "worker.log"
        with log.open("wb") as out:
            worker = subprocess.Popen(
                [
                    sys.executable, "-m", "trainers.worker_cli", "--server", server.url,
                    "--token", "worker-token", "--worker-id", "idle-test", "--device", "cpu",
                    "--wait", "0.5", "--exit-when-idle",
                ],
                env={**os.environ, "OMP_NUM_THREADS": "1"},
                stdout=out,
                stderr=subprocess.STDOUT,
            )  # fmt: skip
        try:
            # Generous: a cold torch import and one tiny trial on a busy two-core machine.
            code = worker.wait(timeout=600)
        finally:
            stop(worker)
        info = httpx.get(f"{server.url}/v1/studies/once", headers=VIEWER, timeout=60).json()
    output = log.read_text(errors="replace")
    assert code == 0, output
    assert info["state"] == "completed" and info["counts"]["complete"] == 1
    assert "no study can give work now" in output


def test_the_batched_routes_follow_the_same_rules_per_item(client: TestClient) -> None:
    create(client, name="bt", budget={"n_trials": 3, "max_concurrent": 2}, pruner=MEDIAN)
    good = lease(client, "w0")
    assert call(client, good, "report", epoch=1, value=100.0).json()["action"] == "continue"
    assert call(client, good, "complete", values=[100.0]).status_code == 200
    a, b = lease(client, "wa"), lease(client, "wb")

    def item(granted: dict[str, Any], **body: Any) -> dict[str, Any]:
        return {"trial_id": granted["trial_id"], "lease_token": granted["lease_token"], **body}

    reports = [
        item(a, epoch=1, value=500.0),
        item(b, epoch=1, value=100.0),
        item(b, epoch=1, value=101.0),
        item(b, epoch=2, value=float("nan")),
    ]
    answer = client.post(
        "/v1/batch/report",
        content=json.dumps({"reports": reports}),  # NaN as JSON's NaN literal
        headers={**WORKER, "content-type": "application/json"},
    )
    assert answer.status_code == 200, answer.text
    items = answer.json()["items"]
    assert items[0]["answer"]["action"] == "prune"
    assert items[1]["answer"]["action"] == "continue"
    assert items[2]["error"]["code"] == "report_conflict"
    assert (items[3]["error"]["code"], items[3]["error"]["field"]) == ("invalid_value", "value")
    assert trial_states(client, "bt") == ["complete", "pruned", "running"]
    late = client.post(
        "/v1/batch/complete", json={"results": [item(a, values=[1.0])]}, headers=WORKER
    ).json()["items"][0]
    assert (late["error"]["code"], late["error"]["state"]) == ("trial_finished", "pruned")


def test_integers_refuse_booleans_and_the_largest_trial_id_holds(client: TestClient) -> None:
    # schemathesis (ST201): `"trial_id": false` was taken as trial 0; (ST202): the schema's
    # maximum read as a double was refused.
    def heartbeat(trial_id: Any) -> Any:
        body = {"leases": [{"trial_id": trial_id, "lease_token": "t"}]}
        return client.post("/v1/batch/heartbeat", json=body, headers=WORKER)

    refused = heartbeat(False)
    assert refused.status_code == 422
    assert refused.json()["error"]["details"][0]["field"] == "body.leases.0.trial_id"
    document = client.get("/v1/openapi.json", headers=VIEWER).json()
    maximum = document["components"]["schemas"]["TrialLease"]["properties"]["trial_id"]["maximum"]
    for accepted in (float(maximum), maximum, 7.0):
        answer = heartbeat(accepted)
        assert answer.status_code == 200, (accepted, answer.text)
        assert answer.json()["items"][0]["error"]["code"] == "trial_not_found"
    assert heartbeat(maximum + 1).status_code == 422
    # Optuna's trial ids are 32-bit INTEGERs on PostgreSQL: a larger id is refused by name,
    # not a driver error (500).
    assert maximum == 2**31 - 1
    path = client.post(f"/v1/trials/{2**40}/heartbeat", json={"lease_token": "t"}, headers=WORKER)
    assert (
        path.status_code == 422 and path.json()["error"]["details"][0]["field"] == "path.trial_id"
    )
    create(client, name="ints", budget={"n_trials": 1, "max_concurrent": 1})
    granted = lease(client)
    epoch = call(client, granted, "report", epoch=True, value=1.0)
    assert epoch.status_code == 422 and epoch.json()["error"]["details"][0]["field"] == "body.epoch"
    # And booleans refuse numbers (ST201: `"diverged": 0` was taken as false).
    flag = call(client, granted, "fail", reason="x", diverged=0)
    assert (
        flag.status_code == 422 and flag.json()["error"]["details"][0]["field"] == "body.diverged"
    )
    bad_spec = client.post("/v1/studies", json=spec(name="b", curated_starts=1), headers=ADMIN)
    assert bad_spec.status_code == 422
    assert bad_spec.json()["error"]["details"][0]["field"] == "body.curated_starts"
    assert trial_states(client, "ints") == ["running"]


def test_spec_numbers_refuse_booleans_but_keep_yaml_exponents(client: TestClient) -> None:
    # YAML 1.1 (PyYAML, `hpo submit`) reads `low: 1e-4` as the string "1e-4": still a number.
    space = {"base_lr": {"low": "1e-4", "high": 3e-3, "log": True}}
    created = client.post("/v1/studies", json=spec(name="y", search_space=space), headers=ADMIN)
    assert created.status_code == 201, created.text
    for body, field in (
        ({"search_space": {"base_lr": {"low": True, "high": 3e-3}}}, "base_lr.low"),
        ({"budget": {"n_trials": True}}, "budget.n_trials"),
        ({"pruner": {"name": "median", "patience": False}}, "pruner.patience"),
    ):
        refused = client.post("/v1/studies", json=spec(name="n", **body), headers=ADMIN)
        assert refused.status_code == 422, body
        assert field in refused.json()["error"]["details"][0]["field"], refused.text
