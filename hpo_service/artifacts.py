"""The server's artifact store: Optuna's, chosen by settings (a directory, or an S3 bucket).

Checkpoints and diagnostics plots (issue 14) are Optuna artifacts, so the stock dashboard lists
a trial's files on its page and serves them (``/artifacts/<study>/<trial>/<id>``). Workers hold
no database or bucket credentials: they send the bytes to this server over HTTP, and only the
server writes the store. Optuna records an artifact's metadata in the trial's system attributes,
which Optuna allows only while the trial runs; :func:`attach_to_trial` is the one place that
does both steps.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import threading
import uuid
from dataclasses import asdict
from typing import BinaryIO

import optuna
from optuna.artifacts import ArtifactMeta, Boto3ArtifactStore, FileSystemArtifactStore
from optuna.artifacts._protocol import ArtifactStore

from hpo_service.config import Settings

#: The system-attribute prefix Optuna and optuna-dashboard read artifact metadata from.
ARTIFACT_ATTR_PREFIX = "artifacts:"


def build_artifact_store(settings: Settings) -> ArtifactStore:
    """The store the settings name: an S3-compatible bucket when one is set, else a directory.

    boto3 is imported only for a bucket (``pip install 'vae-hpo[s3]'``), so the default server
    image does not carry it.
    """
    if settings.artifact_s3_bucket:
        try:
            import boto3
        except ImportError as error:  # pragma: no cover - depends on the installed extras
            raise ValueError(
                "HPO_ARTIFACT_S3_BUCKET is set but boto3 is not installed: "
                "pip install 'vae-hpo[s3]'"
            ) from error
        client = boto3.client("s3", endpoint_url=settings.artifact_s3_endpoint_url or None)
        return _PrefixedStore(
            Boto3ArtifactStore(settings.artifact_s3_bucket, client=client),
            settings.artifact_s3_prefix,
        )
    return DirectoryStore(settings.artifact_dir)


class DirectoryStore(FileSystemArtifactStore):
    """Optuna's file-system store, with folders made on first write and atomic writes.

    Nothing is created until something is written (a server that never stores an artifact
    leaves no folder behind). A write goes to a temporary file renamed into place, so a crash
    mid-write leaves the previous version, never a truncated checkpoint.
    """

    def write(self, artifact_id: str, content_body: BinaryIO) -> None:
        path = self._get_filepath(artifact_id)
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.partial")
        with open(partial, "wb") as file:
            shutil.copyfileobj(content_body, file)
        os.replace(partial, path)


class _PrefixedStore:
    """Keys under a prefix in a shared bucket (``team-a/`` …); the dashboard sees plain ids."""

    def __init__(self, inner: ArtifactStore, prefix: str) -> None:
        self.inner = inner
        self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""

    def open_reader(self, artifact_id: str) -> BinaryIO:
        return self.inner.open_reader(self.prefix + artifact_id)

    def write(self, artifact_id: str, content_body: BinaryIO) -> None:
        self.inner.write(self.prefix + artifact_id, content_body)

    def remove(self, artifact_id: str) -> None:
        self.inner.remove(self.prefix + artifact_id)


#: Namespace of :func:`artifact_id_for` (any fixed UUID; changing it orphans stored files).
_ID_NAMESPACE = uuid.UUID("5f0c1d1e-7a4b-4c59-9a51-6c2f3e0b9d10")


def artifact_id_for(study_id: int, trial_id: int, kind: str) -> str:
    """A stable id per trial and kind (``"checkpoint"``, ``"diagnostics.png"``…).

    The dashboard serves only ids of hex digits and dashes (a UUID), so a name-based UUID
    (RFC 4122 version 5) stands in for a path: the same trial and kind always get the same id,
    so a refresh overwrites in place.
    """
    return str(uuid.uuid5(_ID_NAMESPACE, f"study-{study_id}/trial-{trial_id}/{kind}"))


def attach_to_trial(
    store: ArtifactStore,
    storage: optuna.storages.BaseStorage,
    trial_id: int,
    *,
    artifact_id: str,
    filename: str,
    content: bytes,
    mimetype: str,
) -> None:
    """Write ``content`` to the store and list it on the (running) trial for the dashboard.

    Bytes first, metadata second: a crash in between leaves an unlisted file, never a listed
    file that is missing. A fixed ``artifact_id`` (:func:`artifact_id_for`) makes a refresh
    overwrite both the bytes and the metadata in place instead of piling up copies.
    Raises ``optuna.exceptions.UpdateFinishedTrialError`` once the trial has finished.
    """
    store.write(artifact_id, io.BytesIO(content))
    storage.set_trial_system_attr(
        trial_id, ARTIFACT_ATTR_PREFIX + artifact_id, _meta(artifact_id, filename, mimetype)
    )


def attach_to_study(
    store: ArtifactStore,
    storage: optuna.storages.BaseStorage,
    study_id: int,
    *,
    artifact_id: str,
    filename: str,
    content: bytes,
    mimetype: str,
) -> None:
    """Write ``content`` and list it on the study (the dashboard's study page shows it), in
    the order and with the overwrite-in-place rule of :func:`attach_to_trial`. A study never
    finishes, so this works at any time."""
    store.write(artifact_id, io.BytesIO(content))
    storage.set_study_system_attr(
        study_id, ARTIFACT_ATTR_PREFIX + artifact_id, _meta(artifact_id, filename, mimetype)
    )


def _meta(artifact_id: str, filename: str, mimetype: str) -> str:
    """Optuna's artifact metadata as it stores it (``optuna.artifacts.upload_artifact``)."""
    meta = ArtifactMeta(
        artifact_id=artifact_id, filename=filename, mimetype=mimetype, encoding=None
    )
    return json.dumps(asdict(meta))


def read_artifact(store: ArtifactStore, artifact_id: str) -> bytes:
    """The stored bytes; raises ``optuna.artifacts.exceptions.ArtifactNotFound`` if absent."""
    with store.open_reader(artifact_id) as reader:
        return reader.read()
