"""A worker process SIGKILLed at epoch 6 of 10 and its trial's retry resumed from the epoch-6
checkpoint (issue 14): the retry ends with the metrics of an uninterrupted run (fp32, CPU,
same seed). A real uvicorn server on 127.0.0.1, real ``hpo-worker`` processes, a real SIGKILL.

The kill is placed without timing: a middleware in front of the app SIGKILLs the worker the
moment the server has stored its epoch-6 checkpoint, while the worker waits for that answer,
so the kill always lands after epoch 6 and before epoch 7.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import optuna
import pytest
import torch
from byo_helpers import wait_for
from helpers import ADMIN, TOKENS
from live import LiveServer
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from hpo_service.config import Settings
from trainers.train import train

KILL_EPOCH, EPOCHS = 6, 10
#: Fixed values of the study's one trial: tiny, on the sklearn digits, fp32 on the CPU.
FIXED: dict[str, Any] = {
    "hidden_sizes": [32],
    "latent_dim": 4,
    "batch_size": 128,
    "base_lr": 3e-3,
    "final_is_samples": 20,
    "final_is_examples": 100,
    "active_unit_examples": 180,
    "device": "cpu",
    "amp": "off",
    "seed": 3,
}
#: Relative tolerance of "the same metrics". Same device, same thread count, same operations:
#: measured identical; the tolerance only absorbs a last-bit difference, not a different run.
REL_TOL = 1e-6


@dataclass
class KillSwitch:
    """What the middleware kills and when; ``killed`` is set once it has."""

    epoch: int
    pid: int | None = None
    killed: threading.Event = field(default_factory=threading.Event)


class KillAfterCheckpoint:
    """SIGKILL ``switch.pid`` once the checkpoint of ``switch.epoch`` is stored, before the
    worker gets the answer."""

    def __init__(self, app: ASGIApp, switch: KillSwitch) -> None:
        self.app = app
        self.switch = switch

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        switch = self.switch
        target = (
            scope["type"] == "http"
            and scope["method"] == "PUT"
            and scope["path"].endswith("/checkpoint")
            and f"epoch={switch.epoch}".encode() in scope.get("query_string", b"")
        )
        if not target or switch.pid is None or switch.killed.is_set():
            await self.app(scope, receive, send)
            return

        async def kill_first(message: Message) -> None:
            if message["type"] == "http.response.start" and message["status"] == 200:
                os.kill(switch.pid, signal.SIGKILL)  # type: ignore[arg-type]
                switch.killed.set()
            await send(message)

        await self.app(scope, receive, kill_first)


def _worker(url: str, worker_id: str, folder: Path, *extra: str) -> subprocess.Popen[bytes]:
    log = (folder / f"{worker_id}.log").open("wb")
    return subprocess.Popen(
        [sys.executable, "-m", "trainers.worker_cli", "--server", url, "--token", "worker-token",
         "--worker-id", worker_id, "--device", "cpu", "--wait", "1", *extra],
        env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip


@pytest.mark.slow
@pytest.mark.timeout(900)  # a bound for a loaded 2-core machine; every wait is on a condition
@pytest.mark.parametrize(
    ("doomed_args", "rel_tol"),
    [
        ((), REL_TOL),
        # A population worker's member checkpoints as a single trial does, so the single-trial
        # rescuer resumes it; a member's numbers equal train()'s to relative 1e-5 (fused
        # products sum in another order: tests/trainers/test_population.py).
        (("--population", "2"), 1e-5),
    ],
    ids=["single", "population"],
)
def test_a_trial_killed_at_epoch_6_of_10_resumes_and_ends_as_if_never_killed(
    tmp_path: Path, doomed_args: tuple[str, ...], rel_tol: float
) -> None:
    settings = Settings(
        database_url=f"sqlite:///{tmp_path / 'kill.db'}",
        artifact_dir=tmp_path / "artifacts",
        tokens=TOKENS,  # type: ignore[arg-type]
        heartbeat_interval_s=0.5,
        lease_timeout_s=3,
        reap_interval_s=0.5,
        run_scheduler=False,
        checkpoint_every_epochs=2,
    )
    switch = KillSwitch(KILL_EPOCH)
    server = LiveServer(settings)
    server.app.add_middleware(KillAfterCheckpoint, switch=switch)
    with server:
        http = httpx.Client(base_url=server.url, headers=ADMIN, timeout=60)
        body = {
            "name": "killed",
            "dataset": "digits",
            "epochs": EPOCHS,
            "budget": {"n_trials": 1, "max_concurrent": 1},
            "pruner": {"name": "none"},
            "max_retries": 2,
            "fixed": FIXED,
        }
        assert http.post("/v1/studies", json=body).status_code == 201, body
        doomed = _worker(server.url, "doomed", tmp_path, "--max-trials", "1", *doomed_args)
        switch.pid = doomed.pid
        try:
            assert doomed.wait(timeout=600) == -signal.SIGKILL, (
                tmp_path / "doomed.log"
            ).read_text()
        finally:
            doomed.kill()
        assert switch.killed.is_set()

        def retry_waiting() -> list[dict[str, Any]] | None:
            trials = http.get("/v1/studies/killed/trials").json()["trials"]
            return trials if [t["state"] for t in trials] == ["fail", "waiting"] else None

        first = wait_for(retry_waiting, 120, "the killed trial to be reaped and retried")[0]
        assert set(first["intermediate_values"]) == {str(e) for e in range(1, KILL_EPOCH + 1)}

        rescuer = _worker(server.url, "rescuer", tmp_path, "--max-trials", "1")
        try:
            assert rescuer.wait(timeout=600) == 0, (tmp_path / "rescuer.log").read_text()
        finally:
            rescuer.kill()
        retry = http.get("/v1/studies/killed/trials").json()["trials"][1]
        # one history too: the killed attempt's epochs 1-6 carried over, then the retry's own
        history = http.get("/v1/studies/killed/trials/1/history").json()["epochs"]
    study = optuna.load_study(study_name="killed", storage=settings.database_url)
    config = dict(study.trials[1].user_attrs["config"])  # what the sampler chose, resolved
    rescuer_log = (tmp_path / "rescuer.log").read_text()
    assert retry["state"] == "complete", (retry, rescuer_log)
    assert retry["resumed_from"] == {"trial": 0, "epoch": KILL_EPOCH}, rescuer_log
    assert f"resumed from trial 0 at epoch {KILL_EPOCH}" in rescuer_log
    # the retry trained epochs 7-10 only: it reported nothing before epoch 7
    assert "epoch 1:" not in rescuer_log and f"epoch {KILL_EPOCH + 1}:" in rescuer_log

    # The uninterrupted run of the same config, fp32 on the CPU with the workers' one thread.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        whole = train(config)
    finally:
        torch.set_num_threads(threads)
    reference = {str(e.epoch): e.values["val_neg_elbo"] for e in whole.history}
    assert retry["intermediate_values"] == pytest.approx(reference, rel=rel_tol)
    for name in ("val_neg_elbo", "test_neg_elbo", "test_is_nll", "active_units", "best_epoch"):
        assert retry["metrics"][name] == pytest.approx(whole.metrics[name], rel=rel_tol), name
    assert retry["values"][0] == pytest.approx(whole.metrics["val_neg_elbo"], rel=rel_tol)
    assert [r["epoch"] for r in history] == list(range(1, EPOCHS + 1)), history
    kept = {str(r["epoch"]): r["val_neg_elbo"] for r in history}
    assert kept == pytest.approx(reference, rel=1e-5)  # records keep 6 significant digits
