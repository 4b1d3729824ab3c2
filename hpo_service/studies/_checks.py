"""A worker's claim on a trial, checked: its lease token, and whether the trial still runs.

Shared by every route a worker calls with a lease (heartbeat, report, complete, fail).
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping, Sequence

from optuna.trial import FrozenTrial, TrialState
from sqlalchemy import select
from sqlalchemy.orm import Session

from hpo_service.errors import (
    Conflict,
    InvalidSpec,
    LeaseMismatch,
    NotFound,
    TrialFinished,
    TrialNotFound,
    TrialReaped,
)
from hpo_service.models import LeaseRow, StudyRow
from hpo_service.studies._core import StudyCore

#: What a batched request answers per trial instead of failing the whole request; anything
#: else (``StorageUnavailable``) fails the request, which the worker retries as a whole.
PER_TRIAL_ERRORS = (InvalidSpec, NotFound, Conflict)
#: ``hpo_leases.outcome`` of a lease the reaper expired (its trial was failed).
REAPED = "reaped"
#: ``hpo_leases.outcome`` while a result is being told; the final outcome replaces it.
CLAIMED = {"complete": "completing", "fail": "failing"}


def check_lease(session: Session, trial_id: int, token: str) -> LeaseRow:
    """The lease of ``trial_id``. Raises ``TrialNotFound`` or ``LeaseMismatch``."""
    row = session.get(LeaseRow, trial_id)
    if row is None:
        raise TrialNotFound(trial_id)
    if not secrets.compare_digest(row.token, token):
        raise LeaseMismatch(f"the lease token does not match trial {trial_id}'s lease")
    return row


def leases_and_study_states(
    core: StudyCore, trial_ids: Sequence[int]
) -> dict[int, tuple[LeaseRow, str | None]]:
    """The leases of ``trial_ids`` with their study's state (None: deleted), in one query."""
    with core.db.session() as session:
        found = session.execute(
            select(LeaseRow, StudyRow.state)
            .outerjoin(StudyRow, StudyRow.study_id == LeaseRow.study_id)
            .where(LeaseRow.trial_id.in_(set(trial_ids)))
        ).all()
    return {row.trial_id: (row, state) for row, state in found}


def checked_lease(
    found: Mapping[int, tuple[LeaseRow, str | None]], trial_id: int, token: str
) -> tuple[LeaseRow, str | None]:
    """The lease of ``trial_id`` from ``found``, its token checked, and its study's state.
    Raises ``TrialNotFound`` or ``LeaseMismatch``."""
    entry = found.get(trial_id)
    if entry is None:
        raise TrialNotFound(trial_id)
    row, state = entry
    if not secrets.compare_digest(row.token, token):
        raise LeaseMismatch(f"the lease token does not match trial {trial_id}'s lease")
    return row, state


def not_running(row: LeaseRow, state: TrialState | str) -> TrialFinished:
    """The error for a lease whose trial is no longer running (``state``: its state now, or
    the lease's outcome): ``TrialReaped`` when the reaper failed it, else ``TrialFinished``
    naming how it ended (the answer recorded for it, when there is one)."""
    name = state.name.lower() if isinstance(state, TrialState) else state
    if row.outcome == REAPED or (name == "fail" and row.outcome is None):
        return TrialReaped(
            f"trial {row.trial_number} is fail: its lease expired and it was failed "
            "(a retry was queued if retries remained)"
        )
    ended = finished_state(row) or name
    return TrialFinished(f"trial {row.trial_number} already finished ({ended})", ended)


def finished_state(row: LeaseRow) -> str | None:
    """How the lease's trial ended as the service recorded it (``complete``, ``pruned``,
    ``fail``), or is being ended by a claim in progress; None if the lease is open."""
    if row.answer and isinstance(row.answer.get("state"), str):
        return str(row.answer["state"])
    if row.outcome in ("complete", CLAIMED["complete"]):
        return "complete"
    if row.outcome == CLAIMED["fail"]:  # a fail's claim holds the state it asked for
        return row.fingerprint if row.fingerprint in ("pruned", "fail") else "fail"
    return "fail" if row.outcome in ("fail", REAPED) else None


def running_trial(core: StudyCore, row: LeaseRow) -> FrozenTrial:
    """The trial behind an open lease, which must still be running.

    Raises ``TrialFinished`` when the lease was finished through the service or the trial is
    no longer running (``TrialReaped``: the reaper failed it).
    """
    if row.outcome is not None:
        raise not_running(row, row.outcome)
    trial = core.storage.get_trial(row.trial_id)
    if trial.state != TrialState.RUNNING:
        core.forget_running(row.trial_id)
        raise not_running(row, trial.state)
    return trial


def finished_meanwhile(core: StudyCore, row: LeaseRow, error: Exception) -> TrialFinished:
    """Optuna refused a write because the trial finished after we checked it."""
    core.forget_running(row.trial_id)
    state = core.storage.get_trial(row.trial_id).state
    reaped = not_running(row, state)
    reaped.__cause__ = error
    return reaped


def reason_to_stop(study_state: str | None) -> str | None:
    """Why a worker should stop its trial, given its study's state (None: deleted)."""
    if study_state is None:
        return "study deleted"
    return "study cancelled" if study_state == "cancelled" else None


def stop_reason(core: StudyCore, study_id: int) -> str | None:
    with core.db.session() as session:
        row = session.get(StudyRow, study_id)
    return reason_to_stop(row.state if row is not None else None)
