"""The reproducibility record (issue 14): what the worker sends when it starts a trial, what
the server keeps, and ``hpo-train run --from-trial`` rerunning a trial exactly — real training
on sklearn's digits, a real uvicorn server, the real ``hpo-train`` command."""

from __future__ import annotations

import importlib.metadata
import json
import platform
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient
from helpers import ADMIN, TOKENS, VIEWER, WORKER
from live import LiveServer
from typer.testing import CliRunner

from hpo_service.app import create_app
from hpo_service.client import HPOClient, make_http_client
from hpo_service.config import Settings
from hpo_service.diagnostics_plot import plot_data
from trainers import cli as train_cli
from trainers.worker import Worker, WorkerOptions

#: Real data (sklearn's 1,797 digits), a tiny MLP, fp32 on the CPU: seconds per trial.
DIGITS: dict[str, Any] = {
    "hidden_sizes": [32],
    "latent_dim": 4,
    "batch_size": 64,
    "final_is_samples": 8,
    "final_is_examples": 64,
    "active_unit_examples": 64,
    "device": "cpu",
    "amp": "off",
    "seed": 7,
}
#: Timings differ between any two runs; everything else must match exactly.
TIMINGS = {"epoch_seconds", "samples_per_sec", "final_eval_seconds"}


def study_spec(name: str, epochs: int = 2, **fixed: Any) -> dict[str, Any]:
    return {
        "name": name,
        "dataset": "digits",
        "epochs": epochs,
        "budget": {"n_trials": 1, "max_concurrent": 1},
        "pruner": {"name": "none"},
        "fixed": {**DIGITS, **fixed},
    }


def run_worker(http: Any, worker_id: str = "repro-worker") -> None:
    options = WorkerOptions(worker_id=worker_id, device="cpu", wait_s=0, idle_exit_s=0)
    assert Worker(HPOClient(http), options).run() == 1


