"""The reaper and the retry policy: fail trials whose lease expired, queue bounded retries.

Optuna's heartbeat does not cover ask/tell trials, so each lease carries its own last sign of
life (``hpo_leases.beat_at_s``, by the database clock). One pass of the reaper:

1. finds every expired lease of every active study with one query, and marks them reaped with
   one compare-and-set (a beat that arrived in between wins; of several replicas, one reaps);
2. per study, under the study lock: fails those trials, fails every RUNNING trial that has no
   live lease (none at all: a crash between the trial's write and its lease's — under the lock
   both are written together, so such a trial can have no live worker; or one already marked
   reaped: a pass that died between step 1 and this one), and queues a retry with the same
   parameters while the trial's retry history is within ``max_retries``.

So a dead worker's trial is failed and retried within lease timeout + reap interval of its last
beat, whatever instant the worker or the database died at.
"""

from __future__ import annotations

import logging
import threading
from collections import defaultdict
from collections.abc import Sequence

import optuna
from optuna.exceptions import UpdateFinishedTrialError
from optuna.trial import FrozenTrial, TrialState
from sqlalchemy import and_, or_, select, update
from sqlalchemy.orm import Session

from hpo_service.logging_setup import trial_fields
from hpo_service.lr_range import TASK_ATTR
from hpo_service.models import LeaseRow, StudyRow
from hpo_service.schemas import CompleteAnswer, FailAnswer
from hpo_service.studies._checkpoints import lineage_ended
from hpo_service.studies._checks import CLAIMED, REAPED
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
    keep = {k: v for k, v in failed.user_attrs.items() if k in ("enqueued", TASK_ATTR)}
    retry = optuna.create_trial(
        state=TrialState.WAITING,
        params=failed.params,
        distributions=failed.distributions,
        user_attrs={**keep, "retry_history": history},
        system_attrs={"failed_trial": history[0], "retry_history": history},
    )
    # Through the cache, which keeps the new trial (its number) without a read.
    retry_id = core.cache.create_new_trial(loaded.study._study_id, template_trial=retry)
    number = core.cache.get_trial(retry_id).number
    log.info(
        "trial %d of %s queued again as trial %d",
        failed.number,
        loaded.spec.name,
        number,
        extra=trial_fields(
            "retry_queued",
            study=loaded.spec.name,
            study_id=loaded.study._study_id,
            trial_id=failed._trial_id,
            trial_number=failed.number,
        ),
    )
    return number


