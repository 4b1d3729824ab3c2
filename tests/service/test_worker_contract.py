"""The real worker and the real trainer against the real app, through TestClient (no sockets)."""

from __future__ import annotations

from typing import Any

import optuna
from fastapi.testclient import TestClient
from helpers import ADMIN, VIEWER, spec

from hpo_service.client import HPOClient
from trainers.train import EpochMetrics, TrainResult, train
from trainers.worker import Worker, WorkerOptions


def make_worker(client: TestClient, worker_id: str = "contract", **kwargs: Any) -> Worker:
    client.headers.update({"Authorization": "Bearer worker-token"})
    options = WorkerOptions(worker_id=worker_id, wait_s=0, idle_exit_s=0, **kwargs)
    return Worker(HPOClient(client), options)


def create(client: TestClient, **overrides: Any) -> None:
    response = client.post("/v1/studies", json=spec(**overrides), headers=ADMIN)
    assert response.status_code == 201, response.text


def test_worker_trains_reports_and_completes(client: TestClient, database_url: str) -> None:
    create(
        client,
        name="contract",
        budget={"n_trials": 2, "max_concurrent": 1},
        pruner={"name": "none"},
    )
    assert make_worker(client).run() == 2
    info = client.get("/v1/studies/contract", headers=VIEWER).json()
    assert info["state"] == "completed" and info["counts"]["complete"] == 2
    study = optuna.load_study(study_name="contract", storage=database_url)
    for trial in study.trials:
        assert set(trial.intermediate_values) == {1, 2, 3}
        metrics = trial.user_attrs["metrics"]
        assert trial.value == metrics["val_neg_elbo"]  # the objective is the true −ELBO
        assert {"test_neg_elbo", "test_is_nll", "active_units"} <= set(metrics)


def test_shutdown_hands_the_trial_back_for_retry(client: TestClient) -> None:
    create(client, name="handback", budget={"n_trials": 1, "max_concurrent": 1})
    worker = make_worker(client)

    def train_then_shutdown(config: dict[str, Any], on_epoch: Any) -> TrainResult:
        worker.request_shutdown()  # as SIGTERM would, mid-run
        return train(config, on_epoch)

    worker.train_fn = train_then_shutdown
    assert worker.run() == 1
    trials = client.get("/v1/studies/handback/trials", headers=VIEWER).json()["trials"]
    assert [t["state"] for t in trials] == ["fail", "waiting"]
    assert trials[0]["intermediate_values"] == {"1": trials[0]["intermediate_values"]["1"]}
    assert trials[1]["params"] == trials[0]["params"]


def test_bad_config_fails_for_good(client: TestClient) -> None:
    # MNIST without a `data_dir` passes the spec check (the folder is the worker's business)
    # but the trainer refuses it: the trial must fail without a retry.
    create(
        client,
        name="badcfg",
        dataset="mnist",
        budget={"n_trials": 1, "max_concurrent": 1},
        fixed={"final_is_samples": 0, "device": "cpu"},
    )
    assert make_worker(client).run() == 1
    trials = client.get("/v1/studies/badcfg/trials", headers=VIEWER).json()["trials"]
    assert [t["state"] for t in trials] == ["fail"]


def test_pruned_trials_are_told_pruned(client: TestClient) -> None:
    create(
        client,
        name="pruning",
        budget={"n_trials": 2, "max_concurrent": 1},
        pruner={"name": "median", "n_startup_trials": 1, "n_warmup_steps": 0, "phase_aware": False},
    )
    worker = make_worker(client)
    runs = iter([0.0, 1e6])  # the second trial reports a terrible objective every epoch

    def scripted(config: dict[str, Any], on_epoch: Any) -> TrainResult:
        offset = next(runs)
        history = []
        for epoch in range(1, 4):
            metrics = EpochMetrics(epoch, {"val_neg_elbo": 100.0 + offset}, [0.0])
            history.append(metrics)
            if on_epoch(metrics) == "stop":
                return TrainResult({"val_neg_elbo": 100.0 + offset}, history, epoch, 1, True)
        return TrainResult({"val_neg_elbo": 100.0 + offset}, history, 3, 1, False)

    worker.train_fn = scripted
    assert worker.run() == 2
    trials = client.get("/v1/studies/pruning/trials", headers=VIEWER).json()["trials"]
    assert [t["state"] for t in trials] == ["complete", "pruned"]
    assert trials[1]["intermediate_values"] == {"1": 1e6 + 100.0}


class FlakyTransport:
    """Refuses the first ``outages`` report calls, as a restarting server would."""

    def __init__(self, client: TestClient, outages: int) -> None:
        self.client = client
        self.outages = outages
        self.refused = 0

    def request(self, method: str, url: str, **kwargs: Any) -> Any:
        import httpx

        if url.endswith("/report") and self.refused < self.outages:
            self.refused += 1
            raise httpx.ConnectError("connection refused")
        return self.client.request(method, url, **kwargs)


def test_worker_keeps_its_trial_while_the_server_is_unreachable(client: TestClient) -> None:
    create(
        client, name="outage", budget={"n_trials": 1, "max_concurrent": 1}, pruner={"name": "none"}
    )
    client.headers.update({"Authorization": "Bearer worker-token"})
    flaky = FlakyTransport(client, outages=3)
    worker = Worker(
        HPOClient(flaky),  # type: ignore[arg-type]
        WorkerOptions(worker_id="flaky", wait_s=0, idle_exit_s=0),
    )
    assert worker.run() == 1
    assert flaky.refused == 3
    trials = client.get("/v1/studies/outage/trials", headers=VIEWER).json()["trials"]
    assert [t["state"] for t in trials] == ["complete"]  # the same trial, not a retry
    assert set(trials[0]["intermediate_values"]) == {"1", "2", "3"}
