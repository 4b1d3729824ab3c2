"""The artifact store in an S3 bucket (issue 14) against a real S3-compatible server, not a
mock: ``s3rver`` (npm; ``.ci/run`` installs it) started on 127.0.0.1 in a fixture, spoken to by
the server's own boto3 ``Boto3ArtifactStore``. Checkpoints go in and come back for a retry,
retention deletes the best models that fell out of the kept few, and the dashboard lists and
serves a trial's plot from the bucket. On a real SQLite file and PostgreSQL.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from helpers import ADMIN, VIEWER, WORKER, spec

from hpo_service.app import create_app
from hpo_service.artifacts import artifact_id_for, attach_to_trial
from hpo_service.config import Settings

BUCKET = "hpo-artifacts"
PREFIX = "team-a"
#: s3rver's fixed credentials (it checks the signature against them).
CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "S3RVER",
    "AWS_SECRET_ACCESS_KEY": "S3RVER",
    "AWS_DEFAULT_REGION": "us-east-1",
}
PNG_BYTES = b"\x89PNG\r\n\x1a\n" + b"plot" * 64


@dataclass
class S3Server:
    url: str
    process: subprocess.Popen[bytes]

    def objects(self) -> set[str]:
        """Every object key in the bucket, read by a client of its own."""
        import boto3

        client = boto3.client("s3", endpoint_url=self.url)
        pages = client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET)
        return {item["Key"] for page in pages for item in page.get("Contents", [])}


def _s3rver() -> str:
    found = shutil.which("s3rver")
    if found is None:
        reason = "the S3 tests need s3rver: npm install -g s3rver@3.7.1 (.ci/run installs it)"
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    return found


@pytest.fixture
def s3(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[S3Server]:
    binary = _s3rver()
    for name, value in CREDENTIALS.items():
        monkeypatch.setenv(name, value)
    log_path = tmp_path / "s3rver.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [binary, "-d", str(tmp_path / "s3-data"), "-a", "127.0.0.1", "-p", "0",
             "--configure-bucket", BUCKET],
            stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        # It prints its port once it listens (port 0: the OS picks a free one).
        deadline = time.monotonic() + 120  # node starts slowly on a loaded box
        port = None
        while port is None:
            found = re.search(r"listening on 127\.0\.0\.1:(\d+)", log_path.read_text())
            if found:
                port = int(found.group(1))
            elif process.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"s3rver did not start: {log_path.read_text()}")
            else:
                time.sleep(0.1)
        yield S3Server(f"http://127.0.0.1:{port}", process)
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture
def s3_client(settings: Settings, s3: S3Server) -> Iterator[TestClient]:
    app = create_app(
        settings.model_copy(
            update={
                "artifact_s3_bucket": BUCKET,
                "artifact_s3_prefix": PREFIX,
                "artifact_s3_endpoint_url": s3.url,
                "best_models_kept": 1,
                "checkpoint_every_epochs": 1,
            }
        )
    )
    with TestClient(app) as client:
        yield client
    app.state.service.storage.engine.dispose()


def _lease(client: TestClient, worker: str = "w") -> dict[str, Any]:
    response = client.post("/v1/leases", json={"worker_id": worker}, headers=WORKER)
    assert response.status_code == 200, response.text
    return response.json()


def _put(client: TestClient, lease: dict[str, Any], kind: str, content: bytes) -> None:
    response = client.put(
        f"/v1/trials/{lease['trial_id']}/{kind}",
        params={"epoch": 1},
        content=content,
        headers={**WORKER, "X-Lease-Token": lease["lease_token"]},
    )
    assert response.status_code == 200, response.text


def _key(study_id: int, trial_id: int, kind: str) -> str:
    return f"{PREFIX}/{artifact_id_for(study_id, trial_id, kind)}"


def test_a_checkpoint_goes_to_the_bucket_and_comes_back_for_the_retry(
    s3_client: TestClient, s3: S3Server
) -> None:
    body = spec(name="s3-resume", budget={"n_trials": 1, "max_concurrent": 1}, max_retries=1)
    created = s3_client.post("/v1/studies", json=body, headers=ADMIN)
    assert created.status_code == 201, created.text
    study_id = created.json()["study_id"]
    first = _lease(s3_client)
    content = os.urandom(300_000)  # not compressible: the bytes themselves must survive
    _put(s3_client, first, "checkpoint", content)
    assert _key(study_id, first["trial_id"], "checkpoint") in s3.objects()
    handed_back = s3_client.post(
        f"/v1/trials/{first['trial_id']}/fail",
        json={"lease_token": first["lease_token"], "reason": "SIGTERM", "retryable": True},
        headers=WORKER,
    )
    assert handed_back.status_code == 200, handed_back.text
    retry = _lease(s3_client, "w2")
    assert retry["resume_from"]["trial_id"] == first["trial_id"]
    fetched = s3_client.get(
        f"/v1/trials/{retry['trial_id']}/resume-checkpoint",
        headers={**WORKER, "X-Lease-Token": retry["lease_token"]},
    )
    assert fetched.status_code == 200, fetched.text
    assert fetched.content == content
    assert fetched.headers["X-Checkpoint-Epoch"] == "1"


def test_retention_deletes_the_dropped_best_model_from_the_bucket(
    s3_client: TestClient, s3: S3Server
) -> None:
    body = spec(
        name="s3-keep", budget={"n_trials": 2, "max_concurrent": 2}, pruner={"name": "none"}
    )
    created = s3_client.post("/v1/studies", json=body, headers=ADMIN)
    assert created.status_code == 201, created.text
    study_id = created.json()["study_id"]
    worse, better = _lease(s3_client, "a"), _lease(s3_client, "b")
    for lease, value in ((worse, 120.0), (better, 100.0)):  # −ELBO: lower is better
        _put(s3_client, lease, "checkpoint", b"state" * 100)
        _put(s3_client, lease, "best-model", f"weights of {value}".encode())
        done = s3_client.post(
            f"/v1/trials/{lease['trial_id']}/complete",
            json={"lease_token": lease["lease_token"], "values": [value], "metrics": {}},
            headers=WORKER,
        )
        assert done.status_code == 200, done.text
    keys = s3.objects()
    # HPO_BEST_MODELS_KEPT=1: the better trial keeps its model, the worse one's is deleted;
    # every checkpoint goes once its trial's line has ended.
    assert _key(study_id, better["trial_id"], "best_model") in keys
    assert _key(study_id, worse["trial_id"], "best_model") not in keys
    for lease in (worse, better):
        assert _key(study_id, lease["trial_id"], "checkpoint") not in keys
    kept = s3_client.get(f"/v1/trials/{better['trial_id']}/best-model", headers=ADMIN)
    assert kept.status_code == 200 and kept.content == b"weights of 100.0"


def test_the_dashboard_lists_and_serves_a_plot_from_the_bucket(
    s3_client: TestClient, s3: S3Server
) -> None:
    created = s3_client.post(
        "/v1/studies", json=spec(name="s3-art", pruner={"name": "none"}), headers=ADMIN
    )
    assert created.status_code == 201, created.text
    study_id = created.json()["study_id"]
    trial_id = _lease(s3_client)["trial_id"]
    app = s3_client.app
    plot_id = artifact_id_for(study_id, trial_id, "diagnostics.png")
    attach_to_trial(
        app.state.artifact_store,  # type: ignore[attr-defined]
        app.state.service.storage,  # type: ignore[attr-defined]
        trial_id,
        artifact_id=plot_id,
        filename="diagnostics.png",
        content=PNG_BYTES,
        mimetype="image/png",
    )
    assert f"{PREFIX}/{plot_id}" in s3.objects()  # in the bucket, under the prefix
    detail = s3_client.get(f"/api/studies/{study_id}", headers=VIEWER).json()
    (trial,) = [t for t in detail["trials"] if t["trial_id"] == trial_id]
    assert [a["filename"] for a in trial["artifacts"]] == ["diagnostics.png"]
    served = s3_client.get(f"/artifacts/{study_id}/{trial_id}/{plot_id}", headers=VIEWER)
    assert served.status_code == 200 and served.content == PNG_BYTES
