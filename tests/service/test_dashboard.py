"""The mounted optuna-dashboard: what it shows for a service study, its auth, and that it cannot
write. In process (TestClient) on both backends; the browser test is test_dashboard_browser.py.
"""

from __future__ import annotations

import json
from typing import Any

import optuna
import pytest
from fastapi.testclient import TestClient
from helpers import ADMIN, VIEWER, WORKER, spec

from hpo_service.app import create_app
from hpo_service.client import HPOClient
from hpo_service.config import Settings
from hpo_service.dashboard_view import ReadOnlyView
from hpo_service.errors import ReadOnly
from trainers.worker import Worker, WorkerOptions


def attrs(items: list[dict[str, str]]) -> dict[str, str]:
    """The dashboard's ``[{"key", "value"}]`` attribute list as a dict (values are strings)."""
    return {item["key"]: item["value"] for item in items}


def create(client: TestClient, **overrides: Any) -> dict[str, Any]:
    response = client.post("/v1/studies", json=spec(**overrides), headers=ADMIN)
    assert response.status_code == 201, response.text
    info: dict[str, Any] = response.json()
    return info


def lease(client: TestClient, worker_id: str) -> dict[str, Any]:
    response = client.post("/v1/leases", json={"worker_id": worker_id}, headers=WORKER)
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def dashboard_detail(client: TestClient, study_id: int) -> dict[str, Any]:
    response = client.get(f"/api/studies/{study_id}", headers=VIEWER)
    assert response.status_code == 200, response.text
    detail: dict[str, Any] = response.json()
    return detail


# --- what a user sees ---------------------------------------------------------------------------


def test_a_trained_study_explains_itself_in_the_dashboard(client: TestClient) -> None:
    info = create(
        client,
        name="shown",
        budget={"n_trials": 2, "max_concurrent": 1},
        pruner={"name": "none"},
        max_retries=1,
    )
    # Trial 0's worker gives it back (as on SIGTERM): the retry carries the retry history.
    first = lease(client, "vanished")
    failed = client.post(
        f"/v1/trials/{first['trial_id']}/fail",
        json={"lease_token": first["lease_token"], "reason": "worker shut down", "retryable": True},
        headers=WORKER,
    )
    assert failed.status_code == 200 and failed.json()["retry_trial_number"] == 1
    # The real worker and trainer train the retry and trial 2, reporting every epoch.
    worker_http = TestClient(client.app, headers=WORKER)
    worker = Worker(
        HPOClient(worker_http), WorkerOptions(worker_id="gpu-7", wait_s=0, idle_exit_s=0)
    )
    assert worker.run() == 2

    detail = dashboard_detail(client, info["study_id"])

    # The objective has its name, and the spec is readable attribute by attribute.
    assert detail["objective_names"] == ["val_neg_elbo"]
    study_attrs = attrs(detail["user_attrs"])
    assert json.loads(study_attrs["spec.budget"])["n_trials"] == 2
    assert [o["metric"] for o in json.loads(study_attrs["spec.objectives"])] == ["val_neg_elbo"]
    assert detail["directions"] == ["minimize"]
    assert json.loads(study_attrs["sampler"])["class"] == "TPESampler"
    assert json.loads(study_attrs["pruner"])["class"] == "NopPruner"
    assert "base_lr" in json.loads(study_attrs["search_space"])
    assert json.loads(study_attrs["spec.fixed"])["latent_dim"] == 4
    assert "spec" not in study_attrs  # spread out, not one JSON string cut at 1,024 characters

    trials = {t["number"]: t for t in detail["trials"]}
    assert [trials[n]["state"] for n in (0, 1, 2)] == ["Fail", "Complete", "Complete"]
    for number in (1, 2):
        trial = trials[number]
        assert [v["step"] for v in trial["intermediate_values"]] == [1, 2, 3]
        shown = attrs(trial["user_attrs"])
        assert shown["worker_id"] == "gpu-7"
        for metric in ("val_kl", "active_units", "beta", "lr", "grad_norm_mean", "test_is_nll"):
            float(shown[f"metrics.{metric}"])  # one number per attribute
        assert float(shown["metrics.val_neg_elbo"]) == pytest.approx(trial["values"][0])
        assert "metrics" not in shown
    assert json.loads(attrs(trials[1]["user_attrs"])["retry_history"]) == [0]
    assert attrs(trials[0]["user_attrs"])["worker_id"] == "vanished"

    # Metrics are sortable columns in the trial table.
    sortable = {a["key"]: a["sortable"] for a in detail["union_user_attrs"]}
    assert sortable["metrics.val_kl"] and sortable["metrics.beta"]

    # The study list shows it too, and the API's dashboard link is the study's page.
    listed = client.get("/api/studies", headers=VIEWER).json()["study_summaries"]
    assert [(s["study_id"], s["study_name"]) for s in listed] == [(info["study_id"], "shown")]
    link = client.get("/v1/studies/shown", headers=VIEWER).json()["links"]["dashboard"]
    assert link == f"http://testserver/dashboard/studies/{info['study_id']}"
    page = client.get(link, headers=VIEWER)
    assert page.status_code == 200 and '<div id="dashboard">' in page.text


