"""16 concurrent HTTP workers against real uvicorn servers: one on SQLite, two replicas sharing
one PostgreSQL (each with its own process locks, so only the database lock keeps the budget)."""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import ExitStack

import httpx
import optuna
import pytest
from helpers import ADMIN, WORKER, spec
from live import LiveServer

from hpo_service.config import Settings

N_CLIENTS = 16
N_TRIALS = 40
MAX_CONCURRENT = 8


@pytest.fixture
def servers(settings: Settings, database_url: str) -> Iterator[list[str]]:
    """One server on SQLite (one writer process by design); two replicas on PostgreSQL."""
    replicas = 1 if database_url.startswith("sqlite") else 2
    with ExitStack() as stack:
        yield [stack.enter_context(LiveServer(settings)).url for _ in range(replicas)]


def test_concurrent_lease_and_complete(servers: list[str], database_url: str) -> None:
    with httpx.Client(base_url=servers[0], headers=ADMIN) as admin:
        body = spec(
            name="race",
            budget={"n_trials": N_TRIALS, "max_concurrent": MAX_CONCURRENT},
            sampler={"name": "random", "seed": 1},
        )
        assert admin.post("/v1/studies", json=body).status_code == 201

    leased: list[int] = []
    errors: list[str] = []
    lock = threading.Lock()

    def worker(index: int) -> None:
        url = servers[index % len(servers)]  # clients alternate between replicas
        with httpx.Client(base_url=url, headers=WORKER, timeout=60) as http:
            idle = 0
            while idle < 3:
                response = http.post("/v1/leases", json={"worker_id": f"w{index}", "wait_s": 0.2})
                if response.status_code == 204:
                    idle += 1
                    continue
                if response.status_code != 200:
                    errors.append(f"lease {response.status_code} {response.text}")
                    return
                idle = 0
                granted = response.json()
                with lock:
                    leased.append(granted["trial_id"])
                time.sleep(0.02)  # hold the trial so leases overlap
                value = float(granted["trial_number"])
                done = http.post(
                    f"/v1/trials/{granted['trial_id']}/complete",
                    json={"lease_token": granted["lease_token"], "values": [value]},
                )
                if done.status_code != 200:
                    errors.append(f"complete {done.status_code} {done.text}")

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(N_CLIENTS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=240)
    assert not any(thread.is_alive() for thread in threads)
    assert errors == []
    duplicates = [t for t, n in Counter(leased).items() if n > 1]
    assert duplicates == []  # no trial leased twice
    assert len(leased) == N_TRIALS
    study = optuna.load_study(study_name="race", storage=database_url)
    states = Counter(t.state for t in study.trials)
    assert len(study.trials) == N_TRIALS  # the budget is never exceeded
    assert states == {optuna.trial.TrialState.COMPLETE: N_TRIALS}  # none left RUNNING


def test_a_burst_of_leases_never_exceeds_the_budget(servers: list[str], database_url: str) -> None:
    """16 clients ask at the same instant, round after round, for a 3-trial study."""
    rounds, budget = 5, 3
    with httpx.Client(base_url=servers[0], headers=ADMIN) as admin:
        for round_ in range(rounds):
            body = spec(
                name=f"burst{round_}",
                sampler={"name": "random", "seed": round_},
                budget={"n_trials": budget, "max_concurrent": budget},
            )
            assert admin.post("/v1/studies", json=body).status_code == 201
            barrier = threading.Barrier(N_CLIENTS)
            granted: list[str] = []

            def ask(
                index: int, barrier: threading.Barrier = barrier, granted: list[str] = granted
            ) -> None:
                url = servers[index % len(servers)]
                with httpx.Client(base_url=url, headers=WORKER, timeout=60) as http:
                    barrier.wait()
                    response = http.post("/v1/leases", json={"worker_id": f"b{index}"})
                    if response.status_code == 200:
                        granted.append(response.json()["study"])

            threads = [threading.Thread(target=ask, args=(i,)) for i in range(N_CLIENTS)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(timeout=120)
            assert granted.count(f"burst{round_}") == budget
            # Finish nothing: stop the study so the next round's clients only see the new one.
            assert admin.post(f"/v1/studies/burst{round_}/stop").status_code == 200
    for round_ in range(rounds):
        study = optuna.load_study(study_name=f"burst{round_}", storage=database_url)
        assert len(study.trials) == budget
