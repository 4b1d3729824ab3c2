"""Heartbeats and reports: a running trial's epochs, and the pruner's decision on each.

A report writes its metrics and its intermediate value and decides pruning from the running
trial this process already holds, re-reading it only when this process did not handle the
trial's previous report (``RunningTrial``); the study's finished trials for the pruner come from
a snapshot (``StudyCore.pruning_snapshot`` says when it is re-read). Its metrics and its
intermediate value are written in one transaction (``StudyCore.write_report``).
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from optuna.trial import FrozenTrial

from hpo_service.errors import HPOError, InvalidValue, ReportConflict
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
from hpo_service.studies._core import LoadedStudy, RunningTrial, StudyCore
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


@dataclass(frozen=True)
class _Planned:
    """A checked report and what it will write: its ``metrics`` and, when new and pruned on,
    its intermediate value ``(epoch, value)``."""

    item: EpochReport
    row: LeaseRow
    loaded: LoadedStudy
    running: RunningTrial
    reason: str | None  # why the study stops, if it does
    prunes: bool
    metrics: dict[str, Any]
    intermediate: tuple[int, float] | None


def _pruner_copy(trial: FrozenTrial) -> FrozenTrial:
    """The running trial as the pruner may see it: its own dicts of intermediate values and
    attributes (a pruner must not change ours), sharing their values — which pruners only read.
    ``copy.deepcopy`` here copied every metric and the config at every report (9 % of a batched
    report's time in a profile, issue 12)."""
    view = copy.copy(trial)
    view.intermediate_values = dict(trial.intermediate_values)
    view.system_attrs = dict(trial.system_attrs)
    view.user_attrs = dict(trial.user_attrs)
    view.params = dict(trial.params)
    view.distributions = dict(trial.distributions)
    return view


def _follows(known: RunningTrial, epoch: int) -> bool:
    """Whether a report of ``epoch`` is the next one after what this process knows of the
    trial: the epoch after the last report it handled, or — for a trial it leased and wrote
    itself, no report handled yet — the worker's first epoch (epochs count from 1; 0 is
    allowed). A new trial's first report used to re-read it: 6 of the 7 statements per trial of
    a batch's first report (issue 12)."""
    if known.last_epoch is not None:
        return epoch == known.last_epoch + 1
    return epoch <= 1 and not known.trial.intermediate_values


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
        single route raises (``TrialNotFound``, ``LeaseMismatch``, ``TrialFinished``)."""
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

    def report_many(self, reports: Sequence[EpochReport]) -> list[ReportAnswer | HPOError]:
        """``report`` for many trials' epochs, in order: the leases and their studies read in
        one query, every report's metrics and intermediate value written in one transaction,
        the beats that are due in one statement. Per report an answer, or the error the single
        route raises. A batch naming one trial twice is handled one report after the other
        (each report of a trial builds on the one before)."""
        core = self.core
        found = leases_and_study_states(core, [r.trial_id for r in reports])
        due: list[int] = []
        if len({r.trial_id for r in reports}) != len(reports):
            return [answer for item in reports for answer in self._handle(found, [item], due)]
        answers = self._handle(found, reports, due)
        self._beat(due)
        # --- issue 14: every epoch's diagnostics kept (one statement), plots redrawn off the
        # request every few epochs (studies/_diagnostics.py)
        self.diagnostics.epochs_reported(found, reports, answers)
        return answers

    def _handle(
        self,
        found: Mapping[int, tuple[LeaseRow, str | None]],
        reports: Sequence[EpochReport],
        due: list[int],
    ) -> list[ReportAnswer | HPOError]:
        """Plan each report, write them all in one transaction, then decide each."""
        core = self.core
        planned: list[_Planned | HPOError] = []
        for item in reports:
            try:
                planned.append(self._plan(found, item))
            except PER_TRIAL_ERRORS as error:
                planned.append(error)
        # Optuna refuses writes to a finished trial: this is the running check.
        refused = core.write_reports(
            [
                (p.item.trial_id, p.metrics, p.intermediate)
                for p in planned
                if isinstance(p, _Planned)
            ]
        )
        answers: list[ReportAnswer | HPOError] = []
        for p in planned:
            if not isinstance(p, _Planned):
                answers.append(p)
                continue
            finished = refused.get(p.item.trial_id)
            try:
                if finished is not None:
                    raise finished_meanwhile(core, p.row, finished) from finished
                answers.append(self._decide(p, due))
            except PER_TRIAL_ERRORS as per_trial:
                answers.append(per_trial)
        return answers

    def _plan(
        self, found: Mapping[int, tuple[LeaseRow, str | None]], item: EpochReport
    ) -> _Planned:
        """Check a report and work out what it writes; nothing is written yet."""
        core = self.core
        epoch, value = item.epoch, item.value
        if value is not None and not math.isfinite(value):
            raise InvalidValue(
                "value",
                f"must be a finite number (got {value}); a run that diverged sends `fail` with "
                "`diverged: true`",
            )
        row, study_state = checked_lease(found, item.trial_id, item.token)
        loaded = core.load(row.study_id)
        running = self._current_running(row, epoch)
        stored = running.trial.intermediate_values.get(epoch)
        if value is not None and stored is not None and stored != value:
            # Checked before anything is written: the refused report changes nothing.
            raise ReportConflict(
                f"epoch {epoch} of trial {row.trial_number} was already reported with value "
                f"{stored}; the first value stands (the same value again is a repeat)"
            )
        reason = reason_to_stop(study_state)
        # issue 10: only the primary metric is pruned on; a stopping study prunes nothing.
        prunes = reason is None and value is not None and loaded.spec.pruning_metric is not None
        intermediate = None
        if prunes and value is not None and epoch not in running.trial.intermediate_values:
            intermediate = (epoch, value)  # a repeated report of an epoch is not re-stored
        metrics = finite_metrics({"epoch": epoch, **item.metrics})
        return _Planned(item, row, loaded, running, reason, prunes, metrics, intermediate)

    def _decide(self, p: _Planned, due: list[int]) -> ReportAnswer:
        """After a report's writes: the stop/continue/prune answer."""
        core, running, epoch = self.core, p.running, p.item.epoch
        if p.intermediate is not None:
            running.trial.intermediate_values[epoch] = p.intermediate[1]
        if self._beat_due(running):
            due.append(p.item.trial_id)
        running.last_epoch = epoch
        if p.reason is not None:
            return ReportAnswer(action="stop", reason=p.reason)
        if not p.prunes:
            return ReportAnswer(action="continue")
        # Trial.should_prune() without re-reading anything: the pruner gets the trial as just
        # written and the study's trials from the snapshot.
        study = core.view(p.loaded, core.pruning_snapshot(p.loaded), running.trial)
        if study.pruner.prune(study, _pruner_copy(running.trial)):
            return ReportAnswer(action="prune", reason=f"pruned at epoch {epoch}")
        return ReportAnswer(action="continue")

    def _current_running(self, row: LeaseRow, epoch: int) -> RunningTrial:
        """The running trial for a report of ``epoch``: remembered if this process handled the
        report of ``epoch - 1`` (see ``RunningTrial``), else read. Raises ``TrialFinished``."""
        core = self.core
        known = core.known_running(row.trial_id)
        if known is not None and _follows(known, epoch):
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
