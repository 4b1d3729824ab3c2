"""Checkpoints and resume (issue 14) through the real app (TestClient), the real worker and the
real trainer, on a SQLite file and PostgreSQL: a retry resumes from the earlier attempt's
checkpoint and carries its curve; a corrupt or missing checkpoint starts fresh and says so;
retention keeps only the best few best models; the routes refuse bad input with a 4xx."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import optuna
import pytest
from fastapi.testclient import TestClient
from helpers import ADMIN, VIEWER, WORKER, spec

from hpo_service.app import create_app
from hpo_service.artifacts import artifact_id_for
from hpo_service.client import HPOClient
from hpo_service.config import Settings
from trainers.train import EpochMetrics, TrainResult, train
from trainers.worker import Worker, WorkerOptions

EPOCHS = 4


@pytest.fixture
def ckpt_settings(settings: Settings) -> Settings:
    return settings.model_copy(
        update={
            "checkpoint_every_epochs": 2,
            "best_models_kept": 1,
            "max_checkpoint_bytes": 4 << 20,
        }
    )


@pytest.fixture
def ckpt_client(ckpt_settings: Settings) -> Iterator[TestClient]:
    app = create_app(ckpt_settings)
    with TestClient(app) as test_client:
        yield test_client
    app.state.service.storage.engine.dispose()


def _worker(client: TestClient, worker_id: str) -> Worker:
    client.headers.update(WORKER)
    options = WorkerOptions(worker_id=worker_id, wait_s=0, idle_exit_s=0, max_trials=1)
    return Worker(HPOClient(client), options)


def _trials(client: TestClient, name: str) -> list[dict[str, Any]]:
    return client.get(f"/v1/studies/{name}/trials", headers=VIEWER).json()["trials"]


def _study_id(client: TestClient, name: str) -> int:
    return int(client.get(f"/v1/studies/{name}", headers=VIEWER).json()["study_id"])


def _hand_back_after(worker: Worker, epoch: int) -> Any:
    """A train function that stops the worker at the end of ``epoch`` (as SIGTERM would): the
    trial is handed back for a retry with the same parameters."""

    def train_fn(config: dict[str, Any], on_epoch: Any, **kwargs: Any) -> TrainResult:
        def stopping(metrics: EpochMetrics) -> Any:
            if metrics.epoch == epoch:
                worker.request_shutdown()
            return on_epoch(metrics)

        return train(config, stopping, **kwargs)

    return train_fn


def _interrupted(client: TestClient, name: str) -> dict[str, Any]:
    """A study of one trial whose first attempt is handed back after epoch 3 (SIGTERM's path:
    checkpoints of epochs 2, the interval, and 3, the hand-back); returns that attempt."""
    body = spec(name, epochs=EPOCHS, budget={"n_trials": 1, "max_concurrent": 1})
    body["pruner"] = {"name": "none"}
    assert client.post("/v1/studies", json=body, headers=ADMIN).status_code == 201
    first = _worker(client, "first")
    first.train_fn = _hand_back_after(first, 3)
    assert first.run() == 1
    trials = _trials(client, name)
    assert [t["state"] for t in trials] == ["fail", "waiting"]
    return trials[0]


def _uninterrupted(config: dict[str, Any]) -> TrainResult:
    return train(config)


def _config_of(database_url: str, name: str, number: int) -> dict[str, Any]:
    study = optuna.load_study(study_name=name, storage=database_url)
    return dict(study.trials[number].user_attrs["config"])


def test_a_retry_resumes_from_the_checkpoint_and_carries_the_curve(
    ckpt_client: TestClient, database_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    first = _interrupted(ckpt_client, "resume")
    assert set(first["intermediate_values"]) == {"1", "2", "3"}
    caplog.set_level(logging.INFO, logger="hpo.worker")
    assert _worker(ckpt_client, "second").run() == 1
    retry = _trials(ckpt_client, "resume")[1]
    assert retry["state"] == "complete"
    assert retry["resumed_from"] == {"trial": 0, "epoch": 3}  # handed back: nothing lost
    assert retry["resume_fallback"] is None
    assert "resumed from trial 0 at epoch 3" in caplog.text
    # one curve: the first attempt's epochs 1-3, then the retry's own epoch 4
    curve = retry["intermediate_values"]
    assert set(curve) == {"1", "2", "3", "4"}
    assert curve["1"] == first["intermediate_values"]["1"]
    assert curve["2"] == first["intermediate_values"]["2"]
    assert curve["3"] == first["intermediate_values"]["3"]
    whole = _uninterrupted(_config_of(database_url, "resume", 1))
    reference = {str(e.epoch): e.values["val_neg_elbo"] for e in whole.history}
    assert curve == pytest.approx(reference, rel=1e-6)
    assert retry["values"][0] == pytest.approx(whole.metrics["val_neg_elbo"], rel=1e-6)
    _history_is_one_run(ckpt_client, "resume", 3, reference)
    assert retry["metrics"]["test_neg_elbo"] == pytest.approx(
        whole.metrics["test_neg_elbo"], rel=1e-6
    )


def _history_is_one_run(
    client: TestClient, name: str, resumed_at: int, reference: dict[str, float]
) -> None:
    """The retry's ``history``: the first attempt's records of epochs 1..``resumed_at``
    (carried over by ``resumed``), then its own, so its plot is whole too; every epoch's
    −ELBO that of the uninterrupted run (records keep 6 significant digits)."""
    first, retry = (
        client.get(f"/v1/studies/{name}/trials/{n}/history", headers=VIEWER).json() for n in (0, 1)
    )
    assert [r["epoch"] for r in retry["epochs"]] == list(range(1, EPOCHS + 1)), retry
    assert retry["epochs"][:resumed_at] == first["epochs"][:resumed_at]
    kept = {str(r["epoch"]): r["val_neg_elbo"] for r in retry["epochs"]}
    assert kept == pytest.approx(reference, rel=1e-5)


def test_a_population_worker_resumes_a_retry_from_its_checkpoint(
    ckpt_client: TestClient, database_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The retry of a single trial's attempt, leased by ``--population 2``: its member starts
    from the checkpoint's epoch, the server is told before its first report, and it ends as
    the uninterrupted run (a member equals ``train()`` to relative 1e-5)."""
    first = _interrupted(ckpt_client, "pop-resume")
    caplog.set_level(logging.INFO, logger="hpo.worker")
    ckpt_client.headers.update(WORKER)
    options = WorkerOptions(worker_id="pop", wait_s=0, idle_exit_s=0, max_trials=1, population=2)
    assert Worker(HPOClient(ckpt_client), options).run() == 1
    retry = _trials(ckpt_client, "pop-resume")[1]
    assert retry["state"] == "complete" and retry["worker_id"] == "pop/0", retry
    assert retry["resumed_from"] == {"trial": 0, "epoch": 3}
    assert "trial 1: resumed from trial 0 at epoch 3" in caplog.text
    curve = retry["intermediate_values"]
    assert {k: curve[k] for k in ("1", "2", "3")} == first["intermediate_values"]
    whole = _uninterrupted(_config_of(database_url, "pop-resume", 1))
    reference = {str(e.epoch): e.values["val_neg_elbo"] for e in whole.history}
    assert curve == pytest.approx(reference, rel=1e-5)
    assert retry["values"][0] == pytest.approx(whole.metrics["val_neg_elbo"], rel=1e-5)
    # its member kept its best model, as a single trial does
    study = optuna.load_study(study_name="pop-resume", storage=database_url)
    assert "hpo:best_model" in study.trials[1].system_attrs


