"""The final evaluation of the winners (issue 14.4): once a study has ended, one
``final_evaluation`` task is leased to a worker, which re-evaluates the best trials from their
kept best models (IS-NLL with the spec's ``k`` on the full test split) and sends the results;
the study stores them and ``hpo best`` shows them. Bad settings are 422."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import optuna
import pytest
from fastapi.testclient import TestClient
from helpers import ADMIN, TINY_FIXED, TOKENS, VIEWER, WORKER, spec
from live import LiveServer
from typer.testing import CliRunner

from hpo_service.cli import app
from hpo_service.client import HPOClient, NoWork
from hpo_service.config import Settings
from trainers.data import load_dataset
from trainers.run_setup import parse_config
from trainers.worker import Worker, WorkerOptions

K = 8  # small: the test is about the protocol, not the estimate's precision


@pytest.fixture
def live(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[tuple[str, str]]:
    database_url = f"sqlite:///{tmp_path / 'final.db'}"
    settings = Settings(
        database_url=database_url,
        artifact_dir=tmp_path / "artifacts",
        tokens=TOKENS,  # type: ignore[arg-type]
        heartbeat_interval_s=0.5,
        lease_timeout_s=30,
        run_scheduler=False,
        best_models_kept=request.param,
    )
    with LiveServer(settings) as server:
        yield server.url, database_url


# (top_k, HPO_BEST_MODELS_KEPT): both evaluate the best 2 of 3 trials — top_k bounds the first;
# in the second retention deleted the third-best model, which the task must leave out.
@pytest.mark.parametrize(("top_k", "live"), [(2, 3), (3, 2)], indirect=["live"])
def test_the_ended_study_leases_one_evaluation_and_hpo_best_shows_it(
    live: tuple[str, str], top_k: int
) -> None:
    url, database_url = live
    fixed = {key: value for key, value in TINY_FIXED.items() if key != "synthetic_size"}
    body = {
        "name": "final",
        "dataset": "digits",
        "epochs": 2,
        "budget": {"n_trials": 3, "max_concurrent": 1},
        "pruner": {"name": "none"},
        "fixed": fixed,
        "final_evaluation": {"enabled": True, "top_k": top_k, "k": K},
    }
    with httpx.Client(base_url=url, headers=ADMIN, timeout=30) as http:
        assert http.post("/v1/studies", json=body).status_code == 201
        with httpx.Client(base_url=url, headers=WORKER, timeout=30) as worker_http:
            options = WorkerOptions(worker_id="w", wait_s=0, idle_exit_s=0, max_trials=None)
            worker = Worker(HPOClient(worker_http), options)
            assert worker.run() == 3  # three trials, then the task (not a trial), then idle
        info = http.get("/v1/studies/final").json()
    assert info["state"] == "completed", info
    assert info["counts"]["complete"] == 3 and info["counts"]["fail"] == 0  # task not counted
    outcome = info["final_evaluation"]
    assert outcome["status"] == "complete" and outcome["k"] == K, outcome

    study = optuna.load_study(study_name="final", storage=database_url)
    *trials, task = study.trials
    assert task.user_attrs["task"] == "final_evaluation"  # leased after the study ended
    assert task.user_attrs["task_outcome"] == "complete"
    assert task.state == optuna.trial.TrialState.FAIL  # no sampler learns from it
    assert len(trials) == 3 and all(t.state.name == "COMPLETE" for t in trials)
    ranked = sorted(trials, key=lambda t: (t.values[0], t.number))
    results = outcome["results"]
    assert sorted(results) == sorted(str(t.number) for t in ranked[:2])  # the top 2 only

    n_test = len(load_dataset(parse_config(trials[0].user_attrs["config"]), _cpu()).test)
    for trial in ranked[:2]:
        result = results[str(trial.number)]
        assert result["k"] == K and result["n_examples"] == n_test  # the full test split
        assert result["best_epoch"] == int(trial.user_attrs["metrics"]["best_epoch"])
        # The kept best model, not a fresh one: IS-NLL (k = 8) bounds −log p(x) tighter than
        # the same model's test −ELBO (k = 1); an untrained VAE scored above that −ELBO when
        # the weights were left unloaded on purpose (44.6 against 29.8 nats).
        elbo = trial.user_attrs["metrics"]["test_neg_elbo"]
        assert 0 < result["test_is_nll"] < elbo, (result, elbo)

    assert _near_now(outcome["evaluated_at"])
    viewer = ["--server", url, "--token", "viewer-token"]
    shown = CliRunner().invoke(app, ["best", "final", *viewer])
    assert shown.exit_code == 0, shown.output
    assert f"final evaluation (full test split, evaluated {outcome['evaluated_at']}):" in (
        shown.output
    )
    for trial in ranked[:2]:
        line = f"trial {trial.number}: test IS-NLL {results[str(trial.number)]['test_is_nll']:.3f}"
        assert line in shown.output, shown.output
    as_json = CliRunner().invoke(app, ["best", "final", "--json", *viewer])
    assert as_json.exit_code == 0, as_json.output
    (best,) = json.loads(as_json.output)  # one objective: the best trial, with its evaluation
    assert best["number"] == ranked[0].number
    assert best["final_evaluation"] == {
        **results[str(ranked[0].number)],
        "evaluated_at": outcome["evaluated_at"],
    }


def _near_now(stamp: str) -> bool:
    """An ISO 8601 UTC time within the last hour (the test's own span, on a slow box)."""
    when = datetime.fromisoformat(stamp)
    return (
        when.utcoffset() == timedelta(0) and 0 <= (datetime.now(UTC) - when).total_seconds() < 3600
    )


KINDS = ["trial", "final_evaluation"]


def _lease(client: TestClient, worker: str, kinds: list[str] = KINDS) -> dict[str, Any] | None:
    response = client.post("/v1/leases", json={"worker_id": worker, "kinds": kinds}, headers=WORKER)
    if response.status_code == 204:
        return None
    assert response.status_code == 200, response.text
    return response.json()


def _work(client: TestClient, kinds: list[str]) -> str:
    """The ``HPO-Work`` answer of an empty lease: ``wait`` (work may come) or ``idle``."""
    response = client.post(
        "/v1/leases", json={"worker_id": "asker", "kinds": kinds}, headers=WORKER
    )
    assert response.status_code == 204, response.text
    return response.headers["HPO-Work"]


def _send(client: TestClient, task: dict[str, Any], results: list[dict[str, Any]]) -> Any:
    return client.post(
        f"/v1/trials/{task['trial_id']}/final-evaluation",
        json={"lease_token": task["lease_token"], "results": results},
        headers=WORKER,
    )


def test_a_reaped_evaluation_is_retried_with_the_same_winners(client: TestClient) -> None:
    body = spec(
        name="reaped",
        epochs=1,
        budget={"n_trials": 2, "max_concurrent": 1},
        final_evaluation={"enabled": True, "top_k": 1, "k": 2},
        max_retries=1,
    )
    assert client.post("/v1/studies", json=body, headers=ADMIN).status_code == 201
    client.headers.update(WORKER)
    options = WorkerOptions(worker_id="trainer", wait_s=0, idle_exit_s=0, max_trials=2)
    assert Worker(HPOClient(client), options).run() == 2  # stops before leasing the task
    assert _lease(client, "trials-only", ["trial"]) is None  # the study has ended
    first = _lease(client, "dies")
    assert first is not None and first["kind"] == "final_evaluation"
    (winner,) = first["task"]["winners"]
    # --exit-when-idle: a worker that runs the kind waits on the running evaluation (it may
    # be reaped and retried); one that runs trials only is idle.
    assert _work(client, KINDS) == "wait" and _work(client, ["trial"]) == "idle"
    assert first["task"]["k"] == 2
    _only_the_task_holder_gets_the_model(client, first, winner["trial_id"])
    time.sleep(2.2)  # past the 1 s lease timeout, by the database clock
    client.app.state.service.reap()  # type: ignore[attr-defined]
    reaped = _best_model(client, winner["trial_id"], first)
    assert reaped.status_code == 409 and reaped.json()["error"]["code"] == "trial_reaped"
    result = {"trial_number": winner["trial_number"], "test_is_nll": 50.0, "k": 2,
              "n_examples": 10, "best_epoch": 1}  # fmt: skip
    late = _send(client, first, [result])
    assert late.status_code == 409 and late.json()["error"]["code"] == "trial_reaped"
    retried = _lease(client, "w2")
    assert retried is not None and retried["kind"] == "final_evaluation"
    assert retried["trial_id"] != first["trial_id"] and retried["task"] == first["task"]
    info = client.get("/v1/studies/reaped", headers=VIEWER).json()
    assert info["final_evaluation"] == {"status": "pending"}

    stranger = _send(client, retried, [{**result, "trial_number": 99}])
    assert stranger.status_code == 422, stranger.text
    assert "results.0.trial_number" in stranger.text
    stored = _send(client, retried, [result])
    assert stored.status_code == 200, stored.text
    assert _send(client, retried, [result]).json() == stored.json()  # the same, once
    info = client.get("/v1/studies/reaped", headers=VIEWER).json()
    assert info["final_evaluation"]["results"] == {
        str(winner["trial_number"]): {**result, "seconds": None}
    }
    assert info["state"] == "completed" and info["counts"]["fail"] == 0
    assert _lease(client, "w3") is None  # one evaluation per study
    assert _work(client, KINDS) == "idle"


def _best_model(
    client: TestClient,
    trial_id: int,
    task: dict[str, Any] | None,
    headers: dict[str, str] = WORKER,
    token: str | None = None,
) -> httpx.Response:
    lease = {}
    if task is not None:
        lease = {
            "X-Lease-Trial": str(task["trial_id"]),
            "X-Lease-Token": token or task["lease_token"],
        }
    return client.get(f"/v1/trials/{trial_id}/best-model", headers={**headers, **lease})


def _only_the_task_holder_gets_the_model(
    client: TestClient, task: dict[str, Any], winner_id: int
) -> None:
    """A best model is what a user trained on their data: a worker token alone does not get
    it, only the live final_evaluation lease naming its trial (or an admin)."""
    held = _best_model(client, winner_id, task)
    assert held.status_code == 200, held.text
    assert held.headers["X-Checkpoint-SHA256"] and len(held.content) > 0
    assert _best_model(client, winner_id, None, ADMIN).content == held.content
    refused = {
        "no lease": (_best_model(client, winner_id, None), 403, "lease_required"),
        "a viewer": (_best_model(client, winner_id, task, VIEWER), 403, "forbidden"),
        "wrong token": (
            _best_model(client, winner_id, task, token="x" * 32),
            409,
            "lease_mismatch",
        ),
        # the task's own trial is not one of its winners
        "not named": (_best_model(client, task["trial_id"], task), 403, "lease_required"),
    }
    for why, (response, status, code) in refused.items():
        assert response.status_code == status, (why, response.text)
        assert response.json()["error"]["code"] == code, (why, response.text)


def _cpu() -> Any:
    import torch

    return torch.device("cpu")


@pytest.mark.parametrize(
    ("settings_body", "needle"),
    [
        ({"enabled": True, "k": 0}, "k"),
        ({"enabled": True, "top_k": 0}, "top_k"),
        ({"enabled": True, "top_k": 21}, "top_k"),
        ({"enabled": True, "k": 100_001}, "k"),
        ({"enabled": True, "bogus": 1}, "bogus"),
    ],
)
def test_bad_final_evaluation_settings_are_422_naming_the_field(
    client: TestClient, settings_body: dict[str, Any], needle: str
) -> None:
    body = spec(name="bad", final_evaluation=settings_body)
    response = client.post("/v1/studies", json=body, headers=ADMIN)
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    fields = [d["field"] for d in error["details"]]
    assert any("final_evaluation" in f and f.endswith(needle) for f in fields), error
    assert client.get("/v1/studies", headers=VIEWER).json() == []


def test_the_morning_report_lists_the_final_evaluation() -> None:
    from hpo_service.cli.schedules import _night_details
    from hpo_service.schemas import TrialCounts
    from hpo_service.schemas.schedules import NightReport

    outcome = {
        "status": "complete",
        "k": 5000,
        "results": {
            "4": {"trial_number": 4, "test_is_nll": 91.25, "k": 5000, "n_examples": 500,
                  "best_epoch": 7},
            "2": {"trial_number": 2, "test_is_nll": 90.5, "k": 5000, "n_examples": 500,
                  "best_epoch": 9},
        },
    }  # fmt: skip
    night = NightReport(
        date="2026-12-01", local_time="2026-12-01T02:00", study="s", kind="scheduled",
        state="completed", best_value=90.0, best_params={}, trials=TrialCounts(), drift=[],
        importances={}, importance_note=None, change_vs_best=None, regression=False,
        warm_started=0, seed=None, final_evaluation=outcome,
    )  # fmt: skip
    lines = [line for line in _night_details(night) if line.startswith("final evaluation")]
    assert lines == [  # best first
        "final evaluation: trial 2: test IS-NLL 90.500 nats (k=5000, 500 test examples, "
        "best epoch 9)",
        "final evaluation: trial 4: test IS-NLL 91.250 nats (k=5000, 500 test examples, "
        "best epoch 7)",
    ]


def test_an_sdk_loop_never_leases_a_task_and_says_what_to_do(client: TestClient) -> None:
    """The SDK and `hpo agent` train the user's code: they lease trials only, so a study
    whose LR range test is pending gives them nothing — and, rather than wait in silence,
    they say so once, naming the study and what the user does (start one hpo-worker)."""
    from hpo_service.task_watch import TaskWatch

    body = spec(name="needs-a-worker", lr_range_test={"enabled": True, "num_iter": 10})
    assert client.post("/v1/studies", json=body, headers=ADMIN).status_code == 201
    client.headers.update(WORKER)
    sdk_client = HPOClient(client)
    assert isinstance(sdk_client.next_lease("sdk", 0.0), NoWork)  # trials only: nothing yet
    watch = TaskWatch(sdk_client, after_s=0.0)
    (said,) = watch.waited()
    assert "study needs-a-worker" in said and "lr_range_test" in said
    assert "hpo-worker --exit-when-idle" in said
    assert watch.waited() == []  # once per study
    # a worker that runs tasks gets the probe at once
    lease = sdk_client.next_lease("hpo-worker", 0.0, kinds=["trial", "lr_range_test"])
    assert not isinstance(lease, NoWork) and lease.kind == "lr_range_test"
