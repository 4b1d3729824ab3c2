"""The LR range test as a study step (issue 10.4), through the API on SQLite and PostgreSQL:
the probe is leased first and alone, its curve sets the LR ranges the trials after it are
sampled from, a reaped probe is retried, a failed one keeps the defaults, bad settings are 422.
The worker here is the test (it sends curves with known suggestions); ``test_lr_range_e2e``
runs the real worker process on real data."""

from __future__ import annotations

import math
import time
from typing import Any

import optuna
import pytest
from byo_helpers import wait_for
from fastapi.testclient import TestClient
from helpers import ADMIN, VIEWER, WORKER, spec

from hpo_service import lr_range
from hpo_service.schemas import LRRangeTestResult

KINDS = ["trial", "lr_range_test"]
#: The default space's base_lr range (hpo_service.search_space.default_space).
DEFAULT_BASE_LR = (3e-4, 1e-2)


def create(client: TestClient, name: str, **overrides: Any) -> None:
    body = spec(name=name, lr_range_test={"enabled": True, "num_iter": 20}, **overrides)
    response = client.post("/v1/studies", json=body, headers=ADMIN)
    assert response.status_code == 201, response.text


def lease(
    client: TestClient, worker: str = "w1", kinds: list[str] | None = KINDS
) -> dict[str, Any] | None:
    body: dict[str, Any] = {"worker_id": worker}
    if kinds is not None:
        body["kinds"] = kinds
    response = client.post("/v1/leases", json=body, headers=WORKER)
    if response.status_code == 204:
        return None
    assert response.status_code == 200, response.text
    return response.json()


def curve(base: float | None, peak: float | None) -> dict[str, Any]:
    lrs = [1e-6 * 10 ** (i / 4) for i in range(20)]
    return {
        "lrs": lrs,
        "losses": [100.0 - i for i in range(20)],
        "suggested_base_lr": base,
        "suggested_max_lr": peak,
        "batch_size": 128,
    }


def send(client: TestClient, probe: dict[str, Any], body: dict[str, Any]) -> Any:
    return client.post(
        f"/v1/trials/{probe['trial_id']}/lr-range-test",
        json={"lease_token": probe["lease_token"], **body},
        headers=WORKER,
    )


def study(client: TestClient, name: str) -> dict[str, Any]:
    response = client.get(f"/v1/studies/{name}", headers=VIEWER)
    assert response.status_code == 200, response.text
    return response.json()


def test_the_probe_goes_first_alone_and_its_range_bounds_the_trials(client: TestClient) -> None:
    create(client, "lr", budget={"n_trials": 4, "max_concurrent": 4})
    assert lease(client, "old-worker", kinds=None) is None  # trials only: nothing for it yet
    probe = lease(client)
    assert probe is not None and probe["kind"] == "lr_range_test"
    assert probe["task"]["num_iter"] == 20 and probe["params"] == {}
    assert probe["config"]["batch_size"] == 128 and probe["config"]["dataset"] == "synthetic"
    assert lease(client, "w2") is None  # no trial is sampled while the probe runs
    assert study(client, "lr")["lr_range_test"] == {"status": "pending"}
    # a probe is not a trial: `complete` refuses it
    refused = client.post(
        f"/v1/trials/{probe['trial_id']}/complete",
        json={"lease_token": probe["lease_token"], "values": [1.0]},
        headers=WORKER,
    )
    assert refused.status_code == 409 and refused.json()["error"]["code"] == "wrong_lease_kind"

    answer = send(client, probe, curve(1e-4, 2e-3))
    assert answer.status_code == 200, answer.text
    assert answer.json()["status"] == "applied"
    # base_lr's top: max(hi/10, √(lo·hi)) = √(2e-7) ≈ 4.47e-4 (a narrow curve: the middle);
    # max_lr_factor's top: hi/lo = 20, clamped to the default space's 10
    ranges = answer.json()["ranges"]
    assert ranges["base_lr"] == [1e-4, pytest.approx(math.sqrt(1e-4 * 2e-3))]
    assert ranges["max_lr_factor"] == [2.0, 10.0]
    assert send(client, probe, curve(1e-4, 2e-3)).json() == answer.json()  # idempotent
    again = send(client, probe, curve(1e-4, 3e-3))
    assert again.status_code == 409 and again.json()["error"]["code"] == "result_conflict"

    trials = [lease(client, f"t{i}") for i in range(4)]
    assert all(t is not None and t["kind"] == "trial" for t in trials)
    base_lrs = [t["params"]["base_lr"] for t in trials if t is not None]
    assert all(1e-4 <= lr <= 4.48e-4 for lr in base_lrs), base_lrs
    info = study(client, "lr")
    assert info["lr_range_test"]["status"] == "applied"
    assert info["lr_range_test"]["curve_points"] == 20
    # the probe counts toward nothing: 4 trials running of a 4-trial budget
    assert info["counts"] == {"waiting": 0, "running": 4, "complete": 0, "pruned": 0, "fail": 0}
    storage = client.app.state.service.storage  # type: ignore[attr-defined]
    recorded = optuna.load_study(study_name="lr", storage=storage)
    first = recorded.trials[0]
    assert first.user_attrs["task"] == "lr_range_test"
    assert first.state == optuna.trial.TrialState.FAIL  # the state no sampler learns from
    assert recorded.user_attrs["lr_range_test"]["curve"]["losses"][0] == 100.0
    for trial in recorded.trials[1:]:
        bounds = trial.distributions["base_lr"]
        assert (bounds.low, bounds.high) == (1e-4, ranges["base_lr"][1])  # the new range


