"""The final evaluation (test −ELBO and IS-NLL) is timed apart from training (issue 10): the
real worker and the real trainer against the real app, through TestClient."""

from __future__ import annotations

import logging

import pytest
from fastapi.testclient import TestClient
from helpers import ADMIN, VIEWER, spec

from hpo_service.client import HPOClient
from trainers.worker import Worker, WorkerOptions


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)  # the backend is not the point
def test_final_evaluation_time_is_reported_apart_from_training(
    client: TestClient, caplog: pytest.LogCaptureFixture, train_device: str
) -> None:
    body = spec(
        "timed",
        epochs=1,
        budget={"n_trials": 1, "max_concurrent": 1},
        pruner={"name": "none"},
        fixed={**spec()["fixed"], "device": train_device, "final_is_samples": 64},
    )
    assert client.post("/v1/studies", json=body, headers=ADMIN).status_code == 201
    client.headers.update({"Authorization": "Bearer worker-token"})
    worker = Worker(HPOClient(client), WorkerOptions("timed", wait_s=0, idle_exit_s=0))
    with caplog.at_level(logging.INFO, logger="hpo.worker"):
        assert worker.run() == 1
    [finished] = [r for r in caplog.records if getattr(r, "event", None) == "trial_finished"]
    timings = {key: float(getattr(finished, key)) for key in ("eval_s", "train_s", "settle_s")}
    assert timings["eval_s"] > 0 and timings["train_s"] > 0
    # The parts add up to the whole: evaluation is not also counted as training.
    assert sum(timings.values()) == pytest.approx(float(finished.wall_s))  # type: ignore[attr-defined]
    eval_s = timings["eval_s"]
    assert "final eval" in finished.getMessage()
    [trial] = client.get("/v1/studies/timed/trials", headers=VIEWER).json()["trials"]
    assert trial["metrics"]["final_eval_seconds"] == pytest.approx(eval_s)
