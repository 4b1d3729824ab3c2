"""``hpo-worker --population K`` against the real app: per-trial leases, reports and settlement,
fused training, and a SIGKILLed population worker whose K trials are each reaped and retried once.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
import typer
from fastapi.testclient import TestClient
from helpers import ADMIN, TINY_FIXED, VIEWER, spec
from test_e2e import _wait_for, server  # noqa: F401  (the live `hpo serve` fixture)

from hpo_service.client import HPOClient
from trainers import population_worker
from trainers.population_worker import auto_population
from trainers.train import parse_config
from trainers.worker import Worker, WorkerOptions
from trainers.worker_cli import parse_population


def make_worker(client: TestClient, **options: Any) -> Worker:
    client.headers.update({"Authorization": "Bearer worker-token"})
    return Worker(
        HPOClient(client), WorkerOptions(worker_id="pop", wait_s=0, idle_exit_s=0, **options)
    )


def create(client: TestClient, **overrides: Any) -> None:
    response = client.post("/v1/studies", json=spec(**overrides), headers=ADMIN)
    assert response.status_code == 201, response.text


def trials_of(client: TestClient, study: str) -> list[dict[str, Any]]:
    return list(client.get(f"/v1/studies/{study}/trials", headers=VIEWER).json()["trials"])


def test_a_population_worker_trains_k_trials_at_once_and_settles_each(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    create(
        client,
        name="pop",
        budget={"n_trials": 5, "max_concurrent": 5},
        pruner={"name": "none"},
        fixed={**TINY_FIXED, "batch_size": 128},  # one group, so the members share reports
    )
    sizes: list[int] = []
    real = population_worker.train_population

    def recording(members: Any, *args: Any, **kwargs: Any) -> Any:
        members = list(members)
        sizes.append(len(members))
        return real(members, *args, **kwargs)

    monkeypatch.setattr(population_worker, "train_population", recording)
    worker = make_worker(client, population=3)
    sent: list[tuple[str, Any]] = []
    client.event_hooks["request"].append(
        lambda request: sent.append(
            (
                request.url.path,
                json.loads(request.content or b"null")
                if request.headers.get("content-type") == "application/json"
                else None,  # a best model's bytes
            )
        )
    )
    assert worker.run() == 5
    client.event_hooks["request"].clear()
    # 3 leased at once and trained as one population; the other 2 refilled its slots
    assert sizes == [3]
    trials = trials_of(client, "pop")
    assert [t["state"] for t in trials] == ["complete"] * 5
    assert all(set(t["intermediate_values"]) == {"1", "2", "3"} for t in trials)
    # one lease identity per slot, so the server never hands a slot's trial to another slot
    assert {t["worker_id"] for t in trials} == {"pop/0", "pop/1", "pop/2"}
    # Only the batched routes (issue 12): one report request per group epoch carrying all its
    # members, one completion request for the members that ended together. The exceptions
    # (issue 14): each trial's reproducibility record, sent once when the trial starts, and its
    # best model, sent once before its completion. No single lease: the batched one lists the
    # task kinds (lr_range_test, final_evaluation) itself.
    per_trial = [p for p, _ in sent if not p.startswith("/v1/batch/")]
    assert sorted(p.rsplit("/", 1)[1] for p in per_trial) == ["best-model"] * 5 + ["record"] * 5
    assert {p for p, _ in sent if p.endswith("/best-model")} == {
        f"/v1/trials/{t['trial_id']}/best-model" for t in trials
    }
    reports = [body["reports"] for path, body in sent if path == "/v1/batch/report"]
    assert sum(len(items) for items in reports) == 5 * 3  # every member-epoch, once
    assert len(reports) < 5 * 3 and max(len(items) for items in reports) > 1
    results = [body["results"] for path, body in sent if path == "/v1/batch/complete"]
    assert sum(len(items) for items in results) == 5 and len(results) < 5
    assert "/v1/batch/fail" not in {path for path, _ in sent}


def test_a_slot_gets_its_own_running_trial_back_and_the_others_new_ones(
    client: TestClient,
) -> None:
    """The batched lease's ``slots``: one lease identity per slot, as a population worker
    refilling some slots while the others train needs."""
    create(client, name="slots", budget={"n_trials": 6, "max_concurrent": 6})
    client.headers.update({"Authorization": "Bearer worker-token"})
    api = HPOClient(client)
    first = api.lease_many("box", 2, slots=["box/0", "box/1"])
    assert [lease.worker_id for lease in first] == ["box/0", "box/1"]
    again = api.lease_many("box", 2, slots=["box/1", "box/2"])
    held = {lease.worker_id: lease.trial_id for lease in again}
    assert held["box/1"] == first[1].trial_id  # its own running trial, not a second one
    assert held["box/2"] not in {lease.trial_id for lease in first}
    owners = {t["number"]: t["worker_id"] for t in trials_of(client, "slots")}
    assert sorted(owners.values()) == ["box/0", "box/1", "box/2"]
    # Without slots every lease is held by the worker id, as before.
    plain = api.lease_many("plain", 2)
    assert [lease.worker_id for lease in plain] == ["plain", "plain"]


@pytest.mark.parametrize(
    ("body", "words"),
    [
        ({"count": 2, "slots": ["a"]}, "must hold `count` ids (got 1 for count 2)"),
        ({"count": 2, "slots": ["a", "a"]}, "must be distinct"),
    ],
)
def test_slots_that_do_not_match_count_are_a_422_naming_them(
    client: TestClient, body: dict[str, Any], words: str
) -> None:
    response = client.post(
        "/v1/batch/leases",
        json={"worker_id": "w", **body},
        headers={"Authorization": "Bearer worker-token"},
    )
    assert response.status_code == 422, response.text
    [detail] = response.json()["error"]["details"]
    assert detail["field"] == "body.slots" and words in detail["reason"]


def test_the_worker_passes_patience_to_the_population(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    create(client, name="pat", budget={"n_trials": 1, "max_concurrent": 1}, pruner={"name": "none"})
    seen: list[int | None] = []
    real = population_worker.train_population

    def recording(members: Any, *args: Any, **kwargs: Any) -> Any:
        seen.append(kwargs["patience"])
        return real(members, *args, **kwargs)

    monkeypatch.setattr(population_worker, "train_population", recording)
    assert make_worker(client, population=2, patience=7).run() == 1
    assert seen == [7]


def test_an_unfusable_trial_is_trained_alone_after_the_population(client: TestClient) -> None:
    budget = {"budget": {"n_trials": 1, "max_concurrent": 1}, "pruner": {"name": "none"}}
    create(client, name="conv", model="conv", **budget)
    create(client, name="mlp", **{**budget, "budget": {"n_trials": 2, "max_concurrent": 2}})
    sizes: list[int] = []
    worker = make_worker(client, population=3)
    alone = worker.train_fn

    def recording(config: dict[str, Any], on_epoch: Any) -> Any:
        sizes.append(0)  # a trial trained alone
        return alone(config, on_epoch)

    worker.train_fn = recording
    assert worker.run() == 3
    assert sizes == [0]  # the conv trial, alone; the two MLP trials fused
    for name, n in (("conv", 1), ("mlp", 2)):
        assert [t["state"] for t in trials_of(client, name)] == ["complete"] * n


@pytest.mark.parametrize(("value", "expected"), [("1", 1), ("16", 16), ("auto", "auto")])
def test_population_option_accepts_a_count_or_auto(value: str, expected: object) -> None:
    assert parse_population(value) == expected


@pytest.mark.parametrize("value", ["0", "-2", "many", "1.5"])
def test_population_option_names_itself_when_invalid(value: str) -> None:
    with pytest.raises(typer.BadParameter) as info:
        parse_population(value)
    assert info.value.param_hint == "--population" and repr(value) in str(info.value)


def test_auto_picks_a_power_of_two_that_fits(train_device: str) -> None:
    cfg = parse_config({**TINY_FIXED, "dataset": "synthetic", "device": train_device})
    k = auto_population(cfg, steps=2)
    assert k in {1, 2, 4, 8, 16, 32, 64}
    conv = parse_config({**TINY_FIXED, "dataset": "synthetic", "model": "conv", "device": "cpu"})
    assert auto_population(conv) == 1


# --- a real server, a real worker process, a real SIGKILL ---------------------------------------


def start_population_worker(url: str, worker_id: str, tmp_path: Path, population: str) -> Any:
    log = (tmp_path / f"{worker_id}.log").open("wb")
    # --exit-when-idle, not a fixed idle time: a rescuer waits while orphans are still RUNNING
    # (they may be reaped and retried), however long a loaded machine takes to reap them.
    return subprocess.Popen(
        [sys.executable, "-m", "trainers.worker_cli", "--server", url, "--token", "worker-token",
         "--worker-id", worker_id, "--device", "cpu", "--wait", "1", "--exit-when-idle",
         "--population", population],
        env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip


@pytest.mark.slow
@pytest.mark.timeout(900)  # a bound for a loaded 2-core machine; the waits are on conditions
def test_a_sigkilled_population_worker_leaves_k_trials_each_retried_once(
    server: str,  # noqa: F811
    tmp_path: Path,
) -> None:
    http = httpx.Client(base_url=server, headers=ADMIN, timeout=30)
    body = {
        "name": "popkill",
        "dataset": "synthetic",
        "epochs": 4,
        "budget": {"n_trials": 3, "max_concurrent": 3},
        "pruner": {"name": "none"},
        # Big enough that an epoch lasts a while, so the kill lands mid-run.
        "fixed": {**TINY_FIXED, "synthetic_size": 2048, "batch_size": 16},
    }
    assert http.post("/v1/studies", json=body).status_code == 201
    doomed = start_population_worker(server, "doomed", tmp_path, "3")

    def three_running_with_an_epoch() -> list[dict[str, Any]] | None:
        trials = http.get("/v1/studies/popkill/trials").json()["trials"]
        running = [t for t in trials if t["state"] == "running"]
        if len(running) == 3 and all(t["intermediate_values"] for t in running):
            return running
        return None

    orphans = _wait_for(three_running_with_an_epoch, 300, "3 fused trials to report an epoch")
    assert {t["worker_id"] for t in orphans} == {"doomed/0", "doomed/1", "doomed/2"}
    doomed.send_signal(signal.SIGKILL)
    doomed.wait(timeout=10)

    rescuer = start_population_worker(server, "rescuer", tmp_path, "3")

    def finished() -> dict[str, Any] | None:
        # Not the study's state: between the reaper failing a trial and queueing its retry the
        # study reads "completed" for a moment (seen here once, with 0 trials complete).
        info = http.get("/v1/studies/popkill").json()
        return info if info["counts"]["complete"] == 3 else None

    try:
        info = _wait_for(finished, 500, "the study to complete")
    finally:
        rescuer.wait(timeout=60)
    logs = {p.name: p.read_text() for p in tmp_path.glob("*.log")}
    assert rescuer.returncode == 0, logs
    trials = http.get("/v1/studies/popkill/trials").json()["trials"]
    by_number = {t["number"]: t for t in trials}
    for orphan in orphans:
        assert by_number[orphan["number"]]["state"] == "fail"  # reaped
        retries = [t for t in trials if t["retry_of"] == orphan["number"]]
        assert len(retries) == 1, retries  # retried exactly once
        assert retries[0]["state"] == "complete"
        assert retries[0]["params"] == orphan["params"]
    assert info["counts"]["running"] == info["counts"]["waiting"] == 0, info
    assert http.get("/v1/studies/popkill").json()["state"] == "completed"
    completed = {t["worker_id"] for t in trials if t["state"] == "complete"}
    assert completed <= {"rescuer/0", "rescuer/1", "rescuer/2"}


def test_a_population_worker_alone_runs_the_lr_range_test_and_the_final_evaluation(
    client: TestClient,
) -> None:
    """A population worker is often a study's only worker: it runs the study's first step
    (the LR range test) and its last (the final evaluation of the winners, issue 14.4) itself,
    and its members keep the best models the evaluation reads. Both tasks come through its
    batched lease, which lists their kinds: it sends no single ``POST /v1/leases``."""
    create(
        client,
        name="alone",
        budget={"n_trials": 3, "max_concurrent": 3},
        pruner={"name": "none"},
        fixed={**TINY_FIXED, "batch_size": 128},
        lr_range_test={"enabled": True, "start_lr": 1e-5, "end_lr": 1e-2, "num_iter": 10},
        final_evaluation={"enabled": True, "top_k": 2, "k": 4},
    )
    worker = make_worker(client, population=3)
    paths: list[str] = []
    client.event_hooks["request"].append(lambda request: paths.append(request.url.path))
    assert worker.run() == 3  # tasks are not counted as trials
    client.event_hooks["request"].clear()
    assert "/v1/leases" not in paths and "/v1/batch/leases" in paths, sorted(set(paths))
    info = client.get("/v1/studies/alone", headers=VIEWER).json()
    assert info["lr_range_test"]["status"] == "applied", info["lr_range_test"]
    outcome = info["final_evaluation"]
    assert outcome["status"] == "complete", outcome
    every = trials_of(client, "alone")
    assert every[0]["state"] == "fail" and every[-1]["state"] == "fail"  # the two tasks
    trials = [t for t in every if t["state"] == "complete"]
    assert len(trials) >= 2, every  # a sampled LR may still diverge (pruned); two suffice
    ranked = sorted(trials, key=lambda t: (t["values"][0], t["number"]))
    assert sorted(outcome["results"]) == sorted(str(t["number"]) for t in ranked[:2])
    for trial in ranked[:2]:
        result = outcome["results"][str(trial["number"])]
        assert result["k"] == 4 and result["test_is_nll"] > 0
        # the member's own best model: the epoch it selected
        assert result["best_epoch"] == int(trial["metrics"]["best_epoch"]), (result, trial)
