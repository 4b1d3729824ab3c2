"""16 concurrent HTTP workers against a real uvicorn server, on SQLite and PostgreSQL."""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Iterator

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
def server(settings: Settings) -> Iterator[LiveServer]:
    with LiveServer(settings) as live:
        yield live


def test_concurrent_lease_and_complete(server: LiveServer, database_url: str) -> None:
    with httpx.Client(base_url=server.url, headers=ADMIN) as admin:
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
        with httpx.Client(base_url=server.url, headers=WORKER, timeout=60) as http:
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
