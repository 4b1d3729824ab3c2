"""The rows ``studies/_optuna_rows`` writes into Optuna's tables are the rows Optuna's own
storage calls write (issue 12), on SQLite and PostgreSQL, and that module is pinned to the
Optuna series it was checked against: on another Optuna these tests fail until it is re-checked.
"""

from __future__ import annotations

import time
from datetime import datetime
from typing import Any

import optuna
import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.exceptions import UpdateFinishedTrialError
from optuna.trial import FrozenTrial, TrialState
from sqlalchemy import text

from hpo_service.config import Settings
from hpo_service.storage import build_storage
from hpo_service.studies import _optuna_rows

DISTRIBUTIONS = {
    "lr": FloatDistribution(1e-5, 1e-1, log=True),
    "dropout": FloatDistribution(0.0, 0.5, step=0.1),
    "latent": IntDistribution(2, 64, log=True),
    "layers": IntDistribution(1, 5, step=2),
    "schedule": CategoricalDistribution(["constant", "cyclical", None]),
}
PARAMS = {"lr": 3e-4, "dropout": 0.2, "latent": 16, "layers": 3, "schedule": None}


def template(**changes: Any) -> FrozenTrial:
    fields: dict[str, Any] = {
        "number": 0,
        "state": TrialState.RUNNING,
        "value": None,
        "values": None,
        "datetime_start": datetime(2026, 12, 1, 12, 30, 15, 123456),
        "datetime_complete": None,
        "params": dict(PARAMS),
        "distributions": dict(DISTRIBUTIONS),
        "user_attrs": {"worker_id": "w-1", "config": {"lr": 3e-4, "nested": [1, 2.5, None]}},
        "system_attrs": {"constant_liar": True},
        "intermediate_values": {},
        "trial_id": -1,
    }
    fields.update(changes)
    return FrozenTrial(**fields)


