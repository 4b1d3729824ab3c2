"""The examples the OpenAPI docs show (``/v1/docs``) are bodies the API accepts."""

from __future__ import annotations

from typing import Any

from fastapi.testclient import TestClient
from helpers import ADMIN, VIEWER
from pydantic import BaseModel

from hpo_service import schemas


def _examples(client: TestClient) -> dict[str, list[dict[str, Any]]]:
    document = client.get("/v1/openapi.json", headers=VIEWER).json()
    return {
        name: schema["examples"]
        for name, schema in document["components"]["schemas"].items()
        if schema.get("examples")
    }


def test_every_documented_example_validates_against_its_model(client: TestClient) -> None:
    examples = _examples(client)
    # The request bodies a user copies from the docs; a model that loses its examples fails.
    assert {"StudySpec", "ScheduleSpec", "LeaseRequest", "ReportRequest"} <= set(examples)
    for name, bodies in examples.items():
        model = getattr(schemas, name)
        assert issubclass(model, BaseModel), name
        for body in bodies:
            model.model_validate(body)


def test_the_study_and_schedule_examples_are_accepted_as_posted(client: TestClient) -> None:
    examples = _examples(client)
    study = client.post("/v1/studies", json=examples["StudySpec"][0], headers=ADMIN)
    assert study.status_code == 201, study.text
    schedule = client.post("/v1/schedules", json=examples["ScheduleSpec"][0], headers=ADMIN)
    assert schedule.status_code == 201, schedule.text
