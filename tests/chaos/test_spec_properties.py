"""Property tests of study-spec validation through the real API (hypothesis, derandomized).

Invalid specs (NaN/±inf bounds, reversed bounds, log with a bound ≤ 0, bad batch sizes, huge
budgets, long names) → 422 naming the field, and no study written. Valid ones → 201, and the
search space they define survives Optuna's distribution JSON round trip with the bounds the
user gave; a leased trial's parameters lie inside those distributions.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from helpers import ADMIN, TOKENS, VIEWER, WORKER, spec
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from optuna.distributions import (
    FloatDistribution,
    IntDistribution,
    distribution_to_json,
    json_to_distribution,
)

from hpo_service.app import create_app
from hpo_service.config import Settings
from hpo_service.schemas import StudySpec
from hpo_service.search_space import build_space, distributions

PROPERTY_SETTINGS = settings(
    max_examples=10,  # each valid example creates a study and leases a trial: keep CI short
    deadline=None,
    derandomize=True,  # a fixed seed: CI sees the same examples every run
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
_names = (f"p{i}" for i in itertools.count())


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    path: Path = tmp_path_factory.mktemp("properties") / "hpo.db"
    app = create_app(
        Settings(
            database_url=f"sqlite:///{path}",
            tokens=TOKENS,  # type: ignore[arg-type]
            run_reaper=False,
            run_scheduler=False,
            db_connect_retries=0,
        )
    )
    with TestClient(app) as test_client:
        yield test_client
    app.state.service.storage.engine.dispose()


def _post(client: TestClient, body: dict[str, Any]) -> Any:
    # The stdlib writes NaN/Infinity, as a careless client would; httpx's json= refuses them.
    return client.post(
        "/v1/studies",
        content=json.dumps(body),
        headers={**ADMIN, "content-type": "application/json"},
    )


positive = st.floats(min_value=1e-6, max_value=1e-2)
factor = st.floats(min_value=1.5, max_value=1e3)

valid_specs = st.fixed_dictionaries(
    {
        "lr": st.tuples(positive, factor, st.booleans()),
        "latent": st.tuples(st.integers(2, 16), st.integers(1, 48)),
        "batch": st.lists(st.sampled_from([16, 32, 64, 128]), min_size=1, max_size=4, unique=True),
        "n_trials": st.integers(1, 100_000),
    }
)  # fmt: skip


@PROPERTY_SETTINGS
@given(valid_specs)
def test_valid_specs_are_accepted_and_round_trip(client: TestClient, drawn: dict[str, Any]) -> None:
    low, times, log = drawn["lr"]
    latent_low, latent_span = drawn["latent"]
    name = next(_names)
    fixed = {k: v for k, v in spec()["fixed"].items() if k != "latent_dim"}  # searched here
    body = spec(
        name=name,
        fixed=fixed,
        budget={"n_trials": drawn["n_trials"], "max_concurrent": 1},
        search_space={
            "base_lr": {"low": low, "high": low * times, "log": log},
            "latent_dim": {"low": latent_low, "high": latent_low + latent_span},
            "batch_size": {"choices": drawn["batch"]},
        },
    )
    response = _post(client, body)
    assert response.status_code == 201, response.text
    stored = StudySpec.model_validate(response.json()["spec"])
    space = distributions(build_space(stored))
    for distribution in space.values():
        assert json_to_distribution(distribution_to_json(distribution)) == distribution
    lr = space["base_lr"]
    assert isinstance(lr, FloatDistribution)
    assert (lr.low, lr.high, lr.log) == (pytest.approx(low), pytest.approx(low * times), log)
    latent = space["latent_dim"]
    assert isinstance(latent, IntDistribution)
    assert (latent.low, latent.high) == (latent_low, latent_low + latent_span)

    granted = client.post("/v1/leases", json={"worker_id": name}, headers=WORKER)
    assert granted.status_code == 200, granted.text
    config = granted.json()["config"]
    # (base_lr is sampled at the reference batch size and then rescaled: search_space.py.)
    for param in ("latent_dim", "batch_size"):
        distribution = space[param]
        value = config[param]
        assert distribution._contains(distribution.to_internal_repr(value)), (param, value)
    assert client.delete(f"/v1/studies/{name}", headers=ADMIN).status_code == 204


_not_finite = st.sampled_from([float("nan"), float("inf"), float("-inf")])
invalid_specs = st.one_of(
    st.builds(lambda bad: ({"search_space": {"base_lr": {"low": bad, "high": 1e-2}}}, "base_lr"),
              _not_finite),
    st.builds(lambda bad: ({"search_space": {"base_lr": {"low": 1e-4, "high": bad}}}, "base_lr"),
              _not_finite),
    st.builds(lambda low, gap: ({"search_space": {"base_lr": {"low": low, "high": low / gap}}},
                                "base_lr"), positive, factor),
    st.builds(lambda low: ({"search_space": {"base_lr": {"low": low, "high": 1e-2, "log": True}}},
                           "base_lr"), st.floats(min_value=-1.0, max_value=0.0)),
    st.builds(lambda bad: ({"search_space": {"batch_size": {"choices": [64, bad]}}}, "batch_size"),
              st.sampled_from([0, -8, 100, 3, 96])),
    st.builds(lambda n: ({"budget": {"n_trials": n}}, "budget.n_trials"),
              st.integers(100_001, 10**12)),
    st.builds(lambda n: ({"name": "x" * n}, "name"), st.integers(121, 5000)),
)  # fmt: skip


@PROPERTY_SETTINGS
@given(invalid_specs)
def test_invalid_specs_are_422_naming_the_field(
    client: TestClient, case: tuple[dict[str, Any], str]
) -> None:
    overrides, field = case
    response = _post(client, spec(name=next(_names), **overrides))
    assert response.status_code == 422, response.text
    details = response.json()["error"]["details"]
    assert any(field in detail["field"] for detail in details), details
    assert all(detail["reason"] for detail in details)
    assert client.get("/v1/studies", headers=VIEWER).json() == []  # nothing half-written
