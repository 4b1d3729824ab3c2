"""Odd input, bounded bodies and the error answers of the HTTP layer (issue 13, items 3, 4, 8).

Odd input gets a 4xx naming the field, never a 500; a 500 that does happen (a bug) is a JSON
body on a connection that stays open; a body over the limit is 413 before it is parsed.
"""

from __future__ import annotations

import http.client
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from helpers import ADMIN, TOKENS, VIEWER, WORKER, spec
from live import LiveServer

from hpo_service.app import create_app
from hpo_service.config import Settings
from hpo_service.schemas import MAX_METRIC_LIST, MAX_METRIC_NAME, MAX_METRICS

TRIAL_ROUTES = ("heartbeat", "report", "complete", "fail")


def _settings(tmp_path: Path, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "database_url": f"sqlite:///{tmp_path / 'hardening.db'}",
        "tokens": TOKENS,
        "heartbeat_interval_s": 0.2,
        "lease_timeout_s": 5,
        "run_reaper": False,
        "run_scheduler": False,
        "long_poll_step_s": 0.05,
        "db_connect_retries": 0,
    }
    values.update(overrides)
    return Settings(**values)


@pytest.fixture
def app_client(tmp_path: Path) -> Iterator[TestClient]:
    """The app on a SQLite file: these answers come from the HTTP layer, not the backend."""
    app = create_app(_settings(tmp_path, max_body_bytes=64 * 1024))
    with TestClient(app) as client:
        yield client
    app.state.service.storage.engine.dispose()


def _leased(client: TestClient) -> dict[str, Any]:
    assert client.post("/v1/studies", json=spec(name="odd"), headers=ADMIN).status_code == 201
    response = client.post("/v1/leases", json={"worker_id": "w"}, headers=WORKER)
    assert response.status_code == 200, response.text
    granted: dict[str, Any] = response.json()
    return granted


def _body(route: str, token: str) -> dict[str, Any]:
    extra: dict[str, dict[str, Any]] = {
        "heartbeat": {},
        "report": {"epoch": 0, "value": 1.0},
        "complete": {"values": [1.0]},
        "fail": {"reason": "x"},
    }
    return {"lease_token": token, **extra[route]}


def _fields(response: Any) -> list[str]:
    return [detail["field"] for detail in response.json()["error"]["details"]]


@pytest.mark.parametrize("route", TRIAL_ROUTES)
def test_a_non_ascii_lease_token_is_422_naming_it(app_client: TestClient, route: str) -> None:
    granted = _leased(app_client)
    response = app_client.post(
        f"/v1/trials/{granted['trial_id']}/{route}", json=_body(route, "é"), headers=WORKER
    )
    assert response.status_code == 422, response.text
    assert _fields(response) == ["body.lease_token"]
    # The trial is untouched: its own token still works.
    beat = app_client.post(
        f"/v1/trials/{granted['trial_id']}/heartbeat",
        json={"lease_token": granted["lease_token"]},
        headers=WORKER,
    )
    assert beat.status_code == 200, beat.text


@pytest.mark.parametrize("route", TRIAL_ROUTES)
@pytest.mark.parametrize("trial_id", ["529110363950011750809600", "9223372036854775808", "-1"])
def test_a_trial_id_beyond_64_bits_is_422_naming_it(
    app_client: TestClient, route: str, trial_id: str
) -> None:
    response = app_client.post(
        f"/v1/trials/{trial_id}/{route}", json=_body(route, "tok"), headers=WORKER
    )
    assert response.status_code == 422, response.text
    assert _fields(response) == ["path.trial_id"]


_BATCH_KEYS = {
    "heartbeat": "leases",
    "report": "reports",
    "complete": "results",
    "fail": "failures",
}


