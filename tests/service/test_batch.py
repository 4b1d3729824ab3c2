"""The batched worker routes over real HTTP: caps exact under concurrency (one server on
SQLite, two replicas on one PostgreSQL), no double lease, exactly-once completion, per-trial
answers with the single routes' rules, diverse TPE batches."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from contextlib import ExitStack
from typing import Any

import httpx
import pytest
from helpers import ADMIN, WORKER, spec
from live import LiveServer

from hpo_service.client import HPOClient
from hpo_service.config import Settings
from hpo_service.schemas import TrialComplete, TrialFail, TrialReport

N_CLIENTS = 6
N_TRIALS = 36
MAX_CONCURRENT = 10
BATCH = 4


@pytest.fixture
def servers(settings: Settings, database_url: str) -> Iterator[list[str]]:
    """One server on SQLite (one writer process by design); two replicas on PostgreSQL."""
    patient = settings.model_copy(update={"lease_timeout_s": 60.0, "heartbeat_interval_s": 10.0})
    replicas = 1 if database_url.startswith("sqlite") else 2
    with ExitStack() as stack:
        yield [stack.enter_context(LiveServer(patient)).url for _ in range(replicas)]


def _client(url: str) -> HPOClient:
    return HPOClient(httpx.Client(base_url=url, headers=WORKER, timeout=120))


def _create(url: str, name: str, **overrides: Any) -> None:
    with httpx.Client(base_url=url, headers=ADMIN, timeout=60) as admin:
        created = admin.post("/v1/studies", json=spec(name, **overrides))
        assert created.status_code == 201, created.text


def _counts(url: str, name: str) -> dict[str, int]:
    with httpx.Client(base_url=url, headers=ADMIN, timeout=60) as admin:
        counts: dict[str, int] = admin.get(f"/v1/studies/{name}").json()["counts"]
    return counts


def test_concurrent_batched_workers_keep_every_cap_and_complete_each_trial_once(
    servers: list[str],
) -> None:
    _create(
        servers[0],
        "pop",
        budget={"n_trials": N_TRIALS, "max_concurrent": MAX_CONCURRENT},
        sampler={"name": "random", "seed": 2},
    )
    held: dict[int, str] = {}  # trial id -> worker holding it, as the clients see it
    leased: list[tuple[int, str]] = []
    completed: list[int] = []
    problems: list[str] = []
    lock = threading.Lock()

    def worker(index: int) -> None:
        name = f"pop-{index}"
        client = _client(servers[index % len(servers)])  # clients alternate between replicas
        idle = 0
        while idle < 3 and not problems:
            leases = client.lease_many(name, BATCH, wait_s=0.2)
            if not leases:
                idle += 1
                continue
            idle = 0
            with lock:
                for lease in leases:
                    if lease.trial_id in held:
                        problems.append(f"trial {lease.trial_id} leased twice")
                    held[lease.trial_id] = name
                    leased.append((lease.trial_id, name))
                # Added after the server granted, removed before the results are sent: what
                # the clients hold never exceeds what the server counts as running.
                if len(held) > MAX_CONCURRENT:
                    problems.append(f"{len(held)} leases held at once (cap {MAX_CONCURRENT})")
                for lease in leases:
                    del held[lease.trial_id]
            results = [
                TrialComplete(
                    trial_id=lease.trial_id,
                    lease_token=lease.lease_token,
                    values=[float(lease.trial_number)],
                )
                for lease in leases
            ]
            items = client.complete_many(results)
            for item in items:
                if item.error is not None or item.answer is None:
                    problems.append(f"complete of {item.trial_id}: {item.error}")
                    continue
                with lock:
                    completed.append(item.trial_id)
        client.http.close()

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(N_CLIENTS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert problems == []
    assert len(leased) == N_TRIALS  # the budget exactly: no overrun, nothing left out
    assert len({trial_id for trial_id, _ in leased}) == N_TRIALS  # no trial leased twice
    assert sorted(completed) == sorted(trial_id for trial_id, _ in leased)
    counts = _counts(servers[0], "pop")
    assert (counts["complete"], counts["running"], counts["waiting"]) == (N_TRIALS, 0, 0)


def test_a_tpe_batch_of_sixteen_has_sixteen_distinct_parameter_sets(
    servers: list[str],
) -> None:
    url = servers[0]
    _create(
        url,
        "tpe",
        budget={"n_trials": 40, "max_concurrent": 16},
        sampler={"name": "tpe", "seed": 5, "n_startup_trials": 4},
    )
    client = _client(url)
    # Past TPE's random start-up: four finished trials, so the batch is sampled by TPE itself.
    first = client.lease_many("tpe-worker", 4)
    assert len(first) == 4
    done = client.complete_many(
        [
            TrialComplete(trial_id=lease.trial_id, lease_token=lease.lease_token, values=[v])
            for lease, v in zip(first, [120.0, 110.0, 130.0, 105.0], strict=True)
        ]
    )
    assert all(item.answer is not None for item in done)
    batch = client.lease_many("tpe-worker", 16)
    assert len(batch) == 16
    sampled = {json.dumps(lease.config, sort_keys=True) for lease in batch}
    assert len(sampled) == 16
    assert len({lease.trial_id for lease in batch}) == 16
    assert _counts(url, "tpe")["running"] == 16


def test_each_trial_of_a_batch_gets_its_own_answer_under_the_single_routes_rules(
    servers: list[str],
) -> None:
    url = servers[0]
    _create(url, "rules", budget={"n_trials": 10, "max_concurrent": 5}, max_retries=2)
    client = _client(url)
    a, b, c, d = client.lease_many("rules-worker", 4)
    # More than the concurrency cap allows: one trial more, not five.
    assert len(client.lease_many("other-worker", 5)) == 1

    beats = client.heartbeat_many([(a.trial_id, a.lease_token), (b.trial_id, "wrong")])
    assert beats[0].answer is not None and beats[0].answer.action == "continue"
    assert beats[1].error is not None and beats[1].error.code == "lease_mismatch"

    reports = client.report_many(
        [
            TrialReport(trial_id=a.trial_id, lease_token=a.lease_token, epoch=0, value=150.0),
            TrialReport(trial_id=b.trial_id, lease_token=b.lease_token, epoch=0, value=151.0),
            TrialReport(trial_id=999_999, lease_token="x", epoch=0, value=1.0),
            TrialReport(trial_id=c.trial_id, lease_token="wrong", epoch=0, value=1.0),
        ]
    )
    assert [r.trial_id for r in reports] == [a.trial_id, b.trial_id, 999_999, c.trial_id]
    assert reports[0].answer is not None and reports[0].answer.action == "continue"
    assert reports[1].answer is not None and reports[1].answer.action == "continue"
    assert reports[2].error is not None and reports[2].error.code == "trial_not_found"
    assert reports[3].error is not None and reports[3].error.code == "lease_mismatch"

    first = client.complete_many(
        [TrialComplete(trial_id=a.trial_id, lease_token=a.lease_token, values=[140.0])]
    )
    again = client.complete_many(
        [
            TrialComplete(trial_id=a.trial_id, lease_token=a.lease_token, values=[140.0]),
            TrialComplete(trial_id=b.trial_id, lease_token=b.lease_token, values=[141.0]),
        ]
    )
    assert again[0].answer == first[0].answer  # a repeat reads the stored answer
    assert again[1].answer is not None and again[1].answer.values == [141.0]
    conflict = client.complete_many(
        [TrialComplete(trial_id=a.trial_id, lease_token=a.lease_token, values=[1.0])]
    )
    assert conflict[0].error is not None and conflict[0].error.code == "result_conflict"

    failed = client.fail_many(
        [
            TrialFail(trial_id=c.trial_id, lease_token=c.lease_token, reason="OOM", retryable=True),
            TrialFail(trial_id=d.trial_id, lease_token=d.lease_token, reason="x", pruned=True),
            TrialFail(trial_id=a.trial_id, lease_token=a.lease_token, reason="late"),
        ]
    )
    assert failed[0].answer is not None and failed[0].answer.retry_trial_number is not None
    assert failed[1].answer is not None and failed[1].answer.state == "pruned"
    # A fail after complete: the trial ended, and the item says how (issue 16 item 1d).
    assert failed[2].error is not None and failed[2].error.code == "trial_finished"
    assert failed[2].error.state == "complete"
    late = client.report_many(
        [TrialReport(trial_id=c.trial_id, lease_token=c.lease_token, epoch=1, value=1.0)]
    )
    assert late[0].error is not None and late[0].error.code == "trial_finished"
    assert late[0].error.state == "fail"


def test_batched_requests_reject_a_malformed_item_naming_its_field(servers: list[str]) -> None:
    with httpx.Client(base_url=servers[0], headers=WORKER) as http:
        too_many = http.post("/v1/batch/leases", json={"worker_id": "w", "count": 0})
        assert too_many.status_code == 422
        assert too_many.json()["error"]["details"][0]["field"] == "body.count"
        bad = http.post(
            "/v1/batch/report",
            json={"reports": [{"trial_id": 1, "lease_token": "t", "epoch": -1}]},
        )
        assert bad.status_code == 422
        assert bad.json()["error"]["details"][0]["field"] == "body.reports.0.epoch"
