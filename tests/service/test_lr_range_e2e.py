"""The LR range test step end to end (issue 10.4): a real ``hpo serve`` on SQLite and a real
``hpo-worker`` process that runs ``trainers.lr_finder`` on sklearn digits with a tiny VAE, then
trains the study's trials inside the ranges the curve set."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import optuna
import pytest
from helpers import ADMIN, TOKENS
from live import serve_process, stop

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


@pytest.fixture
def server(tmp_path: Path) -> Iterator[tuple[str, str]]:
    database_url = f"sqlite:///{tmp_path / 'lr.db'}"
    env = {
        **os.environ,
        "HPO_DATABASE_URL": database_url,
        "HPO_TOKENS": TOKENS,
        "HPO_HEARTBEAT_INTERVAL_S": "0.5",
        "HPO_LEASE_TIMEOUT_S": "30",
        "HPO_LOG_LEVEL": "warning",
    }
    with serve_process(env, tmp_path / "server.log") as (_, url):
        yield url, database_url


def test_a_real_worker_runs_the_probe_then_trains_inside_its_range(
    server: tuple[str, str], tmp_path: Path
) -> None:
    url, database_url = server
    http = httpx.Client(base_url=url, headers=ADMIN, timeout=30)
    body = {
        "name": "lr-e2e",
        "dataset": "digits",
        "epochs": 1,
        "budget": {"n_trials": 2, "max_concurrent": 1},
        "pruner": {"name": "none"},
        "fixed": {
            "hidden_sizes": [32],
            "latent_dim": 4,
            "final_is_samples": 4,
            "final_is_examples": 32,
            "active_unit_examples": 64,
            "device": "cpu",
        },
        "lr_range_test": {"enabled": True, "start_lr": 1e-5, "end_lr": 10.0, "num_iter": 60},
    }
    assert http.post("/v1/studies", json=body).status_code == 201, body
    log_path = tmp_path / "worker.log"
    with log_path.open("wb") as log:
        worker = subprocess.Popen(
            [sys.executable, "-m", "trainers.worker_cli", "--server", url,
             "--token", "worker-token", "--worker-id", "w", "--device", "cpu",
             "--wait", "1", "--idle-exit", "5"],
            env={**os.environ, "OMP_NUM_THREADS": "1"},
            stdout=log,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 600  # generous: a loaded 2-core host is slow, not broken
        info: dict[str, Any] = {}
        while time.monotonic() < deadline and info.get("state") != "completed":
            info = http.get("/v1/studies/lr-e2e").json()
            time.sleep(0.2)
        worker.wait(timeout=120)
    finally:
        stop(worker)
    output = log_path.read_text()
    assert info.get("state") == "completed", output
    assert worker.returncode == 0, output
    assert "LR range test of lr-e2e: applied" in output, output

    outcome = info["lr_range_test"]
    assert outcome["status"] == "applied", outcome
    low, high = outcome["ranges"]["base_lr"]
    assert 1e-5 <= low < high <= 10.0  # inside the scanned range
    assert (low, high) != (3e-4, 1e-2)  # read off the curve, not the defaults
    assert outcome["curve_points"] >= 3 and outcome["batch_size"] == 128
    assert info["counts"]["complete"] == 2 and info["counts"]["fail"] == 0

    study = optuna.load_study(study_name="lr-e2e", storage=database_url)
    probe, *trials = study.trials
    assert probe.user_attrs["task"] == "lr_range_test"
    assert probe.user_attrs["task_outcome"] == "complete"
    curve = study.user_attrs["lr_range_test"]["curve"]
    assert len(curve["lrs"]) == len(curve["losses"]) == outcome["curve_points"]
    assert all(a < b for a, b in zip(curve["lrs"], curve["lrs"][1:], strict=False))
    assert len(trials) == 2
    for trial in trials:
        assert trial.state == optuna.trial.TrialState.COMPLETE
        bounds = trial.distributions["base_lr"]
        assert (bounds.low, bounds.high) == (low, high)
        assert low <= trial.params["base_lr"] <= high