def rows(storage: optuna.storages.RDBStorage, study_id: int) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of the study's trials in Optuna's tables, without the surrogate ids."""
    by_number = "SELECT t.number, {cols} FROM {table} x JOIN trials t ON t.trial_id = x.trial_id "
    queries = {
        "trials": "SELECT number, state, datetime_start, datetime_complete FROM trials "
        "WHERE study_id = :s ORDER BY number",
        "params": by_number.format(
            cols="x.param_name, x.param_value, x.distribution_json", table="trial_params"
        )
        + "WHERE t.study_id = :s ORDER BY 1, 2",
        "user": by_number.format(cols="x.key, x.value_json", table="trial_user_attributes")
        + "WHERE t.study_id = :s ORDER BY 1, 2",
        "system": by_number.format(cols="x.key, x.value_json", table="trial_system_attributes")
        + "WHERE t.study_id = :s ORDER BY 1, 2",
        "intermediate": by_number.format(
            cols="x.step, x.intermediate_value, x.intermediate_value_type",
            table="trial_intermediate_values",
        )
        + "WHERE t.study_id = :s ORDER BY 1, 2",
    }
    with storage.engine.connect() as connection:
        return {
            name: [tuple(row) for row in connection.execute(text(sql), {"s": study_id})]
            for name, sql in queries.items()
        }


@pytest.fixture
def storage(database_url: str) -> Any:
    built = build_storage(Settings(database_url=database_url, db_connect_retries=0))
    yield built
    built.engine.dispose()


@pytest.fixture
def away_from_utc(monkeypatch: pytest.MonkeyPatch) -> Any:
    """A local time zone that is not UTC: Optuna stores naive local datetimes as naive UTC."""
    monkeypatch.setenv("TZ", "America/New_York")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


def two_studies(storage: optuna.storages.RDBStorage) -> tuple[int, int]:
    """Two studies with two earlier trials each (so numbering is exercised)."""
    ids = []
    for name in ("optuna-path", "rows-path"):
        study_id = optuna.create_study(study_name=name, storage=storage)._study_id
        bare = template(params={}, distributions={}, user_attrs={}, system_attrs={})
        for _ in range(2):
            storage.create_new_trial(study_id, template_trial=bare)
        ids.append(study_id)
    return ids[0], ids[1]


def test_the_pin_names_the_optuna_series_in_use() -> None:
    # On another Optuna this fails: check _optuna_rows against it, then move the pin.
    assert _optuna_rows.rows_supported(), f"re-check _optuna_rows for optuna {optuna.__version__}"
    assert _optuna_rows.rows_supported("5.0.7")
    assert not _optuna_rows.rows_supported("5.1.0")
    assert not _optuna_rows.rows_supported("4.9.0")


def test_a_new_trial_writes_the_rows_create_new_trial_writes(
    storage: optuna.storages.RDBStorage, away_from_utc: None
) -> None:
    theirs, ours = two_studies(storage)
    storage.create_new_trial(theirs, template_trial=template())
    known = _optuna_rows.first_distributions(storage.get_all_trials(ours))
    written = _optuna_rows.create_trial(storage, ours, template(), known)

    assert rows(storage, ours) == rows(storage, theirs)
    assert rows(storage, ours)["params"]  # the comparison saw rows, not two empty tables
    assert written.number == 2
    assert storage.get_trial(written._trial_id) == written  # what it returns is what is stored


def test_an_incompatible_distribution_is_refused_as_optuna_refuses_it(
    storage: optuna.storages.RDBStorage,
) -> None:
    theirs, ours = two_studies(storage)
    storage.create_new_trial(theirs, template_trial=template())
    _optuna_rows.create_trial(storage, ours, template(), {})
    other = dict(DISTRIBUTIONS, latent=FloatDistribution(2.0, 64.0))  # int became float
    before = rows(storage, ours)
    with pytest.raises(ValueError):
        storage.create_new_trial(theirs, template_trial=template(distributions=other))
    known = _optuna_rows.first_distributions(storage.get_all_trials(ours))
    with pytest.raises(ValueError):
        _optuna_rows.create_trial(storage, ours, template(distributions=other), known)
    assert rows(storage, ours) == before  # nothing of the refused trial written


def test_reports_write_the_rows_optuna_writes_and_refuse_a_finished_trial_alone(
    storage: optuna.storages.RDBStorage,
) -> None:
    theirs, ours = two_studies(storage)
    mine = [t._trial_id for t in storage.get_all_trials(ours)]
    other = [t._trial_id for t in storage.get_all_trials(theirs)]
    # The second trial of each study finishes first: its report must be refused.
    for finished in (mine[1], other[1]):
        storage.set_trial_state_values(finished, TrialState.FAIL)
    batches: list[list[tuple[int, dict[str, Any] | None, tuple[int, float] | None]]] = [
        [(0, {"epoch": 1, "kl": [1.0, None]}, (1, 140.5)), (1, {"epoch": 1}, (1, 1.0))],
        # a later report overwrites the metrics; a step again overwrites, as Optuna does
        [(0, {"epoch": 2}, (2, float("inf"))), (0, None, (1, 139.0))],
        [(0, {"epoch": 3}, None)],
    ]
    for batch in batches:
        for i, metrics, intermediate in batch:  # Optuna's own calls, one at a time
            try:
                if metrics is not None:
                    storage.set_trial_user_attr(other[i], "metrics", metrics)
                if intermediate is not None:
                    storage.set_trial_intermediate_value(other[i], *intermediate)
            except UpdateFinishedTrialError:
                assert i == 1
        refused = _optuna_rows.write_reports(
            storage, [(mine[i], metrics, intermediate) for i, metrics, intermediate in batch]
        )
        assert set(refused) == ({mine[1]} if any(i == 1 for i, _, _ in batch) else set())
        assert all(isinstance(e, UpdateFinishedTrialError) for e in refused.values())

    ours_rows, their_rows = rows(storage, ours), rows(storage, theirs)
    del ours_rows["trials"], their_rows["trials"]  # finished by each its own clock
    assert ours_rows == their_rows
    assert storage.get_trial(mine[0]).intermediate_values == {1: 139.0, 2: float("inf")}
    assert storage.get_trial(mine[1]).intermediate_values == {}  # refused: nothing written
    with pytest.raises(KeyError):
        _optuna_rows.write_reports(storage, [(10_000_000, {"epoch": 1}, None)])