def test_the_stored_attributes_are_unchanged_by_the_view(
    client: TestClient, database_url: str
) -> None:
    """The view reshapes what the dashboard shows; Optuna's own readers see what was stored."""
    create(client, name="stored")
    leased = lease(client, "w")
    client.post(
        f"/v1/trials/{leased['trial_id']}/report",
        json={
            "lease_token": leased["lease_token"],
            "epoch": 1,
            "value": 120.0,
            "metrics": {"val_kl": 3.5, "kl_per_dim": [1.0, 2.5]},
        },
        headers=WORKER,
    ).raise_for_status()
    study = optuna.load_study(study_name="stored", storage=database_url)
    assert study.trials[0].user_attrs["metrics"] == {
        "epoch": 1,
        "val_kl": 3.5,
        "kl_per_dim": [1.0, 2.5],
    }
    assert study.user_attrs["spec"]["name"] == "stored"


# --- auth ---------------------------------------------------------------------------------------


def test_a_browser_without_a_token_is_sent_to_log_in(client: TestClient) -> None:
    page = client.get("/dashboard/studies/1?tab=x", follow_redirects=False)
    assert page.status_code == 303
    assert page.headers["location"] == "/login?next=/dashboard/studies/1%3Ftab%3Dx"
    root = client.get("/", follow_redirects=False)
    assert root.headers["location"] == "/login?next=/"
    form = client.get("/login?next=/dashboard/studies/1")
    assert form.status_code == 200 and 'name="token"' in form.text
    assert 'value="/dashboard/studies/1"' in form.text


@pytest.mark.parametrize("path", ["/api/studies", "/api/meta", "/static/bundle.js", "/csv/1"])
def test_the_dashboard_api_needs_a_token(client: TestClient, path: str) -> None:
    response = client.get(path, follow_redirects=False)
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "unauthorized"
    bad = client.get(path, headers={"Authorization": "Bearer nope"}, follow_redirects=False)
    assert bad.status_code == 401


@pytest.mark.parametrize("headers", [VIEWER, WORKER, ADMIN])
def test_any_scope_may_look(client: TestClient, headers: dict[str, str]) -> None:
    assert client.get("/api/studies", headers=headers).status_code == 200
    assert client.get("/dashboard", headers=headers).status_code == 200
    assert client.head("/dashboard", headers=headers).status_code == 200


def test_logging_in_sets_a_cookie_that_opens_the_dashboard(client: TestClient) -> None:
    create(client, name="cookie")
    wrong = client.post("/login", data={"token": "guess", "next": "/dashboard"})
    assert wrong.status_code == 401 and "not valid" in wrong.text
    assert "hpo_token" not in client.cookies

    done = client.post(
        "/login",
        data={"token": "viewer-token", "next": "/dashboard/studies/1"},
        follow_redirects=False,
    )
    assert done.status_code == 303 and done.headers["location"] == "/dashboard/studies/1"
    cookie = done.headers["set-cookie"].lower()
    assert "hpo_token=viewer-token" in cookie
    assert "httponly" in cookie and "samesite=strict" in cookie and "path=/" in cookie

    assert client.get("/dashboard").status_code == 200
    assert client.get("/api/studies").json()["study_summaries"][0]["study_name"] == "cookie"
    assert client.get("/v1/studies/cookie").status_code == 200  # reads of the API too
    assert "Logged in with a viewer token" in client.get("/login").text

    out = client.post("/logout", follow_redirects=False)
    assert out.status_code == 303 and out.headers["location"] == "/login"
    assert "hpo_token" not in client.cookies
    assert client.get("/api/studies").status_code == 401


@pytest.mark.parametrize("target", ["//evil.example/x", "https://evil.example/", "/\\evil", ""])
def test_login_never_redirects_off_site(client: TestClient, target: str) -> None:
    done = client.post(
        "/login", data={"token": "viewer-token", "next": target}, follow_redirects=False
    )
    assert done.status_code == 303 and done.headers["location"] == "/dashboard"


def test_the_cookie_never_authorises_a_write(client: TestClient) -> None:
    """CSRF: another site can make a browser POST with its cookie, never with a header."""
    client.cookies.set("hpo_token", "admin-token")
    assert client.get("/v1/studies").status_code == 200
    refused = client.post("/v1/studies", json=spec("forged"))
    assert refused.status_code == 401 and refused.json()["error"]["code"] == "unauthorized"
    assert client.delete("/v1/studies/forged").status_code == 401
    assert client.post("/v1/leases", json={"worker_id": "x"}).status_code == 401
    assert client.get("/v1/studies").json() == []  # nothing was created
    assert client.post("/v1/studies", json=spec("real"), headers=ADMIN).status_code == 201


def test_unknown_paths_are_not_the_dashboards(client: TestClient) -> None:
    for path in ("/v1/nope", "/nope", "/v1"):
        response = client.get(path, headers=VIEWER)
        assert response.status_code == 404, path
        assert response.json()["error"]["code"] == "not_found"