def git_head() -> str:
    checkout = Path(__file__).resolve().parents[2]
    return subprocess.run(
        ["git", "-C", str(checkout), "rev-parse", "HEAD"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()


@pytest.fixture
def sqlite_client(tmp_path: Path) -> Iterator[TestClient]:
    """The app on a SQLite file only: for the tests whose subject is training, not storage
    (the routes they use run on both backends in the tests around them)."""
    settings = Settings(
        database_url=f"sqlite:///{tmp_path / 'hpo.db'}",
        artifact_dir=tmp_path / "artifacts",
        tokens=TOKENS,  # type: ignore[arg-type]
        run_reaper=False,
        run_scheduler=False,
        db_connect_retries=0,
    )
    app = create_app(settings)
    with TestClient(app) as client:
        yield client
    app.state.service.storage.engine.dispose()


def test_a_trained_trial_records_how_it_ran(sqlite_client: TestClient) -> None:
    client = sqlite_client
    assert client.post("/v1/studies", json=study_spec("rec"), headers=ADMIN).status_code == 201
    client.headers.update(WORKER)
    run_worker(client)
    found = client.get("/v1/studies/rec/trials/0/config", headers=VIEWER)
    assert found.status_code == 200, found.text
    body = found.json()
    assert body["state"] == "complete" and body["seed"] == 7
    assert body["config"]["seed"] == 7 and body["config"]["dataset"] == "digits"
    assert body["worker_device"] == "cpu"  # the lease request's device, kept
    record = body["repro"]
    assert record["package_version"] == importlib.metadata.version("vae-hpo")
    # The tests run from a checkout (an editable install): its commit is recorded.
    assert record["git_commit"] == git_head()
    assert isinstance(record["git_dirty"], bool)
    assert record["torch"] == torch.__version__
    assert record["optuna"] == importlib.metadata.version("optuna")
    assert record["python"] == platform.python_version()
    assert record["device"] == "cpu" and "threads" in record["device_name"]
    assert record["precision"] == "fp32"
    assert record["seed"] == 7
    # The dashboard shows it one key per attribute, like `metrics`.
    study_id = client.get("/v1/studies/rec", headers=VIEWER).json()["study_id"]
    trial = client.get(f"/api/studies/{study_id}", headers=VIEWER).json()["trials"][0]
    shown = {attr["key"]: attr["value"] for attr in trial["user_attrs"]}
    assert shown["repro.precision"] == "fp32" and shown["repro.seed"] == "7"


def test_a_bad_record_is_refused_naming_the_field(client: TestClient) -> None:
    body = study_spec("badrec")
    assert client.post("/v1/studies", json=body, headers=ADMIN).status_code == 201
    lease = client.post("/v1/leases", json={"worker_id": "w"}, headers=WORKER).json()
    record = {
        "python": "3.11.2",
        "device": "cpu",
        "device_name": "some CPU",
        "precision": "fp32",
        "seed": 0,
    }
    url = f"/v1/trials/{lease['trial_id']}/record"
    bad = client.post(
        url,
        json={"lease_token": lease["lease_token"], "record": {**record, "git_commit": "main"}},
        headers=WORKER,
    )
    assert bad.status_code == 422
    assert [d["field"] for d in bad.json()["error"]["details"]] == ["body.record.git_commit"]
    wrong = client.post(url, json={"lease_token": "nope", "record": record}, headers=WORKER)
    assert wrong.status_code == 409 and wrong.json()["error"]["code"] == "lease_mismatch"
    token = lease["lease_token"]
    ok = client.post(url, json={"lease_token": token, "record": record}, headers=WORKER)
    assert ok.status_code == 204
    kept = client.get("/v1/studies/badrec/trials/0/config", headers=VIEWER).json()
    assert kept["repro"] == {
        **record,
        "package_version": None,
        "git_commit": None,
        "git_dirty": None,
        "torch": None,
        "optuna": None,
        "platform": None,
    }
    assert client.post(url, json={"lease_token": token, "record": record}).status_code == 401
    client.post(
        f"/v1/trials/{lease['trial_id']}/fail",
        json={"lease_token": lease["lease_token"], "reason": "done"},
        headers=WORKER,
    )
    late = client.post(url, json={"lease_token": token, "record": record}, headers=WORKER)
    # The protocol's rule (issue 16.1): any call after the trial ended says so, with its state.
    late_error = late.json()["error"]
    assert late.status_code == 409 and late_error["code"] == "trial_finished"
    assert late_error["state"] == "fail"
    missing = client.get("/v1/studies/badrec/trials/5/config", headers=VIEWER)
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "trial_not_found"


def test_from_trial_reruns_a_trial_exactly(tmp_path: Path) -> None:
    settings = Settings(
        database_url=f"sqlite:///{tmp_path / 'hpo.db'}",
        artifact_dir=tmp_path / "artifacts",
        tokens=TOKENS,  # type: ignore[arg-type]
        run_scheduler=False,
        db_connect_retries=0,
    )
    with LiveServer(settings) as server:
        with make_http_client(server.url, "admin-token") as admin:
            assert admin.post("/v1/studies", json=study_spec("again")).status_code == 201
        with make_http_client(server.url, "worker-token") as http:
            run_worker(http)
        with make_http_client(server.url, "viewer-token") as http:
            trial = HPOClient(http).list_trials("again").trials[0]
        out = tmp_path / "rerun"
        result = CliRunner().invoke(
            train_cli.app,
            ["run", "--from-trial", "again", "0", "--server", server.url, "--out", str(out)],
            env={"HPO_TOKEN": "viewer-token"},
        )
        assert result.exit_code == 0, result.output
    assert trial.state == "complete"
    rerun = json.loads((out / "final.json").read_text())
    stored = {k: v for k, v in trial.metrics.items() if k not in TIMINGS}
    assert {"val_neg_elbo", "test_neg_elbo", "test_is_nll", "active_units"} <= set(stored)
    assert {k: rerun[k] for k in stored} == stored  # bit for bit: same seed, CPU, fp32
    assert trial.values == [rerun["val_neg_elbo"]]
    source = json.loads((out / "trial.json").read_text())
    assert source["trial_number"] == 0 and source["repro"]["precision"] == "fp32"
    # A trial that does not exist: exit 2, naming it.
    missing = CliRunner().invoke(
        train_cli.app, ["run", "--from-trial", "again", "9", "--server", "http://127.0.0.1:9"]
    )
    assert missing.exit_code == 2 and "cannot fetch trial 9" in missing.output


def test_a_collapsed_trial_shows_kl_going_to_zero(sqlite_client: TestClient) -> None:
    """β = 100 from the first step (a β-VAE far past 1) collapses the posterior; β = 1 does
    not. The plot's data (what the PNG draws) must show it, and its title must say so."""
    client = sqlite_client
    client.headers.update(WORKER)
    curves = {}
    for name, beta in (("collapsed", 100.0), ("healthy", 1.0)):
        spec = study_spec(
            name,
            kl_schedule="constant",
            lr_policy="constant",
            free_bits=0.0,  # a free-bits floor would hold KL up by design
            beta_target=beta,
            base_lr=3e-3,
        )
        assert client.post("/v1/studies", json=spec, headers=ADMIN).status_code == 201
        run_worker(client, worker_id=name)
        history = client.get(f"/v1/studies/{name}/trials/0/history", headers=VIEWER).json()
        assert [e["epoch"] for e in history["epochs"]] == [1, 2]
        curves[name] = plot_data(history["epochs"])
    collapsed, healthy = curves["collapsed"], curves["healthy"]
    assert collapsed.last("val_kl") is not None and collapsed.last("val_kl") < 0.05  # type: ignore[operator]
    assert max(row[-1] or 0.0 for row in collapsed.kl_per_dim) < 0.02  # every dimension at 0
    assert collapsed.last("active_units") == 0
    assert any(note.startswith("posterior collapse from epoch") for note in collapsed.notes)
    assert healthy.last("val_kl") > 1.0  # type: ignore[operator]
    assert not any("collapse" in note for note in healthy.notes)
