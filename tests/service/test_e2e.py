"""End to end: a real `hpo serve` process, real `hpo-worker` processes training tiny VAEs, and a
worker killed with SIGKILL mid-trial — on PostgreSQL, the deployment where workers on several
machines train.

One backend is enough here: what this test alone checks is the real trainer's side (a worker that
dies mid-epoch, two that take over and exit cleanly, real −ELBO values), which no backend changes.
What a backend could change is checked on each elsewhere: a dead lease failed and retried with the
same parameters (``test_reaping.py``, both backends, at every write), a SIGKILLed worker of a real
`hpo serve` process on SQLite (``chaos/test_kills.py``) and on PostgreSQL across replicas
(``test_replicas.py::test_both_replicas_reap_but_a_vanished_worker_is_retried_once``), and real
`hpo-worker` processes on SQLite (``test_cli_demo.py``)."""

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
from live import serve_process, stop

# Generous bounds: two training workers on a busy two-core machine are slow, not broken.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

N_TRIALS = 5
#: Epochs per trial: the doomed worker is killed after its first, with three still to train.
EPOCHS = 4


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
    env = {
        **os.environ,
        "HPO_DATABASE_URL": database_url,
        "HPO_TOKENS": TOKENS,
        "HPO_HEARTBEAT_INTERVAL_S": "0.5",
        # 8 heartbeats: a live worker on a loaded box keeps its lease, a dead one loses it fast.
        "HPO_LEASE_TIMEOUT_S": "4",
        "HPO_REAP_INTERVAL_S": "0.5",
        "HPO_LOG_LEVEL": "warning",
    }
    # serve_process stops the server on the way out, also when it never became ready.
    with serve_process(env, tmp_path / "server.log") as (_, url):
        yield url


def start_worker(
    url: str, worker_id: str, tmp_path: Path, *, exit_when_idle: bool = False
) -> subprocess.Popen[bytes]:
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
            # The workers that finish the study leave as soon as the server says it is done
            # (not after a fixed idle time); the doomed one waits, to be killed mid-trial.
            *(["--exit-when-idle"] if exit_when_idle else ["--idle-exit", "6"]),
        ],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_two_workers_and_a_sigkill(server: str, database_url: str, tmp_path: Path) -> None:
    http = httpx.Client(base_url=server, headers=ADMIN, timeout=30)
    spec = {
        "name": "e2e",
        "dataset": "synthetic",
        "epochs": EPOCHS,
        "budget": {"n_trials": N_TRIALS, "max_concurrent": 2},
        "pruner": {"name": "none"},
        # A 2 s lease on a loaded box can expire for a live worker too; enough retries that the
        # orphan's parameters still end in a completed trial (what the test checks).
        "max_retries": 6,
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

    try:
        _wait_for(doomed_mid_trial, 300, "the doomed worker to report an epoch")
    except BaseException:
        stop(doomed)
        raise
    doomed.send_signal(signal.SIGKILL)
    doomed.wait(timeout=10)
    orphan = next(
        t
        for t in http.get("/v1/studies/e2e/trials").json()["trials"]
        if t["state"] == "running" and t["worker_id"] == "doomed"
    )

    workers = [
        start_worker(server, name, tmp_path, exit_when_idle=True) for name in ("alpha", "beta")
    ]

    def finished() -> dict[str, Any] | None:
        info = http.get("/v1/studies/e2e").json()
        return info if info["state"] == "completed" else None

    try:
        info = _wait_for(finished, 480, "the study to complete")
    finally:
        for worker in workers:
            try:
                worker.wait(timeout=120)
            finally:
                stop(worker)  # a worker that outlives the test would train someone else's study
    logs = {p.name: p.read_text() for p in tmp_path.glob("*.log")}
    assert all(w.returncode == 0 for w in workers), logs

    trials = http.get("/v1/studies/e2e/trials").json()["trials"]
    by_number = {t["number"]: t for t in trials}
    assert by_number[orphan["number"]]["state"] == "fail"  # reaped
    # Follow the retries: on a loaded machine a retry can itself miss its 2 s lease and be
    # retried again; what must hold is that the orphan's parameters end in a completed trial.
    retry = orphan
    while (
        later := next((t for t in trials if t["retry_of"] == retry["number"]), None)
    ) is not None:
        assert retry["number"] == orphan["number"] or by_number[retry["number"]]["state"] == "fail"
        retry = later
    assert retry["number"] != orphan["number"], "the orphan was never retried"
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
        assert trial.params and set(trial.intermediate_values) == set(range(1, EPOCHS + 1))
        assert trial.value == pytest.approx(trial.user_attrs["metrics"]["val_neg_elbo"])
        assert trial.value < 2000  # a real −ELBO of 28×28 binary-ish images, not a placeholder


def test_a_server_that_never_gets_ready_is_stopped_not_left_behind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A "database" that accepts TCP connections and never answers: `hpo serve` hangs in
    # start-up, so readiness times out (shortened here) instead of the process exiting.
    import socket

    import live

    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    started: list[subprocess.Popen[bytes]] = []
    real_popen = subprocess.Popen

    def recording_popen(*args: Any, **kwargs: Any) -> subprocess.Popen[bytes]:
        started.append(real_popen(*args, **kwargs))
        return started[-1]

    monkeypatch.setattr(live, "READY_TIMEOUT_S", 8.0)
    monkeypatch.setattr(live.subprocess, "Popen", recording_popen)
    port = silent.getsockname()[1]
    env = {
        **os.environ,
        "HPO_DATABASE_URL": f"postgresql+psycopg://postgres@127.0.0.1:{port}/never",
        "HPO_TOKENS": TOKENS,
    }
    try:
        with (
            pytest.raises(RuntimeError, match="did not answer"),
            serve_process(env, tmp_path / "server.log"),
        ):
            pytest.fail("the server cannot have become ready")
    finally:
        silent.close()
    (process,) = started
    assert process.poll() is not None  # stopped and reaped before the error reached the test
