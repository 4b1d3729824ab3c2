"""Heartbeats and reports: a running trial's epochs, and the pruner's decision on each.

A report writes its metrics and its intermediate value and decides pruning from the running
trial this process already holds, re-reading it only when this process did not handle the
trial's previous report (``RunningTrial``); the study's finished trials for the pruner come from
a snapshot at most ``SNAPSHOT_MAX_AGE_S`` old (``StudyCore.pruning_snapshot``).
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from optuna.exceptions import UpdateFinishedTrialError

from hpo_service.errors import HPOError, InvalidSpec
from hpo_service.models import LeaseRow
from hpo_service.schemas import HeartbeatAnswer, ReportAnswer
from hpo_service.studies._checks import (
    PER_TRIAL_ERRORS,
    checked_lease,
    finished_meanwhile,
    leases_and_study_states,
    not_running,
    reason_to_stop,
    running_trial,
)
from hpo_service.studies._core import RunningTrial, StudyCore
from hpo_service.studies._diagnostics import Diagnostics


def finite_metrics(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """Metrics as JSON-safe values: non-finite floats become None rather than breaking JSON."""

    def clean(value: Any) -> Any:
        if isinstance(value, float) and not math.isfinite(value):
            return None
        if isinstance(value, list):
            return [clean(v) for v in value]
        return value

    return {key: clean(value) for key, value in metrics.items()}


@dataclass(frozen=True)
class EpochReport:
    """One trial's report of one epoch, as a worker sends it."""

    trial_id: int
    token: str
    epoch: int
    value: float | None
    metrics: Mapping[str, Any]


