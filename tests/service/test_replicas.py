"""Two real `hpo serve` processes on one PostgreSQL database: the lease budget, the concurrency
cap, exactly-once leases and exactly-once completion hold across processes, which share nothing
but the database (each has its own process locks, caches and connection pool).

Only PostgreSQL: SQLite has one writer process by design (ARCHITECTURE.md).
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx
import optuna
import pytest
from helpers import ADMIN, TOKENS, WORKER, spec
from live import free_port, stop, wait_until_healthy

pytestmark = [
    pytest.mark.slow,
    # Generous bounds: 24 clients against two servers on a busy two-core box are slow, not broken.
    pytest.mark.timeout(900),
    # Replicas share a database; only PostgreSQL supports several writer processes.
    pytest.mark.parametrize("database_url", ["postgresql"], indirect=True),
]

N_CLIENTS = 24


def _wait_for(predicate: Callable[[], Any], timeout_s: float, what: str) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        result = predicate()
        if result:
            return result
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def start_replica(
    database_url: str, log: Path, **settings: str
) -> tuple[subprocess.Popen[bytes], str]:
    """One `hpo serve` process; returns it and its base URL once it answers /healthz. One that
    never does is stopped before the error is raised: a failed setup leaves no server behind."""
    port = free_port()
    env = {
        **os.environ,
        "HPO_DATABASE_URL": database_url,
        "HPO_TOKENS": TOKENS,
        "HPO_PORT": str(port),
        "HPO_LOG_LEVEL": "warning",
        # Two processes share the test server's connection limit with other test runs.
        "HPO_DB_POOL_SIZE": "5",
        "HPO_DB_MAX_OVERFLOW": "5",
        **{f"HPO_{key.upper()}": value for key, value in settings.items()},
    }
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "hpo_service", "serve"],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_healthy(url, lambda: process.poll() is None, f"the replica on port {port}", log)
    except BaseException:
        stop(process)
        raise
    return process, url


@pytest.fixture
def replica_settings() -> dict[str, str]:
    # Tests that do not test reaping keep the reaper off, so timing never decides an assertion.
    return {"run_reaper": "false"}


@pytest.fixture
def replicas(
    database_url: str, tmp_path: Path, replica_settings: dict[str, str]
) -> Iterator[list[str]]:
    """The base URLs of two `hpo serve` processes on the same database."""
    logs = [tmp_path / f"replica{index}.log" for index in range(2)]
    urls = []
    with ExitStack() as stack:
        for log in logs:
            process, url = start_replica(database_url, log, **replica_settings)
            stack.callback(stop, process)
            urls.append(url)
        yield urls
    for log in logs:  # a replica that crashed a request would have logged a traceback
        assert "Traceback" not in log.read_text(), log.read_text()


def create(url: str, **overrides: Any) -> None:
    response = httpx.post(f"{url}/v1/studies", json=spec(**overrides), headers=ADMIN, timeout=60)
    assert response.status_code == 201, response.text


def test_clients_of_both_replicas_share_one_budget_and_cap(
    replicas: list[str], database_url: str
) -> None:
    """24 clients, half on each process, lease and complete until the budget is spent."""
    n_trials, cap = 48, 6
    create(
        replicas[0],
        name="shared",
        budget={"n_trials": n_trials, "max_concurrent": cap},
        sampler={"name": "random", "seed": 3},
    )
    leased: list[int] = []
    errors: list[str] = []
    lock = threading.Lock()
    holding = [0, 0]  # [now, most at once], counted between a granted lease and its complete

    def client(index: int) -> None:
        with httpx.Client(base_url=replicas[index % 2], headers=WORKER, timeout=120) as http:
            idle = 0
            while idle < 3:
                response = http.post("/v1/leases", json={"worker_id": f"c{index}", "wait_s": 0.2})
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
                    holding[0] += 1
                    holding[1] = max(holding)
                time.sleep(0.02)  # hold the trial so leases overlap
                with lock:
                    holding[0] -= 1  # before complete: the server still counts it running
                done = http.post(
                    f"/v1/trials/{granted['trial_id']}/complete",
                    json={"lease_token": granted["lease_token"], "values": [1.0 * index]},
                )
                if done.status_code != 200:
                    errors.append(f"complete {done.status_code} {done.text}")

    threads = [threading.Thread(target=client, args=(i,)) for i in range(N_CLIENTS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=240)
    assert not any(thread.is_alive() for thread in threads)
    assert errors == []
    assert [t for t, n in Counter(leased).items() if n > 1] == []  # no trial leased twice
    assert len(leased) == n_trials  # every lease of the budget, and not one more
    assert holding[1] <= cap  # never more trials out at once than the cap
    study = optuna.load_study(study_name="shared", storage=database_url)
    assert len(study.trials) == n_trials
    assert Counter(t.state for t in study.trials) == {optuna.trial.TrialState.COMPLETE: n_trials}


def test_bursts_split_across_replicas_never_exceed_the_budget(
    replicas: list[str], database_url: str
) -> None:
    """16 clients, half on each process, ask at the same instant for a 3-trial study."""
    rounds, budget, n_clients = 5, 3, 16
    for round_ in range(rounds):
        name = f"burst{round_}"
        create(
            replicas[round_ % 2],
            name=name,
            sampler={"name": "random", "seed": round_},
            budget={"n_trials": budget, "max_concurrent": budget},
        )
        barrier = threading.Barrier(n_clients)
        granted: list[str] = []

        def ask(
            index: int, barrier: threading.Barrier = barrier, granted: list[str] = granted
        ) -> None:
            with httpx.Client(base_url=replicas[index % 2], headers=WORKER, timeout=120) as http:
                barrier.wait()
                response = http.post("/v1/leases", json={"worker_id": f"b{index}"})
                if response.status_code == 200:
                    granted.append(response.json()["study"])

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(n_clients)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
        assert granted.count(name) == budget
        # Finish nothing: stop the study so the next round's clients only see the new one.
        stopped = httpx.post(f"{replicas[0]}/v1/studies/{name}/stop", headers=ADMIN, timeout=60)
        assert stopped.status_code == 200
    for round_ in range(rounds):
        study = optuna.load_study(study_name=f"burst{round_}", storage=database_url)
        assert len(study.trials) == budget


def _race(replicas: list[str], calls: list[tuple[int, dict[str, Any]]], path: str) -> list[Any]:
    """POST each body to its replica at the same instant; the responses, in order."""
    barrier = threading.Barrier(len(calls))
    answers: list[Any] = [None] * len(calls)

    def send(slot: int, replica: int, body: dict[str, Any]) -> None:
        with httpx.Client(base_url=replicas[replica], headers=WORKER, timeout=120) as http:
            barrier.wait()
            answers[slot] = http.post(path, json=body)

    threads = [
        threading.Thread(target=send, args=(slot, replica, body))
        for slot, (replica, body) in enumerate(calls)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    return answers


def _lease(url: str, worker: str) -> dict[str, Any]:
    response = httpx.post(
        f"{url}/v1/leases", json={"worker_id": worker}, headers=WORKER, timeout=60
    )
    assert response.status_code == 200, response.text
    granted: dict[str, Any] = response.json()
    return granted


def test_one_result_sent_to_both_replicas_at_once_is_told_once(
    replicas: list[str], database_url: str
) -> None:
    create(replicas[0], name="once", budget={"n_trials": 2, "max_concurrent": 2})
    granted = _lease(replicas[1], "w")
    body = {"lease_token": granted["lease_token"], "values": [42.0], "metrics": {"x": 1.0}}
    path = f"/v1/trials/{granted['trial_id']}/complete"
    answers = _race(replicas, [(i % 2, body) for i in range(8)], path)
    assert [a.status_code for a in answers] == [200] * 8  # a retry gets the same answer
    assert len({a.text for a in answers}) == 1
    study = optuna.load_study(study_name="once", storage=database_url)
    (trial,) = study.trials
    assert trial.state == optuna.trial.TrialState.COMPLETE and trial.values == [42.0]


def test_different_results_sent_to_both_replicas_at_once_one_stands(
    replicas: list[str], database_url: str
) -> None:
    create(replicas[0], name="conflict", budget={"n_trials": 2, "max_concurrent": 2})
    granted = _lease(replicas[0], "w")
    token = granted["lease_token"]
    calls = [
        (i % 2, {"lease_token": token, "values": [float(i)], "metrics": {"i": i}}) for i in range(8)
    ]
    answers = _race(replicas, calls, f"/v1/trials/{granted['trial_id']}/complete")
    codes = Counter(a.status_code for a in answers)
    assert codes == {200: 1, 409: 7}
    (winner,) = [slot for slot, a in enumerate(answers) if a.status_code == 200]
    assert answers[winner].json()["values"] == [float(winner)]
    assert {a.json()["error"]["code"] for a in answers if a.status_code == 409} == {
        "result_conflict"
    }
    study = optuna.load_study(study_name="conflict", storage=database_url)
    (trial,) = study.trials
    assert trial.state == optuna.trial.TrialState.COMPLETE
    assert trial.values == [float(winner)]
    assert trial.user_attrs["metrics"] == {"i": winner}  # the winner's metrics, not a loser's


@pytest.mark.parametrize(
    "replica_settings",
    [
        {
            "run_reaper": "true",
            "reap_interval_s": "0.2",
            "heartbeat_interval_s": "0.5",
            "lease_timeout_s": "1",
        }
    ],
)
def test_both_replicas_reap_but_a_vanished_worker_is_retried_once(
    replicas: list[str], database_url: str
) -> None:
    create(replicas[0], name="reaped", budget={"n_trials": 1, "max_concurrent": 1}, max_retries=3)
    vanished = _lease(replicas[1], "gone")  # and never a heartbeat

    def states() -> Counter[str]:
        study = optuna.load_study(study_name="reaped", storage=database_url)
        return Counter(t.state.name for t in study.trials)

    _wait_for(lambda: states()["FAIL"] == 1, 300, "a replica to reap the trial")
    time.sleep(1.0)  # five more reaping rounds of each replica
    assert states() == {"FAIL": 1, "WAITING": 1}  # one retry, not one per replica
    retry = _lease(replicas[0], "next")
    assert retry["config"] == vanished["config"]