@pytest.mark.parametrize("route", TRIAL_ROUTES)
@pytest.mark.parametrize("trial_id", [529110363950011750809600, 2**63, -1])
def test_a_batch_item_trial_id_beyond_64_bits_is_422_naming_it(
    app_client: TestClient, route: str, trial_id: int
) -> None:
    """Found by schemathesis: the batched routes stored such an id and overflowed (a 500)."""
    key = _BATCH_KEYS[route]
    body = {key: [{"trial_id": trial_id, **_body(route, "tok")}]}
    response = app_client.post(f"/v1/batch/{route}", json=body, headers=WORKER)
    assert response.status_code == 422, response.text
    assert _fields(response) == [f"body.{key}.0.trial_id"]


def test_a_string_objective_value_is_refused(app_client: TestClient) -> None:
    granted = _leased(app_client)
    url = f"/v1/trials/{granted['trial_id']}/complete"
    for values in (["1.0"], [True]):
        body = {"lease_token": granted["lease_token"], "values": values}
        response = app_client.post(url, json=body, headers=WORKER)
        assert response.status_code == 422, (values, response.text)
        assert _fields(response) == ["body.values.0"]
    report = {"lease_token": granted["lease_token"], "epoch": 0, "value": "1.0"}
    response = app_client.post(
        f"/v1/trials/{granted['trial_id']}/report", json=report, headers=WORKER
    )
    assert response.status_code == 422
    assert _fields(response) == ["body.value"]


@pytest.mark.parametrize("route", ["report", "complete"])
@pytest.mark.parametrize(
    ("metrics", "key"),
    [
        ('{"val_kl": NaN}', "body.metrics.val_kl"),
        ('{"lr": Infinity}', "body.metrics.lr"),
        ('{"kl_per_dim": [0.5, -Infinity]}', "body.metrics.kl_per_dim.1"),
    ],
)
def test_non_finite_metrics_are_422_naming_the_key(
    app_client: TestClient, route: str, metrics: str, key: str
) -> None:
    granted = _leased(app_client)
    head = json.dumps(_body(route, granted["lease_token"]))[:-1]
    # httpx's json= refuses NaN; a worker written in another language may well send it.
    content = f'{head}, "metrics": {metrics}}}'
    response = app_client.post(
        f"/v1/trials/{granted['trial_id']}/{route}",
        content=content,
        headers={**WORKER, "content-type": "application/json"},
    )
    assert response.status_code == 422, response.text
    assert _fields(response) == [key]
    # Nothing was stored: the trial has no intermediate value and is still running.
    trial = app_client.get("/v1/studies/odd/trials", headers=VIEWER).json()["trials"][0]
    assert trial["state"] == "running"
    assert trial["intermediate_values"] == {}


def test_null_metrics_are_accepted_as_not_computed(app_client: TestClient) -> None:
    granted = _leased(app_client)
    body = {**_body("report", granted["lease_token"]), "metrics": {"val_kl": None, "lr": 1e-3}}
    response = app_client.post(
        f"/v1/trials/{granted['trial_id']}/report", json=body, headers=WORKER
    )
    assert response.status_code == 200, response.text


@pytest.mark.parametrize(
    ("metrics", "field"),
    [
        ({f"m{i}": 1.0 for i in range(MAX_METRICS + 1)}, "body.metrics"),
        ({"x" * (MAX_METRIC_NAME + 1): 1.0}, "body.metrics"),
        ({"kl_per_dim": [0.0] * (MAX_METRIC_LIST + 1)}, "body.metrics.kl_per_dim"),
    ],
)
def test_what_a_report_stores_is_bounded(
    tmp_path: Path, metrics: dict[str, Any], field: str
) -> None:
    app = create_app(_settings(tmp_path))  # the default 1 MiB limit: these bodies fit in it
    with TestClient(app) as client:
        granted = _leased(client)
        body = {**_body("report", granted["lease_token"]), "metrics": metrics}
        assert len(json.dumps(body)) < 1 << 20
        response = client.post(
            f"/v1/trials/{granted['trial_id']}/report", json=body, headers=WORKER
        )
        assert response.status_code == 422, response.text
        assert all(name.startswith(field) for name in _fields(response)), _fields(response)
    app.state.service.storage.engine.dispose()