@pytest.mark.parametrize("damage", ["corrupt", "missing"])
def test_a_bad_checkpoint_starts_the_retry_fresh_and_says_so(
    ckpt_client: TestClient,
    ckpt_settings: Settings,
    database_url: str,
    caplog: pytest.LogCaptureFixture,
    damage: str,
) -> None:
    first = _interrupted(ckpt_client, "fallback")
    path = Path(ckpt_settings.artifact_dir) / artifact_id_for(
        _study_id(ckpt_client, "fallback"), first["trial_id"], "checkpoint"
    )
    assert path.is_file()
    if damage == "corrupt":
        content = bytearray(path.read_bytes())
        content[len(content) // 2] ^= 0xFF  # one flipped byte on disk
        path.write_bytes(bytes(content))
    else:
        path.unlink()
    caplog.set_level(logging.INFO, logger="hpo.worker")
    assert _worker(ckpt_client, "second").run() == 1
    retry = _trials(ckpt_client, "fallback")[1]
    assert retry["state"] == "complete"
    assert retry["resumed_from"] is None
    assert retry["resume_fallback"]["trial"] == 0
    reason = "SHA-256 mismatch" if damage == "corrupt" else "missing"
    assert reason in retry["resume_fallback"]["reason"]
    assert "starting fresh" in caplog.text and reason in caplog.text
    # a fresh start: its own curve from epoch 1, equal to an uninterrupted run
    whole = _uninterrupted(_config_of(database_url, "fallback", 1))
    reference = {str(e.epoch): e.values["val_neg_elbo"] for e in whole.history}
    assert retry["intermediate_values"] == pytest.approx(reference, rel=1e-6)


def test_retention_deletes_checkpoints_and_keeps_the_best_model_of_the_best(
    ckpt_client: TestClient, ckpt_settings: Settings
) -> None:
    body = spec("retain", epochs=EPOCHS, budget={"n_trials": 3, "max_concurrent": 1})
    body["pruner"] = {"name": "none"}
    assert ckpt_client.post("/v1/studies", json=body, headers=ADMIN).status_code == 201
    worker = _worker(ckpt_client, "w")
    worker.options.max_trials = 3
    assert worker.run() == 3
    trials = _trials(ckpt_client, "retain")
    assert [t["state"] for t in trials] == ["complete"] * 3
    study_id = _study_id(ckpt_client, "retain")
    folder = Path(ckpt_settings.artifact_dir)
    best = min(trials, key=lambda t: t["values"][0])
    for trial in trials:
        checkpoint = folder / artifact_id_for(study_id, trial["trial_id"], "checkpoint")
        model = folder / artifact_id_for(study_id, trial["trial_id"], "best_model")
        assert not checkpoint.exists()  # finished: nothing resumes from it
        assert model.exists() == (trial is best), trial["number"]


# --- the routes' answers to bad input ------------------------------------------------------


def _leased(client: TestClient) -> dict[str, Any]:
    body = spec("routes", budget={"n_trials": 1, "max_concurrent": 1})
    assert client.post("/v1/studies", json=body, headers=ADMIN).status_code == 201
    lease = client.post("/v1/leases", json={"worker_id": "w"}, headers=WORKER)
    assert lease.status_code == 200
    return lease.json()


def _put(client: TestClient, lease: dict[str, Any], content: bytes, **headers: str) -> Any:
    return client.put(
        f"/v1/trials/{lease['trial_id']}/checkpoint",
        params={"epoch": headers.pop("epoch", "1")},
        content=content,
        headers={**WORKER, "X-Lease-Token": lease["lease_token"], **headers},
    )


def test_checkpoint_routes_take_large_bodies_and_refuse_bad_ones(ckpt_client: TestClient) -> None:
    lease = _leased(ckpt_client)
    assert lease["checkpoint_every_epochs"] == 2 and lease["resume_from"] is None
    big = bytes(range(256)) * (6 * 1024)  # 1.5 MiB: over the 1 MiB JSON limit
    stored = _put(
        ckpt_client, lease, big, **{"X-Checkpoint-SHA256": hashlib.sha256(big).hexdigest()}
    )
    assert stored.status_code == 200, stored.text
    assert stored.json()["bytes"] == len(big)
    # JSON routes keep their 1 MiB limit
    report = ckpt_client.post(
        f"/v1/trials/{lease['trial_id']}/report",
        content=b"x" * (2 << 20),
        headers={**WORKER, "Content-Type": "application/json"},
    )
    assert report.status_code == 413
    too_big = _put(ckpt_client, lease, b"x" * (5 << 20))
    assert too_big.status_code == 413
    wrong = _put(ckpt_client, lease, b"abc", **{"X-Checkpoint-SHA256": "0" * 64})
    assert wrong.status_code == 422 and "X-Checkpoint-SHA256" in wrong.text
    epoch_0 = _put(ckpt_client, lease, b"abc", epoch="0")
    assert epoch_0.status_code == 422 and "epoch" in epoch_0.text
    stranger = _put(ckpt_client, lease, b"abc", **{"X-Lease-Token": "not-the-token"})
    assert stranger.status_code == 409
    # no earlier attempt: nothing to resume from
    fetch = ckpt_client.get(
        f"/v1/trials/{lease['trial_id']}/resume-checkpoint",
        headers={**WORKER, "X-Lease-Token": lease["lease_token"]},
    )
    assert fetch.status_code == 404 and fetch.json()["error"]["code"] == "checkpoint_not_found"
    not_earlier = ckpt_client.post(
        f"/v1/trials/{lease['trial_id']}/resumed",
        json={"lease_token": lease["lease_token"], "from_trial_number": 7, "epoch": 2},
        headers=WORKER,
    )
    assert not_earlier.status_code == 422 and "from_trial_number" in not_earlier.text
