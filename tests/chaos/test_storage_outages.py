"""A database that goes away, fills up or turns read-only (issue 13, items 2 and 5).

Every write answers 503 ``storage_unavailable`` with ``Retry-After`` and the service's error
body (never a bare 500, never the host, port or database name); ``/readyz`` turns 503 at the
first probe and 200 again at the first probe after the database recovers; the request after
recovery works (no session left poisoned).
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import sqlite3
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from helpers import ADMIN, TOKENS, VIEWER, WORKER, spec
from live import LiveServer
from private_pg import PrivateCluster

from hpo_service.config import Settings


def _settings(database_url: str) -> Settings:
    return Settings(
        database_url=database_url,
        tokens=TOKENS,  # type: ignore[arg-type]
        heartbeat_interval_s=1,
        lease_timeout_s=120,  # nothing expires during the outage: the test ends it
        run_reaper=False,
        run_scheduler=False,
        long_poll_step_s=0.05,
        db_connect_retries=0,
    )


def _assert_storage_503(response: httpx.Response, secrets: tuple[str, ...]) -> None:
    assert response.status_code == 503, (response.request.url, response.text)
    assert int(response.headers["retry-after"]) >= 1
    body = response.json()
    assert body["error"]["code"] == "storage_unavailable", body
    for secret in secrets:
        assert secret not in response.text, (secret, response.text)


def _wait_for(condition: Callable[[], bool], timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not met within the bound"
        time.sleep(0.2)


def _start(http: httpx.Client) -> dict[str, Any]:
    created = http.post("/v1/studies", json=spec(name="outage"), headers=ADMIN)
    assert created.status_code == 201, created.text
    granted = http.post("/v1/leases", json={"worker_id": "w"}, headers=WORKER)
    assert granted.status_code == 200, granted.text
    lease: dict[str, Any] = granted.json()
    return lease


def _report(
    http: httpx.Client, lease: dict[str, Any], epoch: int, **metrics: Any
) -> httpx.Response:
    return http.post(
        f"/v1/trials/{lease['trial_id']}/report",
        json={"lease_token": lease["lease_token"], "epoch": epoch, "value": 100.0 - epoch,
              "metrics": metrics},
        headers=WORKER,
    )  # fmt: skip


def _worker_calls(http: httpx.Client, lease: dict[str, Any]) -> list[httpx.Response]:
    token = {"lease_token": lease["lease_token"]}
    trial = f"/v1/trials/{lease['trial_id']}"
    return [
        http.post("/v1/leases", json={"worker_id": "w2"}, headers=WORKER),
        http.post(f"{trial}/heartbeat", json=token, headers=WORKER),
        _report(http, lease, 0),
        http.post(f"{trial}/complete", json={**token, "values": [1.0]}, headers=WORKER),
        http.post("/v1/studies", json=spec(name="during"), headers=ADMIN),
    ]


def test_postgres_stopped_is_503_everywhere_and_recovers(private_cluster: PrivateCluster) -> None:
    secrets = ("127.0.0.1", str(private_cluster.port), "postgres", "psycopg", 'database "')
    with (
        LiveServer(_settings(private_cluster.url)) as server,
        httpx.Client(base_url=server.url, timeout=60) as http,
    ):
        lease = _start(http)
        private_cluster.stop("fast")
        for response in _worker_calls(http, lease):
            _assert_storage_503(response, secrets)
        reads = [
            http.get("/v1/studies", headers=VIEWER),
            http.get("/v1/studies/outage/trials", headers=VIEWER),
            http.get("/api/studies", headers=VIEWER),  # the dashboard's JSON API
        ]
        for response in reads:
            _assert_storage_503(response, secrets)
        ready = http.get("/readyz")
        assert ready.status_code == 503 and ready.json()["status"] == "unavailable"

        private_cluster.start()
        # The first probe after the database is back says ready: nothing cached.
        private_cluster.wait_accepting()
        assert http.get("/readyz").status_code == 200
        # The worker's next calls work: no connection or session left broken.
        token = {"lease_token": lease["lease_token"]}
        trial = f"/v1/trials/{lease['trial_id']}"
        assert http.post(f"{trial}/heartbeat", json=token, headers=WORKER).status_code == 200
        assert _report(http, lease, 0).status_code == 200
        done = http.post(f"{trial}/complete", json={**token, "values": [1.0]}, headers=WORKER)
        assert done.status_code == 200, done.text
        assert http.get("/api/studies", headers=VIEWER).status_code == 200


@contextlib.contextmanager
def _mounted(kind: str, *options: str) -> Iterator[tuple[Path, Path]]:
    """(source, mount point) of a temporary mount (root only): ``tmpfs`` with ``size=…``, or a
    bind mount of ``source`` that can be remounted read-only while nothing on it is open."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("needs root and mount(8) for a small or read-only filesystem")
    source = Path(tempfile.mkdtemp(prefix="hpo-fs-src-"))
    target = Path(tempfile.mkdtemp(prefix="hpo-fs-"))
    try:
        if kind == "tmpfs":
            command = ["mount", "-t", "tmpfs", "-o", ",".join(options), "tmpfs", str(target)]
        else:
            command = ["mount", "--bind", str(source), str(target)]
        if subprocess.run(command, capture_output=True).returncode != 0:
            pytest.skip(f"cannot mount here: {' '.join(command)}")
        try:
            yield source, target
        finally:
            subprocess.run(["umount", "-l", str(target)], check=False)
    finally:
        shutil.rmtree(target, ignore_errors=True)
        shutil.rmtree(source, ignore_errors=True)