def test_a_body_over_the_limit_is_413_before_parsing(app_client: TestClient) -> None:
    granted = _leased(app_client)
    url = f"/v1/trials/{granted['trial_id']}/report"
    huge = {
        **_body("report", granted["lease_token"]),
        "metrics": {"kl_per_dim": [0.123456789] * 10_000},
    }
    announced = app_client.post(url, json=huge, headers=WORKER)
    assert announced.status_code == 413, announced.text
    assert announced.json()["error"]["code"] == "body_too_large"

    # Chunked, with no Content-Length: counted as it arrives and refused all the same.
    def chunks() -> Iterator[bytes]:
        encoded = json.dumps(huge).encode()
        for start in range(0, len(encoded), 8192):
            yield encoded[start : start + 8192]

    chunked = app_client.post(
        url, content=chunks(), headers={**WORKER, "content-type": "application/json"}
    )
    assert chunked.status_code == 413, chunked.text
    assert chunked.json()["error"]["code"] == "body_too_large"
    # Nothing was stored.
    trial = app_client.get("/v1/studies/odd/trials", headers=VIEWER).json()["trials"][0]
    assert trial["intermediate_values"] == {}
    # A study spec is a body like any other.
    big_spec = spec(name="big", fixed={"hidden_sizes": [8] * 40_000})
    assert app_client.post("/v1/studies", json=big_spec, headers=ADMIN).status_code == 413


def test_docs_need_a_token_once_tokens_are_set(app_client: TestClient, tmp_path: Path) -> None:
    for path in ("/v1/openapi.json", "/v1/docs"):
        assert app_client.get(path).status_code == 401, path
        assert app_client.get(path, headers=VIEWER).status_code == 200, path
    redirect = app_client.get("/openapi.json", follow_redirects=False)
    assert redirect.status_code == 308
    assert redirect.headers["location"] == "/v1/openapi.json"

    (tmp_path / "public").mkdir()
    public = create_app(_settings(tmp_path / "public", public_docs=True))
    with TestClient(public) as client:
        assert client.get("/v1/openapi.json").status_code == 200
        assert client.get("/v1/docs").status_code == 200
    public.state.service.storage.engine.dispose()


def test_dashboard_writes_without_a_token_are_401_before_405(app_client: TestClient) -> None:
    for method, path in (("POST", "/api/studies"), ("DELETE", "/api/studies/1"), ("PUT", "/")):
        response = app_client.request(method, path)
        assert response.status_code == 401, (method, path, response.text)
        assert response.json()["error"]["code"] == "unauthorized"
        assert app_client.request(method, path, headers=VIEWER).status_code == 405


def test_an_unexpected_error_is_a_json_500_on_a_connection_that_stays_open(
    tmp_path: Path,
) -> None:
    with LiveServer(_settings(tmp_path)) as server:
        service = server.app.state.service

        def broken(*args: Any, **kwargs: Any) -> Any:
            raise RuntimeError("a bug")

        service.list_studies = broken  # the route's collaborator fails the way a bug would
        connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
        try:
            connection.request("GET", "/v1/studies", headers=VIEWER)
            first = connection.getresponse()
            body = json.loads(first.read())
            assert first.status == 500
            assert body["error"]["code"] == "internal_error"
            assert "a bug" not in json.dumps(body)  # details stay in the server log
            assert first.getheader("connection") != "close"
            socket_before = connection.sock
            assert socket_before is not None
            connection.request("GET", "/healthz")
            second = connection.getresponse()
            assert second.status == 200
            assert json.loads(second.read()) == {"status": "ok"}
            assert connection.sock is socket_before  # the same keep-alive connection
        finally:
            connection.close()


def test_a_method_a_path_does_not_serve_is_405_listing_every_method(
    app_client: TestClient,
) -> None:
    response = app_client.request("OPTIONS", "/v1/studies", headers=VIEWER)
    assert response.status_code == 405
    assert response.headers["allow"] == "GET, POST"  # Starlette's own says only "POST"
    assert response.json()["error"]["code"] == "method_not_allowed"