def test_a_curve_without_a_range_keeps_the_defaults_and_says_why(client: TestClient) -> None:
    create(client, "flat")
    probe = lease(client)
    assert probe is not None
    answer = send(client, probe, curve(None, None)).json()
    assert answer["status"] == "failed" and "never fell" in answer["reason"]
    granted = lease(client)
    assert granted is not None and granted["kind"] == "trial"
    info = study(client, "flat")["lr_range_test"]
    assert info["status"] == "failed" and "default ranges are kept" in info["reason"]
    storage = client.app.state.service.storage  # type: ignore[attr-defined]
    trial = optuna.load_study(study_name="flat", storage=storage).trials[-1]
    bounds = trial.distributions["base_lr"]
    assert (bounds.low, bounds.high) == DEFAULT_BASE_LR


def test_a_reaped_probe_is_retried_and_one_failed_for_good_keeps_the_defaults(
    client: TestClient,
) -> None:
    create(client, "reaped", max_retries=1)
    first = lease(client, "dies")
    assert first is not None and first["kind"] == "lr_range_test"
    time.sleep(2.2)  # past the 1 s lease timeout, by the database clock
    client.app.state.service.reap()  # type: ignore[attr-defined]
    late = send(client, first, curve(1e-4, 2e-3))
    assert late.status_code == 409 and late.json()["error"]["code"] == "trial_reaped"
    retried = lease(client, "w2")
    assert retried is not None and retried["kind"] == "lr_range_test"
    assert retried["trial_id"] != first["trial_id"]
    assert retried["task"] == first["task"]
    assert study(client, "reaped")["lr_range_test"] == {"status": "pending"}
    # the retry fails for good (not retryable): the study goes on with the default ranges
    failed = client.post(
        f"/v1/trials/{retried['trial_id']}/fail",
        json={"lease_token": retried["lease_token"], "reason": "ConfigError: no GPU"},
        headers=WORKER,
    )
    assert failed.status_code == 200, failed.text
    granted = lease(client, "w3")
    assert granted is not None and granted["kind"] == "trial"
    info = study(client, "reaped")
    assert info["lr_range_test"]["status"] == "failed"
    assert "ConfigError: no GPU" in info["lr_range_test"]["reason"]
    assert info["counts"]["fail"] == 0 and info["counts"]["running"] == 1
    assert info["state"] == "running"  # failed probes are no failed trials of the budget