def _remount(target: Path, mode: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{mode},bind", str(target)], check=True)


def test_sqlite_on_a_read_only_mount_is_503_for_writes_200_for_reads() -> None:
    with _mounted("bind") as (source, folder):
        # Linux refuses to make a mount read-only while a file on it is open for writing, so
        # the database is made first, then served through the mount once it is read-only.
        # A connection held on the source keeps the WAL's -shm file, which readers need.
        with (
            LiveServer(_settings(f"sqlite:///{source / 'hpo.db'}")) as server,
            httpx.Client(base_url=server.url, timeout=60) as http,
        ):
            lease = _start(http)
        holder = sqlite3.connect(source / "hpo.db")
        try:
            holder.execute("SELECT count(*) FROM studies").fetchall()
            _remount(folder, "ro")
            secrets = (str(folder), "readonly database")
            try:
                with (
                    LiveServer(_settings(f"sqlite:///{folder / 'hpo.db'}")) as server,
                    httpx.Client(base_url=server.url, timeout=60) as http,
                ):
                    ready = http.get("/readyz")
                    assert ready.status_code == 503, ready.text
                    assert ready.json()["checks"]["writes"] == "read-only filesystem"
                    for response in _worker_calls(http, lease):
                        _assert_storage_503(response, secrets)
                    assert http.get("/v1/studies/outage", headers=VIEWER).status_code == 200
                    _remount(folder, "rw")
                    assert http.get("/readyz").status_code == 200
                    again = _report(http, lease, 1)
                    assert again.status_code == 200, again.text
            finally:
                _remount(folder, "rw")
        finally:
            holder.close()


def _fill(folder: Path) -> Path:
    """Fill the filesystem to the last byte; returns the filler to delete."""
    filler = folder / "filler"
    with filler.open("wb") as out:
        chunk = b"\0" * 65536
        try:
            while True:
                out.write(chunk)
                out.flush()
        except OSError as error:
            assert error.errno == errno.ENOSPC
    with contextlib.suppress(OSError), filler.open("ab") as out:
        while True:  # the last partial chunk
            out.write(b"\0" * 512)
            out.flush()
    return filler


def test_sqlite_on_a_full_disk_is_503_and_recovers_when_space_is_freed() -> None:
    with _mounted("tmpfs", "size=8m") as (_, folder):
        database = folder / "hpo.db"
        with (
            LiveServer(_settings(f"sqlite:///{database}")) as server,
            httpx.Client(base_url=server.url, timeout=60) as http,
        ):
            lease = _start(http)
            filler = _fill(folder)
            ready = http.get("/readyz")
            assert ready.status_code == 503, ready.text
            assert ready.json()["checks"]["writes"] == "disk full"
            # Reports until one fails for want of space (the WAL may hold a few first);
            # every failure is a 503, never a 500.
            statuses = []
            for epoch in range(200):
                response = _report(http, lease, epoch, kl_per_dim=[0.5 + epoch] * 4000)
                statuses.append(response.status_code)
                if response.status_code != 200:
                    _assert_storage_503(response, (str(folder),))
                    break
            assert statuses[-1] == 503, statuses
            assert http.post(
                "/v1/leases", json={"worker_id": "w2"}, headers=WORKER
            ).status_code in (503, 204)

            filler.unlink()
            assert http.get("/readyz").status_code == 200
            again = _report(http, lease, 500)
            assert again.status_code == 200, again.text
            integrity = http.get("/v1/studies/outage/trials", headers=VIEWER)
            assert integrity.status_code == 200
