"""End to end: a real `hpo serve` process, real `hpo-worker` processes training tiny VAEs, and a
worker killed with SIGKILL mid-trial — on SQLite and PostgreSQL."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import optuna
import pytest
from helpers import ADMIN, TINY_FIXED, TOKENS
from live import free_port

pytestmark = pytest.mark.slow

N_TRIALS = 5


def _wait_for(predicate: Any, timeout_s: float, what: str) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        result = predicate()
        if result:
            return result
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture
def server(database_url: str, tmp_path: Path) -> Iterator[str]:
    port = free_port()
    env = {
        **os.environ,
        "HPO_DATABASE_URL": database_url,
        "HPO_TOKENS": TOKENS,
        "HPO_PORT": str(port),
        "HPO_HEARTBEAT_INTERVAL_S": "0.5",
        "HPO_LEASE_TIMEOUT_S": "2",
        "HPO_REAP_INTERVAL_S": "0.5",
        "HPO_LOG_LEVEL": "warning",
    }
    log = (tmp_path / "server.log").open("wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "hpo_service", "serve"],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"

    def healthy() -> bool:
        assert process.poll() is None, (tmp_path / "server.log").read_text()
        try:
            return httpx.get(f"{url}/healthz", timeout=1).status_code == 200
        except httpx.TransportError:
            return False

    _wait_for(healthy, 60, "the server")
    yield url
    process.terminate()
    process.wait(timeout=30)


def start_worker(url: str, worker_id: str, tmp_path: Path) -> subprocess.Popen[bytes]:
    log = (tmp_path / f"{worker_id}.log").open("wb")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "trainers.worker_cli",
            "--server",
            url,
            "--token",
            "worker-token",
            "--worker-id",
            worker_id,
            "--device",
            "cpu",
            "--wait",
            "1",
            "--idle-exit",
            "6",
        ],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )


def test_two_workers_and_a_sigkill(server: str, database_url: str, tmp_path: Path) -> None:
    http = httpx.Client(base_url=server, headers=ADMIN, timeout=30)
    spec = {
        "name": "e2e",
        "dataset": "synthetic",
        "epochs": 6,
        "budget": {"n_trials": N_TRIALS, "max_concurrent": 2},
        "pruner": {"name": "none"},
        # Big enough that a trial lasts a few seconds, so the kill lands mid-trial.
        "fixed": {**TINY_FIXED, "synthetic_size": 4096, "batch_size": 16},
    }
    assert http.post("/v1/studies", json=spec).status_code == 201

    doomed = start_worker(server, "doomed", tmp_path)

    def doomed_mid_trial() -> dict[str, Any] | None:
        trials = http.get("/v1/studies/e2e/trials").json()["trials"]
        return next(
            (
                t
                for t in trials
                if t["state"] == "running"
                and t["worker_id"] == "doomed"
                and t["intermediate_values"]
            ),
            None,
        )

    _wait_for(doomed_mid_trial, 120, "the doomed worker to report an epoch")
    doomed.send_signal(signal.SIGKILL)
    doomed.wait(timeout=10)
    orphan = next(
        t
        for t in http.get("/v1/studies/e2e/trials").json()["trials"]
        if t["state"] == "running" and t["worker_id"] == "doomed"
    )

    workers = [start_worker(server, name, tmp_path) for name in ("alpha", "beta")]

    def finished() -> dict[str, Any] | None:
        info = http.get("/v1/studies/e2e").json()
        return info if info["state"] == "completed" else None

    try:
        info = _wait_for(finished, 240, "the study to complete")
    finally:
        for worker in workers:
            worker.wait(timeout=60)
    logs = {p.name: p.read_text() for p in tmp_path.glob("*.log")}
    assert all(w.returncode == 0 for w in workers), logs

    trials = http.get("/v1/studies/e2e/trials").json()["trials"]
    by_number = {t["number"]: t for t in trials}
    assert by_number[orphan["number"]]["state"] == "fail"  # reaped
    retry = next(t for t in trials if t["retry_of"] == orphan["number"])
    assert retry["state"] == "complete"
    assert retry["params"] == orphan["params"]  # same parameters
    assert info["counts"]["complete"] == N_TRIALS
    assert info["counts"]["running"] == info["counts"]["waiting"] == 0
    assert {t["worker_id"] for t in trials if t["state"] == "complete"} <= {"alpha", "beta"}

    # Every Optuna tool sees the same study.
    study = optuna.load_study(study_name="e2e", storage=database_url)
    completed = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(completed) == N_TRIALS
    for trial in completed:
        assert trial.params and set(trial.intermediate_values) == set(range(1, 7))
        assert trial.value == pytest.approx(trial.user_attrs["metrics"]["val_neg_elbo"])
        assert trial.value < 2000  # a real −ELBO of 28×28 binary-ish images, not a placeholder
