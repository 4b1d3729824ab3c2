"""The server's artifact store (issue 14): chosen by settings, written only by the server, and
served by the mounted dashboard on the trial's page. On a real SQLite file and PostgreSQL.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import optuna
import pytest
from fastapi.testclient import TestClient
from helpers import ADMIN, VIEWER, WORKER, spec
from optuna.artifacts import Boto3ArtifactStore
from optuna.artifacts.exceptions import ArtifactNotFound

from hpo_service.app import create_app
from hpo_service.artifacts import (
    ARTIFACT_ATTR_PREFIX,
    DirectoryStore,
    _PrefixedStore,
    artifact_id_for,
    attach_to_trial,
    build_artifact_store,
    read_artifact,
)
from hpo_service.config import Settings

PNG_BYTES = b"\x89PNG\r\n\x1a\n" + b"not-really-a-picture" * 10


def test_the_directory_store_makes_folders_on_write_and_replaces_atomically(
    tmp_path: Path,
) -> None:
    root = tmp_path / "store"
    store = DirectoryStore(root)
    assert not root.exists(), "building the store must not create its folder"
    ckpt = artifact_id_for(1, 2, "checkpoint")
    assert ckpt == artifact_id_for(1, 2, "checkpoint") != artifact_id_for(1, 3, "checkpoint")
    store.write(ckpt, io.BytesIO(b"first"))
    store.write(ckpt, io.BytesIO(b"second"))
    assert read_artifact(store, ckpt) == b"second"
    # No partial file is left beside the artifact.
    assert sorted(p.name for p in root.iterdir()) == [ckpt]
    with pytest.raises(ArtifactNotFound):
        read_artifact(store, artifact_id_for(1, 2, "missing"))
    with pytest.raises(ValueError, match="Invalid artifact_id"):
        store.write("../escape", io.BytesIO(b"x"))


def test_settings_choose_the_store(tmp_path: Path) -> None:
    directory = build_artifact_store(Settings(artifact_dir=tmp_path / "a"))
    assert isinstance(directory, DirectoryStore)
    bucket = build_artifact_store(
        Settings(
            artifact_s3_bucket="team-bucket",
            artifact_s3_prefix="/team-a/",
            artifact_s3_endpoint_url="http://127.0.0.1:9",
        )
    )
    assert isinstance(bucket, _PrefixedStore)
    assert isinstance(bucket.inner, Boto3ArtifactStore)
    assert bucket.inner.bucket == "team-bucket"
    assert bucket.prefix == "team-a/"
    assert bucket.inner.client.meta.endpoint_url == "http://127.0.0.1:9"


def test_an_attached_artifact_is_listed_and_served_by_the_dashboard(
    settings: Settings, tmp_path: Path
) -> None:
    settings = settings.model_copy(update={"artifact_dir": tmp_path / "artifacts"})
    app = create_app(settings)
    with TestClient(app) as client:
        created = client.post(
            "/v1/studies", json=spec(name="art", pruner={"name": "none"}), headers=ADMIN
        )
        assert created.status_code == 201, created.text
        study_id = created.json()["study_id"]
        leased = client.post("/v1/leases", json={"worker_id": "w"}, headers=WORKER).json()
        trial_id = leased["trial_id"]

        service = app.state.service
        store = app.state.artifact_store
        attach_to_trial(
            store,
            service.storage,
            trial_id,
            artifact_id=artifact_id_for(study_id, trial_id, "diagnostics.png"),
            filename="diagnostics.png",
            content=PNG_BYTES,
            mimetype="image/png",
        )
        # A refresh under the same id replaces the file and keeps one listing.
        attach_to_trial(
            store,
            service.storage,
            trial_id,
            artifact_id=artifact_id_for(study_id, trial_id, "diagnostics.png"),
            filename="diagnostics.png",
            content=PNG_BYTES + b"v2",
            mimetype="image/png",
        )
        detail = client.get(f"/api/studies/{study_id}", headers=VIEWER).json()
        (trial,) = [t for t in detail["trials"] if t["trial_id"] == trial_id]
        listed = trial["artifacts"]
        assert [a["filename"] for a in listed] == ["diagnostics.png"]
        assert listed[0]["mimetype"] == "image/png"

        served = client.get(
            f"/artifacts/{study_id}/{trial_id}/{listed[0]['artifact_id']}", headers=VIEWER
        )
        assert served.status_code == 200
        assert served.content == PNG_BYTES + b"v2"
        # The dashboard's upload route stays a refused write.
        upload = client.post(f"/api/artifacts/{study_id}/{trial_id}", headers=VIEWER)
        assert upload.status_code in (401, 403, 405)

        # Optuna's own listing reads the same metadata (what optuna.artifacts users see).
        metas = optuna.artifacts.get_all_artifact_meta(
            service.storage.get_trial(trial_id), storage=service.storage
        )
        assert [m.filename for m in metas] == ["diagnostics.png"]
        attrs = service.storage.get_trial_system_attrs(trial_id)
        stored = [json.loads(v) for k, v in attrs.items() if k.startswith(ARTIFACT_ATTR_PREFIX)]
        assert len(stored) == 1
    app.state.service.storage.engine.dispose()
