"""Finishing a trial: ``complete`` (tell its values) and ``fail`` (pruned, or failed and maybe
retried), each exactly once.

Our ``hpo_leases`` row holds the answer given, so a repeated ``complete`` gets the same answer
and a late one after the reaper failed the trial gets ``TrialReaped`` instead of being dropped.
Finishing is claimed with a compare-and-set on that row that only one request wins, on any
replica: the winner tells Optuna (the sampler's ``after_trial`` runs then), logs and records the
answer; the same result arriving meanwhile waits for that answer and only reads it. A claim
whose holder died before recording (older than the lease timeout by the database clock) is
taken over by the next identical request, or failed by the reaper.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from optuna.exceptions import UpdateFinishedTrialError
from optuna.trial import TrialState
from sqlalchemy import and_, or_, true, update

from hpo_service import lr_range
from hpo_service.constraints import record_completed, settle_diverged
from hpo_service.errors import (
    HPOError,
    InvalidSpec,
    InvalidValue,
    ResultConflict,
    StorageUnavailable,
    TrialNotFound,
    WrongLeaseKind,
)
from hpo_service.logging_setup import trial_fields
from hpo_service.models import LeaseRow, StudyRow
from hpo_service.schemas import CompleteAnswer, FailAnswer, ReportAnswer
from hpo_service.studies._checkpoints import after_complete, lineage_ended
from hpo_service.studies._checks import (
    CLAIMED,
    PER_TRIAL_ERRORS,
    REAPED,
    check_lease,
    not_running,
)
from hpo_service.studies._core import LoadedStudy, StudyCore
from hpo_service.studies._diagnostics import Diagnostics
from hpo_service.studies._reaping import requeue
from hpo_service.studies._reporting import EpochReport, finite_metrics

log = logging.getLogger(__name__)

#: How often (s) a request waits on another request's claim to finish the same trial.
CLAIM_POLL_S = 0.02


def fingerprint_of(values: Sequence[float]) -> str:
    return hashlib.sha256(json.dumps([float(v) for v in values]).encode()).hexdigest()


def previous_answer(row: LeaseRow, outcome: str, fingerprint: str | None) -> dict[str, Any] | None:
    """The answer recorded for this result (``fingerprint`` None: any result with this
    outcome), None if the trial is still open or being finished with this result.

    Raises ``TrialReaped``; ``TrialFinished`` when the trial ended the other way (a
    ``complete`` after a ``prune`` answer or a ``fail``, a ``fail`` after ``complete``); or
    ``ResultConflict`` for a ``complete`` with other values than the ones that stand.
    """
    if row.outcome == REAPED:
        raise not_running(row, TrialState.FAIL)
    if row.outcome is None:
        return None
    if row.outcome == outcome and fingerprint in (None, row.fingerprint):
        return row.answer
    if row.outcome == CLAIMED[outcome] and fingerprint in (None, row.fingerprint):
        return None  # claimed with this result but not finished: finish it again
    if row.outcome in (outcome, CLAIMED[outcome]):
        raise ResultConflict(
            f"trial {row.trial_number} was already finished ({row.outcome}) with a different "
            "result; the first result stands"
        )
    raise not_running(row, row.outcome)


@dataclass(frozen=True)
class TrialResult:
    """A worker's final values for one trial."""

    trial_id: int
    token: str
    values: Sequence[float]
    metrics: Mapping[str, Any]
    output_tail: str | None = None  # the program's last output (`hpo agent`)


@dataclass(frozen=True)
class TrialFailure:
    """A worker giving one trial up."""

    trial_id: int
    token: str
    reason: str
    retryable: bool = False
    pruned: bool = False
    diverged: bool = False  # issue 10: completed infeasible (hpo_service.constraints)
    output_tail: str | None = None