# Spec validation runs before any storage is touched: one backend is enough.
@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
@pytest.mark.parametrize(
    ("lr_test", "overrides", "needle"),
    [
        ({"enabled": True, "start_lr": 1e-2, "end_lr": 1e-3}, {}, "end_lr"),
        ({"enabled": True, "num_iter": 3}, {}, "num_iter"),
        ({"enabled": True, "smooth": 1.0}, {}, "smooth"),
        ({"enabled": True, "diverge_threshold": 1.0}, {}, "diverge_threshold"),
        ({"enabled": True, "bogus": 1}, {}, "bogus"),
        ({"enabled": True}, {"drop": ["base_lr"]}, "lr_range_test.enabled"),
        (
            {"enabled": True},
            {"search_space": {"base_lr": {"low": 1e-4, "high": 1e-3}}},
            "search_space.base_lr",
        ),
    ],
)
def test_bad_lr_range_test_settings_are_422_naming_the_field(
    client: TestClient, lr_test: dict[str, Any], overrides: dict[str, Any], needle: str
) -> None:
    body = spec(name="bad", lr_range_test=lr_test, **overrides)
    response = client.post("/v1/studies", json=body, headers=ADMIN)
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    text = " ".join(f"{d['field']} {d['reason']}" for d in error["details"]) + error["message"]
    assert needle in text, error
    assert client.get("/v1/studies", headers=ADMIN).json() == []


def test_bad_curves_are_422_and_leave_the_probe_running(client: TestClient) -> None:
    create(client, "curves")
    probe = lease(client)
    assert probe is not None
    for body, needle in (
        ({**curve(1e-4, 2e-3), "losses": [1.0]}, "one point per LR"),
        (curve(2e-3, 1e-4), "greater than `suggested_base_lr`"),
        (curve(-1.0, 2e-3), "positive"),
    ):
        response = send(client, probe, body)
        assert response.status_code == 422, response.text
        assert needle in response.text
    assert lease(client, "w2") is None  # still the probe's turn
    assert send(client, probe, curve(1e-4, 2e-3)).status_code == 200


def test_the_curve_is_drawn_and_listed_on_the_study_s_dashboard_page(
    client: TestClient,
) -> None:
    create(client, "lrplot", budget={"n_trials": 2, "max_concurrent": 2})
    probe = lease(client)
    assert probe is not None and study(client, "lrplot")["lr_range_test"] == {"status": "pending"}
    assert send(client, probe, {**curve(1e-4, 2e-3), "lr_scale": 2.0}).status_code == 200
    # drawn off the request by the drawing process: wait for the listing
    url = wait_for(
        lambda: study(client, "lrplot")["lr_range_test"].get("plot"), 300, "the LR plot listed"
    )
    storage = client.app.state.service.storage  # type: ignore[attr-defined]
    study_id = storage.get_study_id_from_name("lrplot")
    detail = client.get(f"/api/studies/{study_id}", headers=VIEWER).json()
    (listed,) = [a for a in detail["artifacts"] if a["filename"] == "lr_range_test.png"]
    assert url == f"/artifacts/{study_id}/{listed['artifact_id']}"
    assert listed["mimetype"] == "image/png"
    served = client.get(url, headers=VIEWER)
    assert served.status_code == 200 and served.content[:8] == b"\x89PNG\r\n\x1a\n"
    # the trials' own pages do not list it: it belongs to the study
    for trial in detail["trials"]:
        assert all(a["filename"] != "lr_range_test.png" for a in trial["artifacts"])


@pytest.mark.parametrize(
    ("lo", "hi", "base_bottom", "base_top", "factor_top"),
    [
        # a wide curve (the session-6 probe on mnist5k): base_lr spans the decade 10-100×
        # below hi, not down to where the loss only started to fall
        (2.3e-4, 0.107, 0.00107, 0.0107, 10.0),
        # a narrow one: from lo to the geometric middle, and the peak factor's floor of 2.5
        (1e-3, 2e-3, 1e-3, math.sqrt(2e-6), 2.5),
    ],
)
def test_the_ranges_keep_base_lr_an_order_of_magnitude_below_where_the_loss_stopped_falling(
    lo: float, hi: float, base_bottom: float, base_top: float, factor_top: float
) -> None:
    result = LRRangeTestResult(
        lease_token="t", lrs=[], losses=[], suggested_base_lr=lo, suggested_max_lr=hi,
        batch_size=128,
    )  # fmt: skip
    ranges = lr_range.ranges_from(result)
    assert isinstance(ranges, dict)
    assert ranges["base_lr"] == [pytest.approx(base_bottom), pytest.approx(base_top)]
    assert ranges["max_lr_factor"] == [2.0, pytest.approx(factor_top)]
