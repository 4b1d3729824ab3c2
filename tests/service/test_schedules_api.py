"""`/v1/schedules` through TestClient and the `hpo schedule …` CLI against a real uvicorn server,
on SQLite and PostgreSQL: validation with 422s naming the field, CRUD, pause/resume, run now."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from fastapi.testclient import TestClient
from helpers import ADMIN, TOKENS, VIEWER
from live import LiveServer
from schedule_helpers import schedule_settings, template
from typer.testing import CliRunner

from hpo_service.app import create_app
from hpo_service.cli import app as cli_app


def body(name: str = "nightly", **overrides: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "name": name,
        "cron": "30 2 * * *",
        "timezone": "Europe/Berlin",
        "template": template(),
        "warm_start_top_k": 3,
    }
    data.update(overrides)
    return data


@pytest.fixture
def api(database_url: str) -> Iterator[TestClient]:
    app = create_app(schedule_settings(database_url, tokens=TOKENS))
    with TestClient(app) as client:
        yield client
    app.state.service.storage.engine.dispose()


def create(api: TestClient, **overrides: Any) -> dict[str, Any]:
    response = api.post("/v1/schedules", json=body(**overrides), headers=ADMIN)
    assert response.status_code == 201, response.text
    return response.json()


def test_create_get_list(api: TestClient) -> None:
    response = api.post("/v1/schedules", json=body(), headers=ADMIN)
    assert response.status_code == 201, response.text
    info = response.json()
    assert response.headers["location"].endswith("/v1/schedules/nightly")
    assert info["enabled"] is True and info["seed_policy"] == "per_night"
    assert info["next_fire_local"].endswith("T02:30")
    assert info["catchup_grace_s"] == 6 * 3600  # the server's default
    assert "name" not in info["template"]
    assert api.get(f"/v1/schedules/{info['id']}", headers=VIEWER).json()["name"] == "nightly"
    listed = api.get("/v1/schedules", headers=VIEWER).json()
    assert [s["name"] for s in listed] == ["nightly"]


@pytest.mark.parametrize(
    ("overrides", "field", "reason"),
    [
        ({"cron": "61 * * * *"}, "body.cron", "not a valid cron expression"),
        ({"cron": "*/5 * * * * 30"}, "body.cron", "five fields"),
        ({"cron": "0 0 31 2 *"}, "body.cron", "never fires"),
        ({"timezone": "Mars/Olympus_Mons"}, "body.timezone", "unknown IANA time zone"),
        ({"timezone": "../../etc/passwd"}, "body.timezone", "not an IANA time zone"),
        (
            {"template": template(search_space={"base_lr": {"low": 1e-2, "high": 1e-3}})},
            "body.template.search_space.base_lr",
            "",
        ),
        ({"template": template(fixed={"base_lr": -1.0})}, "body.template.fixed.base_lr", ""),
        ({"template": {**template(), "name": "x"}}, "body.template.name", "leave it out"),
        ({"warm_start_top_k": -1}, "body.warm_start_top_k", "greater than or equal to 0"),
        ({"name": "1nightly"}, "body.name", "pattern"),
        ({"seed_policy": "random"}, "body.seed_policy", ""),
        ({"catchup_grace_s": 5}, "body.catchup_grace_s", "greater than or equal to 60"),
    ],
)
def test_bad_schedules_get_422_naming_the_field_and_write_nothing(
    api: TestClient, overrides: dict[str, Any], field: str, reason: str
) -> None:
    response = api.post("/v1/schedules", json=body(**overrides), headers=ADMIN)
    assert response.status_code == 422, response.text
    details = response.json()["error"]["details"]
    assert any(d["field"] == field and reason in d["reason"] for d in details), details
    assert api.get("/v1/schedules", headers=VIEWER).json() == []


def test_duplicates_scopes_and_missing(api: TestClient) -> None:
    create(api)
    again = api.post("/v1/schedules", json=body(), headers=ADMIN)
    assert again.status_code == 409 and again.json()["error"]["code"] == "schedule_exists"
    assert api.post("/v1/schedules", json=body("other"), headers=VIEWER).status_code == 403
    assert api.post("/v1/schedules/nightly/pause", headers=VIEWER).status_code == 403
    assert api.get("/v1/schedules").status_code == 401
    missing = api.get("/v1/schedules/nope", headers=VIEWER)
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "schedule_not_found"


def test_update_pause_resume_delete(api: TestClient) -> None:
    create(api)
    patched = api.patch(
        "/v1/schedules/nightly",
        json={"cron": "0 4 * * 1", "timezone": "America/New_York", "warm_start_top_k": 0},
        headers=ADMIN,
    )
    assert patched.status_code == 200, patched.text
    info = patched.json()
    assert (info["cron"], info["timezone"], info["warm_start_top_k"]) == (
        "0 4 * * 1",
        "America/New_York",
        0,
    )
    assert info["next_fire_local"].endswith("T04:00")
    for bad, field in (
        ({"timezone": "Nowhere/Land"}, "body.timezone"),
        ({"cron": "bad"}, "body.cron"),
        ({"name": "renamed"}, "body.name"),
        ({"template": template(search_space={"nope": {"low": 1, "high": 2}})}, "body.template"),
        ({"warm_start_top_k": None}, "body.warm_start_top_k"),
    ):
        response = api.patch("/v1/schedules/nightly", json=bad, headers=ADMIN)
        assert response.status_code == 422, (bad, response.text)
        assert response.json()["error"]["details"][0]["field"].startswith(field)
    unchanged = api.get("/v1/schedules/nightly", headers=VIEWER).json()
    assert unchanged["timezone"] == "America/New_York" and unchanged["cron"] == "0 4 * * 1"

    paused = api.post("/v1/schedules/nightly/pause", headers=ADMIN).json()
    assert paused["enabled"] is False and paused["next_fire_at"] is None
    resumed = api.post("/v1/schedules/nightly/resume", headers=ADMIN).json()
    assert resumed["enabled"] is True and resumed["next_fire_at"] is not None

    run = api.post("/v1/schedules/nightly/run", headers=ADMIN)
    assert run.status_code == 201, run.text
    study = run.json()["study"]
    assert run.json()["kind"] == "manual" and study.startswith("nightly-")
    assert api.get(f"/v1/studies/{study}", headers=VIEWER).status_code == 200
    firings = api.get("/v1/schedules/nightly/firings", headers=VIEWER).json()
    assert [(f["kind"], f["status"], f["study"]) for f in firings] == [("manual", "created", study)]
    assert api.get("/v1/schedules/nightly", headers=VIEWER).json()["last_firing"]["study"] == study

    assert api.delete("/v1/schedules/nightly", headers=ADMIN).status_code == 204
    assert api.get("/v1/schedules/nightly", headers=VIEWER).status_code == 404
    assert api.get(f"/v1/studies/{study}", headers=VIEWER).status_code == 200  # kept


@pytest.fixture
def server(database_url: str) -> Iterator[str]:
    with LiveServer(schedule_settings(database_url, tokens=TOKENS)) as live:
        yield live.url


def test_the_cli_drives_a_schedule_end_to_end(server: str, tmp_path: Path) -> None:
    runner = CliRunner()
    auth = ["--server", server, "--token", "admin-token"]

    def hpo(*args: str) -> str:
        result = runner.invoke(cli_app, [*args, *auth])
        assert result.exit_code == 0, result.output
        return result.output

    spec_file = tmp_path / "nightly.yaml"
    spec_file.write_text(yaml.safe_dump(body()))
    assert "created schedule nightly: '30 2 * * *' in Europe/Berlin" in hpo(
        "schedule", "create", str(spec_file)
    )
    assert "nightly" in hpo("schedule", "list")
    assert "paused" in hpo("schedule", "pause", "nightly")
    assert "enabled" in hpo("schedule", "resume", "nightly")
    assert "'15 3 * * *'" in hpo("schedule", "update", "nightly", "--cron", "15 3 * * *")
    started = hpo("schedule", "run", "nightly")
    assert "started nightly-" in started
    shown = hpo("schedule", "show", "nightly")
    assert "manual created" in shown and "warm start top-3" in shown
    png = tmp_path / "report.png"
    report = hpo("schedule", "report", "nightly", "--png", str(png))
    assert "no complete trial" in report and png.read_bytes().startswith(b"\x89PNG")
    as_json = json.loads(hpo("schedule", "report", "nightly", "--json"))
    assert as_json["schedule"] == "nightly" and len(as_json["nights"]) == 1

    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(body("other", cron="every night")))
    result = runner.invoke(cli_app, ["schedule", "create", str(bad), *auth])
    assert result.exit_code == 2 and "cron" in result.output
    result = runner.invoke(cli_app, ["schedule", "show", "missing", *auth])
    assert result.exit_code == 2 and "no schedule named 'missing'" in result.output
    assert "deleted schedule nightly" in hpo("schedule", "delete", "nightly")