class Reaper:
    """Fails expired leases over one ``StudyCore`` and counts them (``reaped_leases``)."""

    def __init__(self, core: StudyCore) -> None:
        self.core = core
        self._count_guard = threading.Lock()
        self.reaped_leases = 0  # trials this process failed for an expired lease (/metrics)

    def reap(self) -> int:
        """Fail every trial whose lease expired (by the database clock) or that has no lease,
        and queue retries. Returns how many studies were checked. Safe to run in several
        replicas at once: the leases are claimed with a compare-and-set, and Optuna fails a
        trial with one too, so only one replica fails and retries each trial.
        """
        core = self.core
        expired = and_(
            or_(LeaseRow.outcome.is_(None), LeaseRow.outcome.in_(CLAIMED.values())),
            LeaseRow.beat_at_s < core.database_clock_s() - core.settings.lease_timeout_s,
        )
        with core.db.session() as session:
            study_ids = list(
                session.scalars(select(StudyRow.study_id).where(StudyRow.state.in_(ACTIVE_STATES)))
            )
            found = list(
                session.scalars(
                    select(LeaseRow)
                    .join(StudyRow, StudyRow.study_id == LeaseRow.study_id)
                    .where(StudyRow.state.in_(ACTIVE_STATES), expired)
                )
            )
        by_study: dict[int, list[LeaseRow]] = defaultdict(list)
        if found:
            with core.db.session() as session:
                won = set(
                    session.scalars(
                        update(LeaseRow)
                        .where(LeaseRow.trial_id.in_([lease.trial_id for lease in found]), expired)
                        .values(outcome=REAPED)
                        .returning(LeaseRow.trial_id)
                        .execution_options(synchronize_session=False)
                    )
                )
            for lease in found:
                if lease.trial_id in won:
                    by_study[lease.study_id].append(lease)
        for study_id in study_ids:
            loaded = core.load(study_id)
            with core.study_lock(study_id) as session:
                changed = self._reap_study(session, loaded, by_study.get(study_id, []))
            if changed:
                core.snapshot_changed(loaded)
        return len(study_ids)

    def _reap_study(
        self, session: Session, loaded: LoadedStudy, expired: Sequence[LeaseRow]
    ) -> bool:
        """Under the study lock: fail the trials of ``expired`` (leases already marked reaped)
        and every RUNNING trial without a lease, then queue their retries. Returns whether a
        trial changed state."""
        core = self.core
        study_id = loaded.study._study_id
        running = core.cache.get_all_trials(study_id, deepcopy=False, states=(TrialState.RUNNING,))
        leased: set[int] = set()
        if running:
            ids = [trial._trial_id for trial in running]
            # A lease already marked reaped is no live lease: a pass that died between its
            # mark and the trial's fail left it, and no later pass finds it expired.
            live = or_(LeaseRow.outcome.is_(None), LeaseRow.outcome != REAPED)
            leased = set(
                session.scalars(select(LeaseRow.trial_id).where(LeaseRow.trial_id.in_(ids), live))
            )
        workers: dict[int, str | None] = {lease.trial_id: lease.worker_id for lease in expired}
        # RUNNING without a live lease; an expired one (marked reaped above) keeps its worker,
        # so the log says "lease expired", not "running without a lease"
        workers.update(
            {t._trial_id: None for t in running if t._trial_id not in leased | set(workers)}
        )
        if not workers:
            return False
        failed: list[int] = []
        for trial_id in workers:
            try:
                core.cache.set_trial_state_values(trial_id, state=TrialState.FAIL)
                failed.append(trial_id)
            except UpdateFinishedTrialError:
                lease = next((lease for lease in expired if lease.trial_id == trial_id), None)
                if lease is not None:  # it finished after all: keep the answer it was given
                    self._settle(lease)
        if not failed:
            return False
        with self._count_guard:
            self.reaped_leases += len(failed)
        study_row = session.get(StudyRow, study_id)
        retry = study_row is not None and study_row.state == "running"
        trials = {t._trial_id: t for t in core.cache.get_all_trials(study_id, deepcopy=False)}
        for trial_id in failed:
            core.forget_running(trial_id)
            trial = trials[trial_id]
            worker_id = workers[trial_id]
            log.warning(
                "trial %d of %s: %s; trial failed",
                trial.number,
                loaded.spec.name,
                "lease expired" if worker_id is not None else "running without a lease",
                extra=trial_fields(
                    "lease_reaped",
                    study=loaded.spec.name,
                    study_id=study_id,
                    trial_id=trial_id,
                    trial_number=trial.number,
                    worker_id=worker_id,
                ),
            )
            if not retry or requeue(core, loaded, trial) is None:
                lineage_ended(core, loaded, trial)  # issue 14: no retry will resume from them
        return True

    def _settle(self, lease: LeaseRow) -> None:
        """A lease the reaper marked while its trial was being finished (a claim older than the
        lease timeout) whose trial did finish: record the answer the claim would have."""
        trial = self.core.storage.get_trial(lease.trial_id)
        answer: CompleteAnswer | FailAnswer | None = None
        if lease.outcome == CLAIMED["complete"] and trial.state == TrialState.COMPLETE:
            values = list(trial.values or [])
            answer = CompleteAnswer(
                trial_id=lease.trial_id,
                trial_number=lease.trial_number,
                state="complete",
                values=values,
            )
            outcome = "complete"
        elif lease.outcome == CLAIMED["fail"] and trial.state in (
            TrialState.FAIL,
            TrialState.PRUNED,
        ):
            state = "pruned" if trial.state == TrialState.PRUNED else "fail"
            answer = FailAnswer(trial_id=lease.trial_id, state=state, retry_trial_number=None)
            outcome = "fail"
        if answer is None:
            return  # finished outside the service's protocol: nothing to answer; stays reaped
        with self.core.db.session() as session:
            session.execute(
                update(LeaseRow)
                .where(LeaseRow.trial_id == lease.trial_id, LeaseRow.outcome == REAPED)
                .values(outcome=outcome, answer=answer.model_dump(mode="json"))
            )
