"""The OpenAPI document is enough to write a worker or client from (issue 16.1, issue 13.8):
every route states its scope and its error answers, with the service's error body."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from helpers import TOKENS, VIEWER

from hpo_service.app import create_app
from hpo_service.config import Settings

ERROR_REF = "#/components/schemas/ErrorResponse"
METHODS = {"get", "post", "put", "patch", "delete"}


@pytest.fixture(scope="module")
def document(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    path: Path = tmp_path_factory.mktemp("openapi") / "hpo.db"
    settings = Settings(
        database_url=f"sqlite:///{path}",
        tokens=TOKENS,  # type: ignore[arg-type]
        run_reaper=False,
        run_scheduler=False,
        db_connect_retries=0,
    )
    app = create_app(settings)
    with TestClient(app) as client:
        response = client.get("/v1/openapi.json", headers=VIEWER)
        assert response.status_code == 200
        yield response.json()
    app.state.service.storage.engine.dispose()


def _operations(document: dict[str, Any]) -> Iterator[tuple[str, str, dict[str, Any]]]:
    for path, operations in document["paths"].items():
        for method, operation in operations.items():
            if method in METHODS and path.startswith("/v1"):
                yield path, method, operation


def test_every_route_states_its_scope_and_error_answers(document: dict[str, Any]) -> None:
    operations = list(_operations(document))
    assert len(operations) >= 20
    for path, method, operation in operations:
        where = f"{method.upper()} {path}"
        assert operation.get("x-scope") in {"viewer", "worker", "admin"}, where
        assert operation["description"].startswith(f"**Scope: {operation['x-scope']}**"), where
        wanted = {"401", "403", "503"}
        if operation.get("parameters") or "requestBody" in operation:
            wanted.add("422")
        if "requestBody" in operation:
            wanted |= {"400", "413"}
        answers = operation["responses"]
        assert wanted <= set(answers), (where, sorted(answers))
        for status, answer in answers.items():
            if status[0] in "45":
                schema = answer["content"]["application/json"]["schema"]
                assert schema == {"$ref": ERROR_REF}, (where, status, schema)
                assert answer["description"], (where, status)
        assert "Retry-After" in answers["503"]["headers"], where


def test_the_scopes_are_the_ones_the_server_enforces(document: dict[str, Any]) -> None:
    scope = {
        (method, path): operation["x-scope"] for path, method, operation in _operations(document)
    }
    assert scope[("post", "/v1/leases")] == "worker"
    assert scope[("post", "/v1/trials/{trial_id}/report")] == "worker"
    assert scope[("post", "/v1/studies")] == "admin"
    assert scope[("get", "/v1/studies")] == "viewer"
    assert scope[("delete", "/v1/studies/{name}")] == "admin"


def test_no_default_validation_error_body_is_documented(document: dict[str, Any]) -> None:
    text = json.dumps(document)
    assert "HTTPValidationError" not in text
    assert "ErrorResponse" in document["components"]["schemas"]


def test_worker_protocol_is_described_with_examples(document: dict[str, Any]) -> None:
    paths = document["paths"]
    trial = "/v1/trials/{trial_id}"
    for route in ("heartbeat", "report", "complete", "fail"):
        operation = paths[f"{trial}/{route}"]["post"]
        # A description beyond the scope line.
        assert len(operation["description"].split("\n\n", 1)[-1]) > 40, route
    heartbeat = paths[f"{trial}/heartbeat"]["post"]["responses"]
    report = paths[f"{trial}/report"]["post"]["responses"]
    assert heartbeat["422"]["description"] != report["422"]["description"]
    schemas = document["components"]["schemas"]
    for name in ("Lease", "HeartbeatAnswer", "ReportAnswer", "CompleteAnswer", "FailAnswer"):
        assert schemas[name].get("examples"), name
    lease = schemas["Lease"]["properties"]
    assert "objective_metrics" in lease["report_metric"]["description"] or (
        "pruner" in lease["report_metric"]["description"]
    )
    assert "in this order" in lease["objective_metrics"]["description"]
    epoch = schemas["ReportRequest"]["properties"]["epoch"]["description"]
    assert "from 1" in epoch
    assert "404" not in paths["/v1/studies"]["post"]["responses"]