class Finishing:
    """``complete`` and ``fail`` over one ``StudyCore``, one trial or many at a time."""

    def __init__(self, core: StudyCore, diagnostics: Diagnostics | None = None) -> None:
        self.core = core
        self.diagnostics = diagnostics or Diagnostics(core, None)

    def complete_many(self, results: Sequence[TrialResult]) -> list[CompleteAnswer | HPOError]:
        """``complete`` for each result, in order, each with its own idempotency and conflict
        rules: per result an answer, or the error the single route raises."""
        answers: list[CompleteAnswer | HPOError] = []
        for result in results:
            try:
                answers.append(
                    self.complete(
                        result.trial_id,
                        result.token,
                        result.values,
                        result.metrics,
                        output_tail=result.output_tail,
                    )
                )
            except PER_TRIAL_ERRORS as error:
                answers.append(error)
        return answers

    def fail_many(self, failures: Sequence[TrialFailure]) -> list[FailAnswer | HPOError]:
        """``fail`` for each failure, in order: per failure an answer, or the error."""
        answers: list[FailAnswer | HPOError] = []
        for failure in failures:
            try:
                answers.append(
                    self.fail(
                        failure.trial_id,
                        failure.token,
                        failure.reason,
                        failure.retryable,
                        failure.pruned,
                        failure.diverged,
                        output_tail=failure.output_tail,
                    )
                )
            except PER_TRIAL_ERRORS as error:
                answers.append(error)
        return answers

    def settle_pruned(
        self, reports: Sequence[EpochReport], answers: list[ReportAnswer | HPOError]
    ) -> list[ReportAnswer | HPOError]:
        """End PRUNED, here and now, each trial whose report was answered ``prune``.

        The answer is the decision: a ``complete`` after it is refused (``TrialFinished``,
        state ``pruned``) and the worker's ``fail`` with ``pruned`` reads the stored answer. A
        worker that dies after the answer leaves no trial for the reaper to fail and retry.
        A trial that ended meanwhile (a ``complete`` that won the race) gets that error instead.
        """
        for index, (item, answer) in enumerate(zip(reports, answers, strict=True)):
            if isinstance(answer, ReportAnswer) and answer.action == "prune":
                try:
                    self.fail(
                        item.trial_id,
                        item.token,
                        answer.reason or f"pruned at epoch {item.epoch}",
                        retryable=False,
                        pruned=True,
                    )
                except PER_TRIAL_ERRORS as error:
                    answers[index] = error
        return answers

    def _claim(
        self, row: LeaseRow, outcome: str, fingerprint: str, same: str | None
    ) -> dict[str, Any] | None:
        """Claim the right to finish ``row``'s trial with this result (a compare-and-set on the
        lease row, atomic across threads and replicas, won by one request). Returns None when
        this request holds the claim and must finish the trial, or the answer recorded for the
        same result (``same``: the fingerprint that counts as the same result, None: any).

        While another request holds the claim this one waits for its answer; a claim older than
        the lease timeout (its holder died) is taken over. Raises ``ResultConflict`` for another
        result, ``TrialReaped``, or ``StorageUnavailable`` if the holder neither finishes nor
        goes stale in twice the lease timeout.
        """
        core = self.core
        pending = CLAIMED[outcome]
        timeout = core.settings.lease_timeout_s
        abandoned = and_(
            LeaseRow.outcome == pending,
            LeaseRow.fingerprint == same if same is not None else true(),
            LeaseRow.beat_at_s < core.database_clock_s() - timeout,
        )
        deadline = time.monotonic() + 2 * timeout + 5
        while True:
            with core.db.session() as session:
                claimed = session.execute(
                    update(LeaseRow)
                    .where(
                        LeaseRow.trial_id == row.trial_id,
                        or_(LeaseRow.outcome.is_(None), abandoned),
                    )
                    .values(
                        outcome=pending, fingerprint=fingerprint, beat_at_s=core.database_clock_s()
                    )
                )
                if claimed.rowcount == 1:  # type: ignore[attr-defined]
                    return None
                current = session.get(LeaseRow, row.trial_id, populate_existing=True)
            if current is None:
                raise TrialNotFound(row.trial_id)
            answer = previous_answer(current, outcome, same)
            if answer is not None:
                return answer
            if current.outcome is None:  # released meanwhile (the trial was not running)
                continue
            if time.monotonic() > deadline:
                raise StorageUnavailable(
                    f"trial {row.trial_number}'s result is still being recorded; retry"
                )
            time.sleep(CLAIM_POLL_S)

    def _release(self, row: LeaseRow, outcome: str, fingerprint: str) -> None:
        """Undo our claim when the trial turned out not to be running (the reaper failed it),
        so later calls get ``TrialReaped`` rather than a conflict with a result never told."""
        with self.core.db.session() as session:
            session.execute(
                update(LeaseRow)
                .where(
                    LeaseRow.trial_id == row.trial_id,
                    LeaseRow.outcome == CLAIMED[outcome],
                    LeaseRow.fingerprint == fingerprint,
                )
                .values(outcome=None, fingerprint=None)
            )

    def _record_answer(self, trial_id: int, outcome: str, answer: dict[str, Any]) -> None:
        with self.core.db.session() as session:
            session.execute(
                update(LeaseRow)
                .where(LeaseRow.trial_id == trial_id)
                .values(outcome=outcome, answer=answer)
            )

    def complete(
        self,
        trial_id: int,
        token: str,
        values: Sequence[float],
        metrics: Mapping[str, Any],
        *,
        output_tail: str | None = None,
    ) -> CompleteAnswer:
        """Tell the trial's values, exactly once.

        The same token and values again get the same answer; different values, or values after
        the reaper failed the trial, raise ``ResultConflict`` / ``TrialReaped`` (never dropped).
        """
        core = self.core
        bad = [v for v in values if not math.isfinite(v)]
        if bad:
            raise InvalidValue(
                "values",
                f"must be finite numbers (got {bad}); a run that diverged sends `fail` with "
                "`diverged: true`",
            )
        fingerprint = fingerprint_of(values)
        with core.db.session() as session:
            row = check_lease(session, trial_id, token)
        loaded = core.load(row.study_id)
        if loaded.spec.lr_range_test.enabled and lr_range.TASK_ATTR in (
            core.storage.get_trial_user_attrs(trial_id)
        ):
            raise WrongLeaseKind(
                f"trial {row.trial_number} is an lr_range_test task: send its curve to "
                f"`/v1/trials/{trial_id}/lr-range-test`"
            )
        if len(values) != len(loaded.spec.objectives):
            raise InvalidSpec(
                "values",
                f"this study has {len(loaded.spec.objectives)} objective(s) "
                f"({', '.join(loaded.spec.metric_names)}); got {len(values)} value(s)",
            )
        previous = previous_answer(row, "complete", fingerprint)
        if previous is None:
            # issue 14: the last plot, before the claim (a lease-timeout clock) and the tell
            self.diagnostics.before_finish(row)
            previous = self._claim(row, "complete", fingerprint, same=fingerprint)
        if previous is not None:
            return CompleteAnswer.model_validate(previous)
        try:
            core.storage.set_trial_user_attr(trial_id, "metrics", finite_metrics(dict(metrics)))
            if output_tail:  # the program's last output (`hpo agent`)
                core.storage.set_trial_user_attr(trial_id, "output_tail", output_tail)
            record_completed(core.storage, trial_id, loaded.spec, metrics)  # issue 10
            self._tell(loaded, row, list(values))
        except (UpdateFinishedTrialError, ValueError) as error:
            # Finished before us: by an earlier try of this same result whose answer was not
            # recorded, or by the reaper.
            trial = core.storage.get_trial(trial_id)
            if trial.state == TrialState.RUNNING:
                raise
            if trial.state != TrialState.COMPLETE or trial.values is None:
                self._release(row, "complete", fingerprint)
                raise not_running(row, trial.state) from error
            if fingerprint_of(trial.values) != fingerprint:
                raise ResultConflict(
                    f"trial {trial.number} already completed with values {trial.values}"
                ) from error
        finally:
            core.forget_running(trial_id)
            core.snapshot_changed(loaded)
        answer = CompleteAnswer(
            trial_id=trial_id, trial_number=row.trial_number, state="complete", values=list(values)
        )
        self._record_answer(trial_id, "complete", answer.model_dump(mode="json"))
        after_complete(core, loaded, trial_id)  # issue 14: retention of checkpoints
        log.info(
            "trial %d of %s completed: %s",
            row.trial_number,
            loaded.spec.name,
            list(values),
            extra=trial_fields(
                "trial_completed",
                study=loaded.spec.name,
                study_id=row.study_id,
                trial_id=trial_id,
                trial_number=row.trial_number,
                worker_id=row.worker_id,
            ),
        )
        return answer

    def _tell(self, loaded: LoadedStudy, row: LeaseRow, values: list[float]) -> None:
        """``study.tell`` — without re-reading the trial when this process holds it (the state
        change itself is still a compare-and-set in Optuna's storage)."""
        known = self.core.known_running(row.trial_id)
        if known is None:
            loaded.study.tell(row.trial_number, values)
            return
        study = self.core.view(loaded, loaded.snapshot or [], known.trial)
        study.tell(row.trial_number, values)

    def fail(
        self,
        trial_id: int,
        token: str,
        reason: str,
        retryable: bool,
        pruned: bool = False,
        diverged: bool = False,
        *,
        output_tail: str | None = None,
    ) -> FailAnswer:
        """A worker gives a trial up: pruned (told PRUNED), or failed and maybe retried."""
        core = self.core
        with core.db.session() as session:
            row = check_lease(session, trial_id, token)
        loaded = core.load(row.study_id)
        state = "pruned" if pruned else "fail"
        # A repeated fail gets the first answer, whichever state it asked for.
        previous = previous_answer(row, "fail", None)
        if previous is None:
            self.diagnostics.before_finish(row)  # issue 14: the last plot, before the tell
            previous = self._claim(row, "fail", state, same=None)
        if previous is not None:
            return FailAnswer.model_validate(previous)
        retry_number: int | None = None
        try:
            with core.study_lock(row.study_id) as session:  # a retry creates a trial
                trial = core.storage.get_trial(trial_id)
                if trial.state != TrialState.RUNNING:
                    self._release(row, "fail", state)
                    raise not_running(row, trial.state)
                if output_tail:  # the program's last output (`hpo agent`)
                    core.storage.set_trial_user_attr(trial_id, "output_tail", output_tail)
                # --- issue 10: a diverged trial completes infeasible (None: `finite` is off)
                told = (
                    settle_diverged(loaded.study, trial, loaded.spec, reason) if diverged else None
                )
                if told is not None:
                    state = told
                # --- end issue 10
                elif pruned:
                    loaded.study.tell(row.trial_number, state=TrialState.PRUNED)
                else:
                    core.storage.set_trial_user_attr(trial_id, "fail_reason", reason[:2000])
                    loaded.study.tell(row.trial_number, state=TrialState.FAIL)
                    study_row = session.get(StudyRow, row.study_id)
                    if retryable and study_row is not None and study_row.state == "running":
                        # read above; what it copies is unchanged
                        retry_number = requeue(core, loaded, trial)
        finally:
            core.forget_running(trial_id)
            core.snapshot_changed(loaded)
        if retry_number is None:  # issue 14: nothing will resume from this line's checkpoints
            lineage_ended(core, loaded, trial)
        answer = FailAnswer(trial_id=trial_id, state=state, retry_trial_number=retry_number)
        self._record_answer(trial_id, "fail", answer.model_dump(mode="json"))
        log.info(
            "trial %d of %s %s: %s",
            row.trial_number,
            loaded.spec.name,
            "pruned" if pruned else "failed",
            reason[:200],
            extra=trial_fields(
                "trial_pruned" if pruned else "trial_failed",
                study=loaded.spec.name,
                study_id=row.study_id,
                trial_id=trial_id,
                trial_number=row.trial_number,
                worker_id=row.worker_id,
            ),
        )
        return answer
