"""Optuna's rows of a new trial and of a batch of reports, in a few statements (issue 12).

**An open exception to ARCHITECTURE's "never touch Optuna's tables".** Optuna 5.0's public
storage API writes a new trial of 10 parameters in 38 statements (``create_new_trial`` with a
template: per parameter a SELECT of the trial, a SELECT of the study's first row of that
parameter, an INSERT; per attribute a SELECT and an upsert; a count and an UPDATE of the
number) and a report in 5 (the trial read once per write, then the upsert and a SELECT before
the INSERT of the intermediate value), with no batch write at all. This module writes the
*same rows* through Optuna's own ORM models (``optuna.storages._rdb.models``) in one of
Optuna's own sessions:

- a new trial: the study row locked ``FOR UPDATE`` as Optuna does, one INSERT of the trial
  that numbers it in the same statement (Optuna's count of the study's earlier trials), one
  INSERT of all its parameters, one of its user and one of its system attributes;
- a batch of reports: one SELECT of the trials' states (Optuna's running check, once per
  trial), one upsert of all ``metrics`` attributes and one of all intermediate values.

Rows and checks are Optuna's: the parameter rows hold ``distribution.to_internal_repr`` and
``distribution_to_json`` as ``_set_trial_param_without_commit`` writes them, after the same
``check_distribution_compatibility`` against the study's first distribution of that name;
intermediate values go through ``intermediate_value_to_stored_repr``; a finished trial is
refused with Optuna's own ``UpdateFinishedTrialError``, nothing of it written.
``tests/service/test_optuna_rows.py`` compares every row with Optuna's own path on SQLite and
PostgreSQL. It is written against Optuna 5.0 only: ``rows_supported()`` is false on any other
version, the service then takes Optuna's public calls (and says so in its log), and that test
fails loudly until this module is checked against the new version.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from typing import Any

import optuna
from optuna.distributions import (
    BaseDistribution,
    check_distribution_compatibility,
    distribution_to_json,
)
from optuna.exceptions import UpdateFinishedTrialError
from optuna.storages._rdb import models
from optuna.storages._rdb.storage import _create_scoped_session
from optuna.trial import FrozenTrial, TrialState
from sqlalchemy import func, insert, select
from sqlalchemy.dialects import postgresql, sqlite

log = logging.getLogger(__name__)

#: The Optuna series these writes were checked against, row for row.
OPTUNA_SERIES = "5.0"


def rows_supported(version: str = optuna.__version__) -> bool:
    """Whether this Optuna is the series this module writes the rows of."""
    return version.split(".")[:2] == OPTUNA_SERIES.split(".")


def warn_if_unsupported() -> bool:
    """``rows_supported()``, logging once at start-up that the slow public path is taken."""
    if rows_supported():
        return True
    log.error(
        "optuna %s is not %s.x: new trials and reports go through Optuna's public storage "
        "calls (several times the statements); check hpo_service/studies/_optuna_rows.py "
        "against this version (tests/service/test_optuna_rows.py) before pinning it",
        optuna.__version__,
        OPTUNA_SERIES,
    )
    return False


def _utc_naive(moment: datetime | None) -> datetime | None:
    """A datetime as Optuna stores it (``TrialModel.datetime_start``: naive UTC)."""
    return None if moment is None else moment.astimezone(UTC).replace(tzinfo=None)


def _upsert(engine_name: str, table: Any, keys: list[str], updated: list[str]) -> Any:
    dialect = postgresql if engine_name == "postgresql" else sqlite
    statement = dialect.insert(table)
    return statement.on_conflict_do_update(
        index_elements=keys, set_={name: statement.excluded[name] for name in updated}
    )


def first_distributions(trials: Iterable[FrozenTrial]) -> dict[str, BaseDistribution]:
    """Per parameter, its distribution in the study's earliest trial that has it (``trials`` in
    order of number, as Optuna lists them): what Optuna's ``_set_trial_param_without_commit``
    checks a new parameter against."""
    first: dict[str, BaseDistribution] = {}
    for trial in trials:
        for name, distribution in trial.distributions.items():
            first.setdefault(name, distribution)
    return first


def create_trial(
    storage: optuna.storages.RDBStorage,
    study_id: int,
    template: FrozenTrial,
    known: dict[str, BaseDistribution],
) -> FrozenTrial:
    """Write ``template`` (a RUNNING trial with parameters and attributes, no values or
    intermediate values) as a new trial of ``study_id``, the rows ``create_new_trial`` writes;
    returns it as written (its id, number and start time set). ``known``: the study's first
    distribution per parameter (``first_distributions``), checked as Optuna checks it.

    Raises ``ValueError`` for an incompatible distribution (nothing written) and
    ``StorageInternalError`` for a database error, as Optuna does."""
    if template.state != TrialState.RUNNING or template.values or template.intermediate_values:
        raise ValueError("only a running trial without values is written here")
    for name, distribution in template.distributions.items():
        if name in known:
            check_distribution_compatibility(known[name], distribution)
    trials = models.TrialModel.__table__
    with _create_scoped_session(storage.scoped_session) as session:
        # Optuna's lock of the study for numbering (a no-op on SQLite), so raw Optuna clients
        # of the same storage number their trials after or before this one, never beside it.
        models.StudyModel.find_or_raise_by_id(study_id, session, for_update=True)
        # Optuna numbers a trial by its study's trials with a smaller id: under the study row's
        # lock that is every trial of the study there is, counted in the INSERT itself.
        count = (
            select(func.count(trials.c.trial_id))
            .where(trials.c.study_id == study_id)
            .scalar_subquery()
        )
        trial_id, number = session.execute(
            insert(trials)
            .values(
                number=count,
                study_id=study_id,
                state=TrialState.RUNNING,
                datetime_start=_utc_naive(template.datetime_start),
                datetime_complete=None,
            )
            .returning(trials.c.trial_id, trials.c.number)
        ).one()
        if template.params:
            session.execute(
                insert(models.TrialParamModel.__table__),
                [
                    {
                        "trial_id": trial_id,
                        "param_name": name,
                        "param_value": distribution.to_internal_repr(template.params[name]),
                        "distribution_json": distribution_to_json(distribution),
                    }
                    for name, distribution in template.distributions.items()
                ],
            )
        for model, attrs in (
            (models.TrialUserAttributeModel, template.user_attrs),
            (models.TrialSystemAttributeModel, template.system_attrs),
        ):
            if attrs:
                session.execute(
                    insert(model.__table__),
                    [
                        {"trial_id": trial_id, "key": key, "value_json": json.dumps(value)}
                        for key, value in attrs.items()
                    ],
                )
    written = FrozenTrial(
        number=number,
        state=TrialState.RUNNING,
        value=None,
        values=None,
        datetime_start=template.datetime_start,
        datetime_complete=None,
        params=dict(template.params),
        distributions=dict(template.distributions),
        user_attrs=dict(template.user_attrs),
        system_attrs=dict(template.system_attrs),
        intermediate_values={},
        trial_id=trial_id,
    )
    return written


def write_reports(
    storage: optuna.storages.RDBStorage,
    reports: Sequence[tuple[int, dict[str, Any] | None, tuple[int, float] | None]],
) -> dict[int, UpdateFinishedTrialError]:
    """Per ``(trial id, metrics, intermediate)`` the ``metrics`` user attribute (if given) and
    the intermediate value ``(step, value)`` (if given), all in one transaction. Returns, by
    trial id, Optuna's ``UpdateFinishedTrialError`` for each trial no longer running (nothing
    of it written). A trial id Optuna does not know raises ``KeyError`` (nothing written).
    A trial named twice gets its writes in order (the later value stands)."""
    refused: dict[int, UpdateFinishedTrialError] = {}
    if not reports:
        return refused
    trials = models.TrialModel.__table__
    attrs: dict[tuple[int, str], str] = {}
    values: dict[tuple[int, int], tuple[float | None, Any]] = {}
    with _create_scoped_session(storage.scoped_session) as session:
        ids = sorted({trial_id for trial_id, _, _ in reports})
        found = session.execute(
            select(trials.c.trial_id, trials.c.state).where(trials.c.trial_id.in_(ids))
        )
        states: dict[int, TrialState] = {trial_id: state for trial_id, state in found}
        for trial_id in ids:
            if trial_id not in states:
                raise KeyError(models.NOT_FOUND_MSG)
            try:
                storage.check_trial_is_updatable(trial_id, states[trial_id])
            except UpdateFinishedTrialError as error:
                refused[trial_id] = error
        for trial_id, metrics, intermediate in reports:
            if trial_id in refused:
                continue
            if metrics is not None:
                attrs[(trial_id, "metrics")] = json.dumps(metrics)
            if intermediate is not None:
                step, value = intermediate
                stored = models.TrialIntermediateValueModel.intermediate_value_to_stored_repr(value)
                values[(trial_id, step)] = stored
        engine = storage.engine.name
        if attrs:
            table = models.TrialUserAttributeModel.__table__
            session.execute(
                _upsert(engine, table, ["trial_id", "key"], ["value_json"]),
                [{"trial_id": t, "key": k, "value_json": v} for (t, k), v in attrs.items()],
            )
        if values:
            table = models.TrialIntermediateValueModel.__table__
            session.execute(
                _upsert(
                    engine,
                    table,
                    ["trial_id", "step"],
                    ["intermediate_value", "intermediate_value_type"],
                ),
                [
                    {
                        "trial_id": t,
                        "step": s,
                        "intermediate_value": stored,
                        "intermediate_value_type": kind,
                    }
                    for (t, s), (stored, kind) in values.items()
                ],
            )
    return refused
