"""/healthz, /readyz, /metrics and JSON logs, against the real app on SQLite and PostgreSQL.

Metric values are read with prometheus_client's own parser and must move with what happened:
a lease, a completion, a reaped lease.
"""

from __future__ import annotations

import io
import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from alembic import command
from fastapi.testclient import TestClient
from helpers import ADMIN, TOKENS, VIEWER, WORKER, spec
from live import free_port
from optuna_schema import optuna_alembic
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import create_engine, text

from hpo_service.app import create_app
from hpo_service.config import Settings
from hpo_service.logging_setup import CONTEXT_FIELDS, json_formatter


@pytest.fixture
def settings(database_url: str) -> Settings:
    return Settings(
        database_url=database_url,
        tokens=TOKENS,  # type: ignore[arg-type]
        heartbeat_interval_s=0.2,
        lease_timeout_s=1,
        run_reaper=False,
        long_poll_step_s=0.05,
        db_connect_retries=0,
        metrics_cache_s=0,  # every scrape counts afresh, so values follow each step
    )


@pytest.fixture
def client(settings: Settings) -> Iterator[TestClient]:
    app = create_app(settings)
    with TestClient(app) as test_client:
        yield test_client
    app.state.service.storage.engine.dispose()


def scrape(client: TestClient) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    response = client.get("/metrics", headers=VIEWER)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }


def trials(samples: dict[Any, float], study: str, state: str) -> float:
    return samples[("hpo_trials", (("state", state), ("study", study)))]


def requests(samples: dict[Any, float], route: str, status: str) -> float:
    key = ("hpo_http_request_duration_seconds_count", (("method", "POST"), ("route", route)))
    return samples.get((key[0], (*key[1], ("status", status))), 0.0)


def lease(client: TestClient, worker_id: str) -> dict[str, Any]:
    response = client.post("/v1/leases", json={"worker_id": worker_id}, headers=WORKER)
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def test_healthz_and_readyz_answer_without_a_token(client: TestClient) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200
    assert ready.json() == {
        "status": "ready",
        "checks": {
            "database": "ok",
            "optuna_schema": "ok",
            "service_schema": "ok",
            "writes": "ok",  # the write probe (issue 13.2)
        },
    }


def test_readyz_is_503_when_a_schema_falls_behind(client: TestClient, database_url: str) -> None:
    # An older Optuna stamp under the running server (an old backup restored, say).
    command.stamp(optuna_alembic(database_url), "v3.0.0.d")
    response = client.get("/readyz")
    assert response.status_code == 503
    body = response.json()
    assert body["status"] == "unavailable"
    assert body["checks"]["optuna_schema"] == "Optuna schema at v3.0.0.d, needs v3.2.0.a"
    assert body["checks"]["service_schema"] == "ok"


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)  # a file cannot vanish
def test_readyz_is_503_when_the_database_is_gone(client: TestClient, database_url: str) -> None:
    from sqlalchemy.engine import make_url

    name = make_url(database_url).database
    admin = create_engine(
        make_url(database_url).set(database="postgres"), isolation_level="AUTOCOMMIT"
    )
    with admin.connect() as connection:
        connection.execute(
            text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = :n"),
            {"n": name},
        )
        connection.execute(text(f'DROP DATABASE "{name}"'))
    admin.dispose()
    response = client.get("/readyz")
    assert response.status_code == 503
    assert response.json()["checks"] == {"database": "unreachable (OperationalError)"}
    assert name not in response.text and "127.0.0.1" not in response.text  # names no host
    assert client.get("/healthz").status_code == 200  # the process itself is fine
    # The metrics endpoint still answers, and says the storage is down.
    assert scrape(client)[("hpo_storage_up", ())] == 0


def test_metrics_need_a_read_token(client: TestClient) -> None:
    assert client.get("/metrics").status_code == 401
    for headers in (VIEWER, WORKER, ADMIN):
        assert client.get("/metrics", headers=headers).status_code == 200


