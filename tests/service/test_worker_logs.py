"""The real ``hpo-worker`` process logs JSON lines: its device, each epoch's throughput and the
trial's timings, under the same ids the server logs (token read from a file, as compose does)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from helpers import ADMIN, spec
from live import LiveServer

from hpo_service.config import Settings


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)  # the backend is not the point
def test_worker_logs_device_throughput_and_timings_as_json(
    settings: Settings, tmp_path: Path
) -> None:
    token_file = tmp_path / "worker_token"
    token_file.write_text("worker-token\n")  # a trailing newline, as `echo` writes it
    with LiveServer(settings) as server:
        body = spec("logged", epochs=2, budget={"n_trials": 1, "max_concurrent": 1})
        assert httpx.post(f"{server.url}/v1/studies", json=body, headers=ADMIN).status_code == 201
        env = {
            **os.environ,
            "OMP_NUM_THREADS": "1",
            "HPO_SERVER_URL": server.url,
            "HPO_WORKER_TOKEN_FILE": str(token_file),
            "HPO_LOG_FORMAT": "json",
        }
        env.pop("HPO_WORKER_TOKEN", None)
        worker = subprocess.run(
            [
                sys.executable,
                "-m",
                "trainers.worker_cli",
                "--worker-id",
                "w-log",
                "--device",
                "cpu",
                "--max-trials",
                "1",
                "--wait",
                "1",
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=240,
        )
    assert worker.returncode == 0, worker.stderr
    records = [json.loads(line) for line in worker.stderr.splitlines() if line.strip()]
    events: dict[str, list[dict[str, object]]] = {}
    for record in records:
        events.setdefault(str(record.get("event")), []).append(record)

    started = events["worker_started"][0]
    assert started["worker_id"] == "w-log"
    assert str(started["device"]).startswith("cpu (") and "threads" in str(started["device"])

    epochs = events["epoch_reported"]
    assert [e["epoch"] for e in epochs] == [1, 2]
    assert all(float(e["samples_per_sec"]) > 0 for e in epochs)  # type: ignore[arg-type]

    (finished,) = events["trial_finished"]
    assert finished["outcome"] == "complete" and finished["study"] == "logged"
    assert finished["worker_id"] == "w-log" and finished["trial_number"] == 0
    assert isinstance(finished["trial_id"], int)
    assert 0 < float(finished["train_s"]) <= float(finished["wall_s"])  # type: ignore[arg-type]
    mean_rate = sum(float(e["samples_per_sec"]) for e in epochs) / 2  # type: ignore[arg-type]
    assert abs(float(finished["samples_per_sec"]) - mean_rate) < 1e-6 * mean_rate  # type: ignore[arg-type]
