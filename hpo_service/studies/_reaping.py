"""The reaper and the retry policy: fail trials whose lease expired, queue bounded retries.

Optuna's heartbeat does not cover ask/tell trials, so the service records heartbeats itself
and runs ``optuna.storages.fail_stale_trials`` (stale by the database clock); a failed trial
is retried with the same parameters while its retry history is within ``max_retries``.
"""

from __future__ import annotations

import logging
import threading
import warnings

import optuna
from optuna.exceptions import ExperimentalWarning
from optuna.trial import FrozenTrial, TrialState
from sqlalchemy import select

from hpo_service.logging_setup import trial_fields
from hpo_service.models import LeaseRow, StudyRow
from hpo_service.studies._core import LoadedStudy, StudyCore

log = logging.getLogger(__name__)

#: Studies whose trials may still be running, so may hold expired leases.
ACTIVE_STATES = ("running", "stopped", "cancelled")


def requeue(core: StudyCore, loaded: LoadedStudy, failed: FrozenTrial) -> int | None:
    """Queue a WAITING copy of a failed trial with the same parameters, within the retry
    bound; the same attributes as Optuna's ``RetryHeartbeatStaleTrialCallback``. Returns the
    new trial's number, or None when retries are exhausted. Call it under the study lock.
    """
    history = [*(failed.system_attrs.get("retry_history") or []), failed.number]
    if len(history) > loaded.spec.max_retries:
        log.warning(
            "trial %d of %s failed for good after %d retries",
            failed.number,
            loaded.spec.name,
            len(history) - 1,
        )
        return None
    keep = {k: v for k, v in failed.user_attrs.items() if k in ("enqueued",)}
    loaded.study.add_trial(
        optuna.create_trial(
            state=TrialState.WAITING,
            params=failed.params,
            distributions=failed.distributions,
            user_attrs={**keep, "retry_history": history},
            system_attrs={"failed_trial": history[0], "retry_history": history},
        )
    )
    newest = max(
        core.storage.get_all_trials(
            loaded.study._study_id, deepcopy=False, states=(TrialState.WAITING,)
        ),
        key=lambda t: t.number,
    )
    log.info(
        "trial %d of %s queued again as trial %d",
        failed.number,
        loaded.spec.name,
        newest.number,
        extra=trial_fields(
            "retry_queued",
            study=loaded.spec.name,
            study_id=loaded.study._study_id,
            trial_id=failed._trial_id,
            trial_number=failed.number,
        ),
    )
    return newest.number


class Reaper:
    """Fails expired leases over one ``StudyCore`` and counts them (``reaped_leases``)."""

    def __init__(self, core: StudyCore) -> None:
        self.core = core
        self._count_guard = threading.Lock()
        self.reaped_leases = 0  # trials this process failed for an expired lease (/metrics)

    def on_stale_trial(self, study: optuna.Study, trial: FrozenTrial) -> None:
        """Optuna's stale-trial callback: the lease expired, so retry if the study still runs."""
        core = self.core
        study_id = study._study_id
        with self._count_guard:
            self.reaped_leases += 1
        core.forget_running(trial._trial_id)
        with core.db.session() as session:
            row = session.get(StudyRow, study_id)
            running = row is not None and row.state == "running"
            lease = session.get(LeaseRow, trial._trial_id)
        log.warning(
            "trial %d of %s: lease expired; trial failed",
            trial.number,
            study.study_name,
            extra=trial_fields(
                "lease_reaped",
                study=study.study_name,
                study_id=study_id,
                trial_id=trial._trial_id,
                trial_number=trial.number,
                worker_id=lease.worker_id if lease is not None else None,
            ),
        )
        if running:
            requeue(core, core.load(study_id), trial)

    def reap(self) -> int:
        """Fail every trial whose lease expired (by the database clock) and queue retries.

        Returns how many studies were checked. Safe to run in several replicas at once:
        Optuna fails a trial with a compare-and-set, so only one replica retries it.
        """
        core = self.core
        with core.db.session() as session:
            study_ids = list(
                session.scalars(select(StudyRow.study_id).where(StudyRow.state.in_(ACTIVE_STATES)))
            )
        for study_id in study_ids:
            loaded = core.load(study_id)
            with core.study_lock(study_id), warnings.catch_warnings():
                warnings.simplefilter("ignore", ExperimentalWarning)
                optuna.storages.fail_stale_trials(loaded.study)
            core.snapshot_changed(loaded)
        return len(study_ids)