def test_the_schema_upgrade_page_is_never_offered(client: TestClient) -> None:
    """The service owns Optuna's schema; the dashboard's upgrade page just goes home."""
    page = client.get("/incompatible-rdb-schema", headers=VIEWER, follow_redirects=False)
    assert page.status_code == 302 and page.headers["location"].endswith("/dashboard")


def test_an_open_loopback_server_needs_no_login(database_url: str) -> None:
    app = create_app(Settings(database_url=database_url, run_reaper=False, db_connect_retries=0))
    try:
        with TestClient(app) as client:
            assert client.get("/api/studies").status_code == 200
            assert client.get("/login", follow_redirects=False).headers["location"] == "/dashboard"
            assert client.post("/api/studies", json={}).status_code == 405
    finally:
        app.state.service.storage.engine.dispose()


# --- read-only ----------------------------------------------------------------------------------


def snapshot(storage: optuna.storages.BaseStorage) -> list[Any]:
    """Everything the dashboard could change: studies, their attributes, every trial."""
    state = []
    for study in sorted(storage.get_all_studies(), key=lambda s: s._study_id):
        trials = storage.get_all_trials(study._study_id)
        state.append(
            (
                study.study_name,
                study.user_attrs,
                study.system_attrs,
                [
                    (t.number, t.state, t.values, t.params, t.user_attrs, t.system_attrs)
                    for t in trials
                ],
            )
        )
    return state


def test_every_dashboard_write_is_refused_and_changes_nothing(client: TestClient) -> None:
    info = create(client, name="readonly", budget={"n_trials": 3, "max_concurrent": 3})
    running = lease(client, "w")  # a RUNNING trial the dashboard could try to tell
    study_id, trial_id = info["study_id"], running["trial_id"]
    storage = client.app.state.service.storage  # type: ignore[attr-defined]
    before = snapshot(storage)

    writes = [
        ("POST", "/api/studies", {"study_name": "made", "directions": ["minimize"]}),
        ("POST", f"/api/studies/{study_id}/rename", {"study_name": "renamed"}),
        ("DELETE", f"/api/studies/{study_id}", None),
        ("PUT", f"/api/studies/{study_id}/note", {"version": 0, "body": "x"}),
        ("POST", f"/api/trials/{trial_id}/tell", {"state": "Complete", "values": [1.0]}),
        ("POST", f"/api/trials/{trial_id}/user-attrs", {"user_attrs": {"x": 1}}),
        ("PUT", f"/api/studies/{study_id}/{trial_id}/note", {"version": 0, "body": "x"}),
        ("POST", f"/api/studies/{study_id}/{trial_id}/skip", None),
        ("POST", f"/api/artifacts/{study_id}/{trial_id}", {"file": "data:,x", "filename": "a"}),
        ("POST", f"/api/artifacts/{study_id}", {"file": "data:,x", "filename": "a"}),
        ("DELETE", f"/api/artifacts/{study_id}/{trial_id}/0123abcd", None),
        ("POST", "/api/llm/trial_filter_query", {}),
        ("POST", "/incompatible-rdb-schema", None),
        ("PATCH", f"/api/studies/{study_id}", {}),
        ("POST", "/dashboard", None),
    ]
    for method, path, body in writes:
        for auth in (ADMIN, VIEWER):
            response = client.request(method, path, json=body, headers=auth)
            assert response.status_code == 405, (method, path, response.text)
            assert response.json()["error"]["code"] == "read_only"
            assert response.headers["allow"] == "GET, HEAD"
    # Without credentials as well: no write is reachable by anyone (401 first: issue 13.8).
    assert client.post("/incompatible-rdb-schema").status_code == 401

    assert snapshot(storage) == before
    assert (
        client.get("/v1/studies/readonly/trials", headers=VIEWER).json()["trials"][0]["state"]
        == "running"
    )


@pytest.mark.parametrize(
    ("method", "args"),
    [
        ("create_new_study", ([optuna.study.StudyDirection.MINIMIZE], "x")),
        ("delete_study", (1,)),
        ("set_study_user_attr", (1, "k", 1)),
        ("set_study_system_attr", (1, "k", 1)),
        ("create_new_trial", (1,)),
        ("set_trial_param", (1, "p", 0.5, optuna.distributions.FloatDistribution(0, 1))),
        ("set_trial_state_values", (1, optuna.trial.TrialState.COMPLETE, [1.0])),
        ("set_trial_intermediate_value", (1, 1, 1.0)),
        ("set_trial_user_attr", (1, "k", 1)),
        ("set_trial_system_attr", (1, "k", 1)),
    ],
)
def test_the_view_refuses_every_storage_write(
    settings: Settings, method: str, args: tuple[Any, ...]
) -> None:
    """Behind the HTTP guard, the storage the dashboard holds cannot write either."""
    storage = optuna.storages.RDBStorage(settings.database_url)
    try:
        optuna.create_study(study_name="kept", storage=storage).ask()
        before = snapshot(storage)
        with pytest.raises(ReadOnly):
            getattr(ReadOnlyView(storage), method)(*args)
        assert snapshot(storage) == before
    finally:
        storage.engine.dispose()