class Reporting:
    """Heartbeats and per-epoch reports over one ``StudyCore``, one trial or many at a time."""

    def __init__(self, core: StudyCore, diagnostics: Diagnostics | None = None) -> None:
        self.core = core
        self.diagnostics = diagnostics or Diagnostics(core, None)

    def heartbeat(self, trial_id: int, token: str) -> HeartbeatAnswer:
        answer = self.heartbeat_many([(trial_id, token)])[0]
        if isinstance(answer, HPOError):
            raise answer
        return answer

    def heartbeat_many(self, leases: Sequence[tuple[int, str]]) -> list[HeartbeatAnswer | HPOError]:
        """Record a beat for each (trial id, lease token): the leases and their studies read in
        one query, the beats written in one statement. Per lease an answer, or the error the
        single route raises (``TrialNotFound``, ``LeaseMismatch``, ``TrialReaped``)."""
        core = self.core
        found = leases_and_study_states(core, [trial_id for trial_id, _ in leases])
        answers: list[HeartbeatAnswer | HPOError] = []
        beats: list[int] = []
        for trial_id, token in leases:
            try:
                row, study_state = checked_lease(found, trial_id, token)
                running_trial(core, row)  # a heartbeat is rare enough to re-read the trial
            except PER_TRIAL_ERRORS as error:
                answers.append(error)
                continue
            beats.append(trial_id)
            reason = reason_to_stop(study_state)
            if reason is not None:
                answers.append(HeartbeatAnswer(action="stop", reason=reason))
            else:
                answers.append(HeartbeatAnswer(action="continue"))
        self._beat(beats)
        return answers

    def report(
        self,
        trial_id: int,
        token: str,
        epoch: int,
        value: float | None,
        metrics: Mapping[str, Any],
    ) -> ReportAnswer:
        """Store the epoch's objective value as an intermediate value and its metrics as a user
        attribute, then ask the study's pruner. A repeated report of an epoch is not re-stored.
        A report counts as a heartbeat.

        Raises ``TrialNotFound``, ``LeaseMismatch``, ``TrialReaped`` (the trial is no longer
        running) or ``InvalidSpec`` (a non-finite value).
        """
        item = EpochReport(trial_id, token, epoch, value, metrics)
        answer = self.report_many([item])[0]
        if isinstance(answer, HPOError):
            raise answer
        return answer

    def report_many(self, reports: Sequence[EpochReport]) -> list[ReportAnswer | HPOError]:
        """``report`` for many trials' epochs, in order: the leases and their studies read in
        one query, the beats that are due written in one statement. Optuna's storage writes
        each trial's metrics and intermediate value in its own transactions (its API has no
        batch write). Per report an answer, or the error the single route raises."""
        core = self.core
        found = leases_and_study_states(core, [r.trial_id for r in reports])
        answers: list[ReportAnswer | HPOError] = []
        due: list[int] = []
        for item in reports:
            try:
                answers.append(self._report_one(found, item, due))
            except PER_TRIAL_ERRORS as error:
                answers.append(error)
        self._beat(due)
        # --- issue 14: every epoch's diagnostics kept (one statement), plots redrawn off the
        # request every few epochs (studies/_diagnostics.py)
        self.diagnostics.epochs_reported(found, reports, answers)
        return answers

    def _report_one(
        self,
        found: Mapping[int, tuple[LeaseRow, str | None]],
        item: EpochReport,
        due: list[int],
    ) -> ReportAnswer:
        core = self.core
        trial_id, epoch, value = item.trial_id, item.epoch, item.value
        if value is not None and not math.isfinite(value):
            raise InvalidSpec("value", f"must be a finite number (got {value})")
        row, study_state = checked_lease(found, trial_id, item.token)
        loaded = core.load(row.study_id)
        running = self._current_running(row, epoch)
        try:
            # Optuna refuses writes to a finished trial: this is the running check.
            core.storage.set_trial_user_attr(
                trial_id, "metrics", finite_metrics({"epoch": epoch, **item.metrics})
            )
            if self._beat_due(running):
                due.append(trial_id)
            reason = reason_to_stop(study_state)
            if reason is not None:
                running.last_epoch = epoch
                return ReportAnswer(action="stop", reason=reason)
            if value is None or loaded.spec.pruning_metric is None:  # issue 10: primary metric
                running.last_epoch = epoch
                return ReportAnswer(action="continue")
            if epoch not in running.trial.intermediate_values:
                core.storage.set_trial_intermediate_value(trial_id, epoch, value)
                running.trial.intermediate_values[epoch] = value
        except UpdateFinishedTrialError as error:
            raise finished_meanwhile(core, row, error) from error
        running.last_epoch = epoch
        # Trial.should_prune() without re-reading anything: the pruner gets the trial as just
        # written and the study's trials from the snapshot.
        study = core.view(loaded, core.pruning_snapshot(loaded), running.trial)
        if study.pruner.prune(study, copy.deepcopy(running.trial)):
            return ReportAnswer(action="prune", reason=f"pruned at epoch {epoch}")
        return ReportAnswer(action="continue")

    def _current_running(self, row: LeaseRow, epoch: int) -> RunningTrial:
        """The running trial for a report of ``epoch``: remembered if this process handled the
        report of ``epoch - 1`` (see ``RunningTrial``), else read. Raises ``TrialReaped``."""
        core = self.core
        known = core.known_running(row.trial_id)
        if known is not None and known.last_epoch is not None and epoch == known.last_epoch + 1:
            if row.outcome is not None:
                raise not_running(row, row.outcome)
            return known
        trial = running_trial(core, row)
        running = RunningTrial(trial, beat_at=known.beat_at if known else float("-inf"))
        core.remember_running(row.trial_id, running)
        return running

    def _beat_due(self, running: RunningTrial) -> bool:
        """Whether a report should also write a beat: this process has not recorded one in the
        last half heartbeat interval (a lease outlives a whole interval without a beat)."""
        interval = self.core.settings.heartbeat_interval_s
        return time.monotonic() - running.beat_at >= interval / 2

    def _beat(self, trial_ids: Sequence[int]) -> None:
        """Record the beats of ``trial_ids`` in one statement and remember when."""
        self.core.record_beats(trial_ids)
        now = time.monotonic()
        for trial_id in trial_ids:
            known = self.core.known_running(trial_id)
            if known is not None:
                known.beat_at = now
