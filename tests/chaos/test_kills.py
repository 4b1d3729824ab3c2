"""SIGKILLed workers and a SIGKILLed server, as real processes on 127.0.0.1 (issue 13).

Bounds are waited on, never asserted as durations; each test prints what it measured so the
README's "Failure behaviour" figures come from this suite.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from helpers import ADMIN, spec
from live import free_port
from processes import STALE_BOUND_S, ProtocolWorker, Server, study_info, trials, wait_for

pytestmark = pytest.mark.slow


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    started = Server(f"sqlite:///{tmp_path / 'hpo.db'}", free_port(), tmp_path).start()
    try:
        yield started
    finally:
        started.stop()


def _create(url: str, **overrides: Any) -> None:
    body = spec(name="chaos", pruner={"name": "none"}, **overrides)
    response = httpx.post(f"{url}/v1/studies", json=body, headers=ADMIN, timeout=30)
    assert response.status_code == 201, response.text


def _by_number(url: str) -> dict[int, dict[str, Any]]:
    return {t["number"]: t for t in trials(url, "chaos")}


def _finished_at(trial: dict[str, Any]) -> float:
    return datetime.fromisoformat(trial["datetime_complete"]).timestamp()


def test_a_worker_killed_mid_trial_repeatedly(server: Server, tmp_path: Path) -> None:
    _create(server.url, budget={"n_trials": 3, "max_concurrent": 1}, max_retries=3)
    orphans: list[dict[str, Any]] = []
    for kill in range(2):
        doomed = ProtocolWorker(
            server.url, f"doomed{kill}", tmp_path, "--epochs", "50", "--epoch-s", "0.2"
        )

        def mid_trial(worker_id: str = doomed.worker_id) -> dict[str, Any] | None:
            return next(
                (
                    t
                    for t in trials(server.url, "chaos")
                    if t["state"] == "running"
                    and t["worker_id"] == worker_id
                    and t["intermediate_values"]
                ),
                None,
            )

        orphans.append(wait_for(mid_trial, 60, f"{doomed.worker_id} to report an epoch"))
        doomed.kill()
        killed_at = time.time()
        orphan = orphans[-1]["number"]
        reaped = wait_for(
            lambda n=orphan: (t := _by_number(server.url)[n])["state"] == "fail" and t,
            60,
            f"trial {orphan} to be failed",
        )
        print(f"kill {kill}: trial {orphan} failed {_finished_at(reaped) - killed_at:.1f} s later")

    healthy = ProtocolWorker(
        server.url, "healthy", tmp_path, "--epochs", "2", "--epoch-s", "0.05", "--exit-when-idle"
    )
    wait_for(lambda: study_info(server.url, "chaos")["state"] == "completed", 90, "the study")
    assert healthy.finish() == 0, healthy.records()[-5:]

    final = _by_number(server.url)
    for orphan in orphans:
        assert final[orphan["number"]]["state"] == "fail"
        retries = [t for t in final.values() if t["retry_of"] == orphan["number"]]
        assert len(retries) == 1, retries
        assert retries[0]["params"] == orphan["params"]
    counts = study_info(server.url, "chaos")["counts"]
    assert counts["complete"] == 3 and counts["running"] == 0 and counts["waiting"] == 0


def test_workers_killed_right_after_their_lease_are_all_reaped(
    server: Server, tmp_path: Path
) -> None:
    n = 4
    _create(server.url, budget={"n_trials": n, "max_concurrent": n}, max_retries=1)
    doomed = [
        ProtocolWorker(server.url, f"d{i}", tmp_path, "--after-lease", "hang") for i in range(n)
    ]
    for worker in doomed:
        wait_for(
            lambda w=worker: any(r["event"] == "leased" for r in w.records()),
            60,
            f"{worker.worker_id} to lease",
        )
    for worker in doomed:
        worker.kill()  # before its first heartbeat
    killed_at = time.time()

    def all_failed() -> list[dict[str, Any]] | None:
        first = [t for t in trials(server.url, "chaos") if t["retry_of"] is None]
        return first if all(t["state"] == "fail" for t in first) else None

    failed = wait_for(all_failed, 60, "every leased trial to be failed")
    late = [_finished_at(t) - killed_at for t in failed]
    print(f"{n} killed after lease: reaped {min(late):.1f}-{max(late):.1f} s after the kill "
          f"(bound {STALE_BOUND_S:g} s)")  # fmt: skip
    assert len(failed) == n

    def retries() -> list[dict[str, Any]] | None:
        # The reaper fails the stale set in one pass, then queues each retry: wait for those too.
        queued = [t for t in trials(server.url, "chaos") if t["retry_of"] is not None]
        return queued if len(queued) >= n else None

    waiting = wait_for(retries, 60, "every failed trial's retry to be queued")
    assert len(waiting) == n  # each one retried once, with its parameters
    assert all(t["state"] == "waiting" for t in waiting)


def test_a_server_killed_mid_sweep_and_restarted(server: Server, tmp_path: Path) -> None:
    n_trials = 6
    _create(server.url, budget={"n_trials": n_trials, "max_concurrent": 2}, max_retries=3)
    workers = [
        ProtocolWorker(
            server.url, f"w{i}", tmp_path, "--epochs", "3", "--epoch-s", "0.2", "--exit-when-idle"
        )
        for i in range(2)
    ]
    wait_for(
        lambda: study_info(server.url, "chaos")["counts"]["complete"] >= 2, 90, "two completions"
    )
    server.kill()
    server.start()  # same port, same database
    wait_for(lambda: study_info(server.url, "chaos")["state"] == "completed", 120, "the study")
    for worker in workers:
        assert worker.finish() == 0, worker.records()[-5:]

    final = trials(server.url, "chaos")
    assert sum(t["state"] == "complete" for t in final) == n_trials  # no duplicate completion
    assert not [t for t in final if t["state"] in ("running", "waiting")]
    acknowledged = {
        r["trial_id"]: r["value"] for w in workers for r in w.records() if r["event"] == "completed"
    }
    by_id = {t["trial_id"]: t for t in final}
    for trial_id, value in acknowledged.items():  # every 200 to a complete was kept
        assert by_id[trial_id]["state"] == "complete"
        assert by_id[trial_id]["values"] == [value]
    statuses = {r.get("status") for w in workers for r in w.records() if r["event"] == "answer"}
    assert not {s for s in statuses if s is not None and s >= 500 and s != 503}, statuses