def test_metrics_follow_a_lease_and_a_completion(client: TestClient) -> None:
    created = client.post(
        "/v1/studies", json=spec("m", budget={"n_trials": 3, "max_concurrent": 2}), headers=ADMIN
    )
    assert created.status_code == 201
    before = scrape(client)
    assert trials(before, "m", "running") == 0 and trials(before, "m", "complete") == 0
    assert before[("hpo_active_workers", ())] == 0

    first = lease(client, "gpu-a")
    lease(client, "gpu-b")
    leased = scrape(client)
    assert trials(leased, "m", "running") == 2
    assert leased[("hpo_active_workers", ())] == 2
    assert requests(leased, "/v1/leases", "200") == requests(before, "/v1/leases", "200") + 2

    done = client.post(
        f"/v1/trials/{first['trial_id']}/complete",
        json={"lease_token": first["lease_token"], "values": [91.5], "metrics": {}},
        headers=WORKER,
    )
    assert done.status_code == 200, done.text
    after = scrape(client)
    assert trials(after, "m", "running") == 1 and trials(after, "m", "complete") == 1
    assert after[("hpo_active_workers", ())] == 1
    route = "/v1/trials/{trial_id}/complete"  # the template, never the raw path
    assert requests(after, route, "200") == 1
    assert not any("/v1/trials/1/" in str(key) for key in after)
    bucket = (
        "hpo_http_request_duration_seconds_bucket",
        (("le", "+Inf"), ("method", "POST"), ("route", route), ("status", "200")),
    )
    assert after[bucket] == 1


def test_metrics_count_reaped_leases(client: TestClient) -> None:
    client.post("/v1/studies", json=spec("r", max_retries=1), headers=ADMIN)
    lease(client, "vanishing")
    assert scrape(client)[("hpo_leases_reaped_total", ())] == 0
    time.sleep(2.2)  # past the 1 s lease timeout, by the database clock
    client.app.state.service.reap()  # type: ignore[attr-defined]
    after = scrape(client)
    assert after[("hpo_leases_reaped_total", ())] == 1
    assert trials(after, "r", "fail") == 1 and trials(after, "r", "waiting") == 1
    assert after[("hpo_active_workers", ())] == 0  # its lease is no longer live


def test_key_events_are_json_lines_with_study_and_trial_ids(client: TestClient) -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(json_formatter())
    logger = logging.getLogger("hpo_service.studies")
    logger.addHandler(handler)
    old_level = logger.level
    logger.setLevel(logging.INFO)
    try:
        client.post("/v1/studies", json=spec("logs", max_retries=1), headers=ADMIN)
        granted = lease(client, "w-json")
        failed = client.post(
            f"/v1/trials/{granted['trial_id']}/fail",
            json={"lease_token": granted["lease_token"], "reason": "oom", "retryable": True},
            headers=WORKER,
        )
        assert failed.status_code == 200
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
    records = [json.loads(line) for line in stream.getvalue().splitlines()]
    by_event = {record.get("event"): record for record in records}
    study_id = client.get("/v1/studies/logs", headers=VIEWER).json()["study_id"]
    expected = {
        "study": "logs",
        "study_id": study_id,
        "trial_id": granted["trial_id"],
        "trial_number": granted["trial_number"],
    }
    for event in ("lease_granted", "trial_failed"):
        record = by_event[event]
        assert {k: record[k] for k in expected} == expected, record
        assert record["worker_id"] == "w-json"
        assert {"time", "level", "logger", "message"} <= set(record)
    assert by_event["retry_queued"]["trial_number"] == granted["trial_number"]
    # A lease line carries every context field the text format prints too.
    assert set(CONTEXT_FIELDS) <= set(by_event["lease_granted"]), by_event["lease_granted"]


def test_hpo_serve_writes_only_json_lines(tmp_path: Any) -> None:
    """The real ``hpo serve`` process with HPO_LOG_FORMAT=json: uvicorn's lines included."""
    port = free_port()
    env = {
        **os.environ,
        "HPO_DATABASE_URL": f"sqlite:///{tmp_path / 'hpo.db'}",
        "HPO_LOG_FORMAT": "json",
        "HPO_PORT": str(port),
    }
    server = subprocess.Popen(
        [sys.executable, "-m", "hpo_service", "serve"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and server.poll() is None:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        else:
            pytest.fail(
                f"hpo serve did not become ready: {server.stderr.read() if server.stderr else ''}"
            )
    finally:
        server.send_signal(signal.SIGINT)
        _, stderr = server.communicate(timeout=30)
    lines = [line for line in stderr.splitlines() if line.strip()]
    records = [json.loads(line) for line in lines]  # every line parses
    messages = [record["message"] for record in records]
    assert any(m.startswith("serving sqlite:///") for m in messages), messages
    assert any("Application startup complete" in m for m in messages), messages
    assert any(
        "/readyz" in m and record["logger"] == "uvicorn.access"
        for m, record in zip(messages, records, strict=True)
    )
    assert all({"time", "level", "logger", "message"} <= set(record) for record in records)
