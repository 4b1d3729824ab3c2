"""The batched lease's ``kinds`` (issue 12): a task (an LR range test, a final evaluation) comes
through ``POST /v1/batch/leases`` alone, held by the first slot, for a worker that lists its kind;
a request without ``kinds`` leases trials only, as before. And a real population worker process
runs a study's LR range test, then its trials, without one single ``POST /v1/leases``.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from helpers import ADMIN, TINY_FIXED, VIEWER, WORKER, spec
from prometheus_client.parser import text_string_to_metric_families
from test_e2e import server  # noqa: F401  (the live `hpo serve` fixture)
from test_population_worker import start_population_worker

LR_TEST = {"enabled": True, "start_lr": 1e-5, "end_lr": 1e-2, "num_iter": 10}
EVERY_KIND = ["trial", "lr_range_test", "final_evaluation"]


def create(client: TestClient | httpx.Client, **overrides: Any) -> None:
    response = client.post("/v1/studies", json=spec(**overrides), headers=ADMIN)
    assert response.status_code == 201, response.text


def batch_lease(client: TestClient, **body: Any) -> dict[str, Any]:
    response = client.post("/v1/batch/leases", json={"wait_s": 0, **body}, headers=WORKER)
    assert response.status_code == 200, response.text
    answer: dict[str, Any] = response.json()
    return answer


def test_a_batched_lease_with_kinds_gets_the_pending_lr_range_test_alone(
    client: TestClient,
) -> None:
    create(client, name="probe", budget={"n_trials": 4, "max_concurrent": 4}, lr_range_test=LR_TEST)
    slots = ["box/0", "box/1", "box/2"]
    # Without kinds: trials only, so nothing (the test must go first), and work may come.
    plain = batch_lease(client, worker_id="box", count=3, slots=slots)
    assert plain == {"leases": [], "idle": False}
    answer = batch_lease(client, worker_id="box", count=3, slots=slots, kinds=EVERY_KIND)
    [lease] = answer["leases"]  # alone: no trial may be sampled before the test's ranges
    assert lease["kind"] == "lr_range_test"
    assert lease["worker_id"] == "box/0"
    assert lease["task"]["num_iter"] == 10
    # The slot that holds it gets it back; the others get nothing while it runs.
    again = batch_lease(client, worker_id="box", count=3, slots=slots, kinds=EVERY_KIND)
    assert [(x["trial_id"], x["kind"]) for x in again["leases"]] == [
        (lease["trial_id"], "lr_range_test")
    ]
    others = batch_lease(client, worker_id="other", count=2, kinds=EVERY_KIND)
    assert others == {"leases": [], "idle": False}


def test_a_task_is_not_leased_beside_trials_of_another_study(client: TestClient) -> None:
    """Study ``a`` goes first (the fairness order: neither was served yet, lower id first) and
    gives the trials its concurrency cap allows; ``b``'s pending test is not added beside them.
    The next request serves ``b`` first and gets its test alone, although ``a`` could give
    one more trial then."""
    create(client, name="a", budget={"n_trials": 8, "max_concurrent": 2})
    create(client, name="b", budget={"n_trials": 4, "max_concurrent": 4}, lr_range_test=LR_TEST)
    first = batch_lease(client, worker_id="w1", count=3, kinds=EVERY_KIND)["leases"]
    assert [(x["study"], x["kind"]) for x in first] == [("a", "trial"), ("a", "trial")]
    done = {"lease_token": first[0]["lease_token"], "values": [100.0], "metrics": {}}
    response = client.post(f"/v1/trials/{first[0]['trial_id']}/complete", json=done, headers=WORKER)
    assert response.status_code == 200, response.text
    second = batch_lease(client, worker_id="w2", count=3, kinds=EVERY_KIND)["leases"]
    assert [(x["study"], x["kind"]) for x in second] == [("b", "lr_range_test")]
    # Asked again, the holder gets its running task back, still alone.
    again = batch_lease(client, worker_id="w2", count=3, kinds=EVERY_KIND)["leases"]
    assert [x["trial_id"] for x in again] == [second[0]["trial_id"]]
    # Without the task kinds the same request is a's trial.
    third = batch_lease(client, worker_id="w3", count=3)["leases"]
    assert [(x["study"], x["kind"]) for x in third] == [("a", "trial")]


def test_a_batched_lease_with_kinds_takes_the_final_evaluation_step(client: TestClient) -> None:
    """Once the budget is spent, a batched lease listing ``final_evaluation`` takes the study's
    last step; one without ``kinds`` does not. No best model is kept here (the trial is
    completed by hand), so the step is to record the evaluation as skipped rather than to
    hand out the task (the population test in ``test_population_worker`` leases the task
    itself through this route)."""
    create(
        client,
        name="ended",
        budget={"n_trials": 1, "max_concurrent": 1},
        final_evaluation={"enabled": True, "top_k": 1, "k": 4},
    )
    [trial] = batch_lease(client, worker_id="w", count=2)["leases"]
    done = {"lease_token": trial["lease_token"], "values": [100.0], "metrics": {}}
    response = client.post(f"/v1/trials/{trial['trial_id']}/complete", json=done, headers=WORKER)
    assert response.status_code == 200, response.text

    def evaluation() -> dict[str, Any]:
        info = client.get("/v1/studies/ended", headers=VIEWER).json()
        return dict(info["final_evaluation"])

    # Trials only: nothing, and no work may come for such a worker.
    assert batch_lease(client, worker_id="w", count=2) == {"leases": [], "idle": True}
    assert evaluation() == {"status": "pending"}
    answer = batch_lease(client, worker_id="w", count=2, kinds=EVERY_KIND)
    assert answer == {"leases": [], "idle": True}
    assert evaluation()["status"] == "skipped", evaluation()


def requests_by_route(url: str) -> dict[str, float]:
    """POST requests the server counted per route template, every status together."""
    text = httpx.get(f"{url}/metrics", headers=VIEWER, timeout=30).text
    counts: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name != "hpo_http_request_duration_seconds_count":
                continue
            if sample.labels.get("method") == "POST":
                route = sample.labels["route"]
                counts[route] = counts.get(route, 0.0) + sample.value
    return counts


@pytest.mark.slow
@pytest.mark.timeout(900)  # a bound for a loaded 2-core machine; the waits are on conditions
def test_a_population_worker_runs_the_lr_range_test_then_trials_without_a_single_lease(
    server: str,  # noqa: F811
    tmp_path: Path,
) -> None:
    http = httpx.Client(base_url=server, headers=ADMIN, timeout=30)
    body = spec(
        name="poptask",
        budget={"n_trials": 2, "max_concurrent": 2},
        pruner={"name": "none"},
        fixed={**TINY_FIXED, "batch_size": 128},
        epochs=2,
        lr_range_test=LR_TEST,
    )
    assert http.post("/v1/studies", json=body).status_code == 201
    worker = start_population_worker(server, "pop", tmp_path, "2")
    try:
        worker.wait(timeout=600)  # --exit-when-idle: once the study has ended
    except subprocess.TimeoutExpired:
        worker.kill()
        raise
    log = (tmp_path / "pop.log").read_text()
    assert worker.returncode == 0, log
    info = http.get("/v1/studies/poptask").json()
    assert info["lr_range_test"]["status"] == "applied", info["lr_range_test"]
    trials = http.get("/v1/studies/poptask/trials").json()["trials"]
    assert trials[0]["worker_id"] == "pop/0" and trials[0]["state"] == "fail", trials[0]  # the test
    searched = trials[1:]
    assert len(searched) == 2 and {t["state"] for t in searched} <= {"complete", "pruned"}, trials
    counts = requests_by_route(server)
    assert counts.get("/v1/batch/leases", 0) >= 2, counts  # the task's round, then the trials'
    assert counts.get("/v1/leases", 0) == 0, counts  # no single lease from a population worker
