"""The lease protocol: hand a trial to a worker (ask + suggest), within budget and concurrency.

Budget and concurrency are enforced under the per-study lock (``StudyCore.study_lock``), which
holds across server replicas. A lease samples against the study's trials as read under that
lock and writes the whole new trial — parameters and attributes — in one transaction
(``study_view.StudyView``) instead of one commit per ``suggest_*``.
"""

from __future__ import annotations

import copy
import logging
import secrets
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState
from sqlalchemy import select

from hpo_service.errors import InvalidSpec
from hpo_service.final_eval import FINAL_EVALUATION
from hpo_service.logging_setup import trial_fields
from hpo_service.lr_range import LR_RANGE_TEST, TASK_ATTR
from hpo_service.models import LeaseRow, StudyRow
from hpo_service.schemas import Lease, ResumeFrom
from hpo_service.search_space import resolve_config, suggest
from hpo_service.studies import _optuna_rows
from hpo_service.studies._budget import tally
from hpo_service.studies._checkpoints import resume_source
from hpo_service.studies._checks import stop_reason
from hpo_service.studies._core import LoadedStudy, RunningTrial, StudyCore, aware, now
from hpo_service.studies._final_eval import SETTINGS_ATTR, task_step
from hpo_service.studies._probes import ProbeLeasing
from hpo_service.study_view import StudyView

log = logging.getLogger(__name__)


@dataclass
class _Sample:
    """A sampled trial not yet leased: pending in ``view`` (new) or popped (WAITING)."""

    view: StudyView
    trial: optuna.Trial
    config: dict[str, Any] | None  # None: the sampled values make no valid config
    failure: str = ""


@dataclass
class _Granted:
    """A trial written for a lease under the study lock, its lease not yet committed."""

    trial_id: int
    number: int
    token: str
    config: dict[str, Any]
    params: dict[str, Any]  # as sampled, beside the resolved config
    trial: FrozenTrial | None  # as just written (a new trial), to serve its first report
    worker_id: str  # the lease identity holding it
    kind: str = "trial"  # LeaseKind
    resume: ResumeFrom | None = None  # issue 14: a retry's checkpoint to resume from
    task: dict[str, Any] | None = None  # a final_evaluation task's winners (issue 14.4)


class LeaseProtocol:
    """Hands out trials over one ``StudyCore``."""

    def __init__(self, core: StudyCore) -> None:
        self.core = core
        self.probes = ProbeLeasing(core)

    def lease(
        self,
        worker_id: str,
        wait_s: float = 0.0,
        kinds: Sequence[str] = ("trial",),
        device: str | None = None,
    ) -> Lease | None:
        """Hand a trial to a worker, long-polling up to ``wait_s`` seconds; None if no work.

        A worker that comes back with the same id gets its own running trial back. ``kinds``:
        the lease kinds the worker runs (``LeaseKind``); a study whose LR range test is pending
        hands out nothing to a worker that cannot run it. ``device`` (the worker's, as it
        asked) is kept as the trial's ``worker_device`` attribute.
        """
        leases = self.lease_many(worker_id, 1, wait_s, kinds, device=device)
        return leases[0] if leases else None

    def lease_many(
        self,
        worker_id: str,
        count: int,
        wait_s: float = 0.0,
        kinds: Sequence[str] = ("trial",),
        slots: Sequence[str] | None = None,
        device: str | None = None,
    ) -> list[Lease]:
        """Up to ``count`` trials for one worker, long-polling up to ``wait_s`` seconds for the
        first; empty if no work. The worker's own running trials come back first.

        ``slots`` (``count`` distinct ids): each lease is held by one slot instead of by
        ``worker_id``, and a slot that still holds a running trial gets that one back — so a
        population worker keeps one lease identity per slot and refills some slots while the
        others train.

        A study's share is sampled and written under one hold of its lock, each trial sampled
        with the ones before it running (Optuna's constant liar), so a batch is diverse and
        the budget and concurrency caps hold exactly, across replicas.

        A task (``kinds`` beyond ``trial``: an LR range test, a final evaluation) goes alone,
        to the first free holder: the worker runs it by itself before any trial, so trials
        leased beside it would only wait without a heartbeat.
        """
        holders = list(slots) if slots is not None else [worker_id] * count
        deadline = time.monotonic() + wait_s
        while True:
            leases, free = self._own_running_trials(holders)
            if free and not any(lease.kind != "trial" for lease in leases):
                leases += self._try_lease(free, kinds, device)
            if leases:
                return leases
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return []
            time.sleep(min(self.core.settings.long_poll_step_s, remaining))

    def _own_running_trials(self, holders: list[str]) -> tuple[list[Lease], list[str]]:
        """The running trials ``holders`` already hold (one per entry of ``holders``), and the
        entries left without one, in order."""
        core = self.core
        with core.db.session() as session:
            rows = list(
                session.scalars(
                    select(LeaseRow)
                    .where(LeaseRow.worker_id.in_(set(holders)), LeaseRow.outcome.is_(None))
                    .order_by(LeaseRow.trial_id)
                )
            )
        free = list(holders)
        leases: list[Lease] = []
        for row in rows:
            if row.worker_id not in free:
                continue
            try:
                trial = core.storage.get_trial(row.trial_id)
            except KeyError:
                continue
            if trial.state == TrialState.RUNNING and stop_reason(core, row.study_id) is None:
                core.record_beat(row.trial_id)
                loaded = core.load(row.study_id)
                config = trial.user_attrs.get("config") or resolve_config(loaded.spec, trial.params)
                kind = str(trial.user_attrs.get(TASK_ATTR, "trial"))
                free.remove(row.worker_id)
                leases.append(
                    self._lease_answer(
                        loaded,
                        row.trial_id,
                        trial.number,
                        row.token,
                        config,
                        trial.params,
                        row.worker_id,
                        kind=kind,
                        resume=resume_source(core, row.study_id, trial),
                        task=trial.user_attrs.get(SETTINGS_ATTR),
                    )
                )
        return leases, free

    def _try_lease(
        self, holders: list[str], kinds: Sequence[str], device: str | None
    ) -> list[Lease]:
        with self.core.db.session() as session:
            # Fairness: the running study served longest ago goes first.
            candidates = list(
                session.execute(
                    select(StudyRow.study_id)
                    .where(StudyRow.state == "running")
                    .order_by(StudyRow.last_leased_at.asc().nulls_first(), StudyRow.study_id)
                ).scalars()
            )
        leases: list[Lease] = []
        free = list(holders)
        for study_id in candidates:
            # Once trials are granted, later studies add trials only (a task goes alone).
            wanted = [k for k in kinds if k == "trial"] if leases else kinds
            granted = self._lease_from(study_id, free, wanted, device)
            for lease in granted:
                free.remove(str(lease.worker_id))
            leases += granted
            if not free or any(lease.kind != "trial" for lease in granted):
                break  # a task goes alone (``lease_many``)
        return leases

    def _lease_from(
        self, study_id: int, holders: list[str], kinds: Sequence[str], device: str | None = None
    ) -> list[Lease]:
        """Up to ``len(holders)`` new trials of one study, the i-th held by ``holders[i]``."""
        core = self.core
        loaded = core.load(study_id)
        budget = loaded.spec.budget
        granted: list[_Granted] = []
        with core.study_lock(study_id) as session:
            row = session.get(StudyRow, study_id)
            if row is None or row.state != "running":
                return []
            if (
                budget.timeout_s is not None
                and (now() - aware(row.created_at)).total_seconds() > budget.timeout_s
            ):
                row.state = "stopped"
                log.info("study %s reached its timeout; no new trials", row.name)
                return []
            # Complete under the lock: every trial of a study is created under it (leases,
            # enqueues, retries), so no trial can appear behind the cache's back.
            trials = core.cache.get_all_trials(study_id, deepcopy=False)
            core.remember_snapshot(loaded, trials)
            probe: _Granted | None = None
            if loaded.spec.lr_range_test.enabled and loaded.lr_range_test is None:
                # The probe goes first and alone, to the first holder.
                step = self.probes.step(study_id, loaded, trials, holders[0], kinds)
                if step == "wait":
                    return []
                if step == "settled":  # reload: the space now holds the test's ranges
                    core.forget_loaded(study_id)
                    loaded = core.load(study_id)
                    core.remember_snapshot(loaded, trials)
                else:
                    trial_id, number, config = step
                    token = secrets.token_urlsafe(24)
                    probe = _Granted(
                        trial_id, number, token, config, {}, None, holders[0], kind=LR_RANGE_TEST
                    )
            # A worker that lists only task kinds gets no trial here.
            for worker_id in [] if probe or "trial" not in kinds else holders:
                counted, running, _waiting, failures = tally(trials, loaded.tally)
                if failures >= budget.max_failed or counted >= budget.n_trials:
                    break
                if running >= min(budget.max_concurrent, row.max_concurrent):
                    break
                # Sampled under the lock, so the sampler sees every trial leased before this
                # one (constant liar). Sampling ahead of the lock was measured slower in one
                # process: the sampling threads held the GIL while the lock holder waited on
                # the database.
                sample = self._sample(loaded, trials)
                if sample.config is None:
                    reason = {"fail_reason": sample.failure}
                    _, number = self._write_leased_trial(study_id, sample, reason, trials)
                    loaded.study.tell(number, state=TrialState.FAIL)
                    log.warning("trial %d of %s has an %s", number, row.name, sample.failure)
                    trials = core.cache.get_all_trials(study_id, deepcopy=False)
                    continue
                attrs = {"worker_id": worker_id, "config": sample.config}
                if device is not None:  # issue 14: the device the worker asked to train on
                    attrs["worker_device"] = device
                trial_id, number = self._write_leased_trial(study_id, sample, attrs, trials)
                leased: FrozenTrial | None = None
                resume: ResumeFrom | None = None
                if sample.view.pending is not None:  # the running trial as it stands
                    leased = copy.deepcopy(sample.view.pending)
                    leased._trial_id, leased.number = trial_id, number
                    trials = [*trials, leased]
                else:  # a popped WAITING trial: read it as it now is
                    trials = core.cache.get_all_trials(study_id, deepcopy=False)
                    # issue 14: a retry resumes from an earlier attempt's checkpoint
                    resume = resume_source(core, study_id, core.cache.get_trial(trial_id))
                granted.append(
                    _Granted(
                        trial_id,
                        number,
                        secrets.token_urlsafe(24),
                        sample.config,
                        dict(sample.trial.params),
                        leased,
                        worker_id,
                        resume=resume,
                    )
                )
            if probe is not None:
                granted.append(probe)
            if not granted and probe is None:
                counted, running, _waiting, failures = tally(trials, loaded.tally)
                ended = counted >= budget.n_trials and running == 0
                if ended and failures < budget.max_failed:  # issue 14.4: evaluate the winners
                    task = task_step(core, study_id, loaded, trials, holders[0], kinds)
                    if task is not None:
                        trial_id, number, settings = task
                        token = secrets.token_urlsafe(24)
                        granted.append(
                            _Granted(
                                trial_id, number, token, {}, {}, None, holders[0],
                                kind=FINAL_EVALUATION, task=settings,
                            )
                        )  # fmt: skip
            if not granted:
                return []
            # The leases are written in the critical section that made their trials (our
            # writes after Optuna's, see ``study_lock``): under the lock, every RUNNING trial
            # of the study has a lease, so one without is what a crash in between left, and
            # the reaper fails it on its next pass. Each lease's clock starts here, by the
            # database's clock.
            session.add_all(
                LeaseRow(
                    trial_id=g.trial_id,
                    study_id=study_id,
                    trial_number=g.number,
                    token=g.token,
                    worker_id=g.worker_id,
                    beat_at_s=core.database_clock_s(),
                )
                for g in granted
            )
            row.last_leased_at = now()  # fairness: the study served longest ago goes first
        leases: list[Lease] = []
        for g in granted:
            if g.trial is not None:
                core.remember_running(g.trial_id, RunningTrial(g.trial, beat_at=time.monotonic()))
            log.info(
                "leased trial %d of %s to %s",
                g.number,
                row.name,
                g.worker_id,
                extra=trial_fields(
                    "lease_granted",
                    study=row.name,
                    study_id=study_id,
                    trial_id=g.trial_id,
                    trial_number=g.number,
                    worker_id=g.worker_id,
                ),
            )
            leases.append(
                self._lease_answer(
                    loaded,
                    g.trial_id,
                    g.number,
                    g.token,
                    g.config,
                    g.params,
                    g.worker_id,
                    kind=g.kind,
                    resume=g.resume,
                    task=g.task,
                )
            )
        return leases

    def _sample(self, loaded: LoadedStudy, trials: list[FrozenTrial]) -> _Sample:
        """Ask the study's sampler for a trial over ``trials``; a WAITING trial is popped
        (through the real storage) if there is one, else a new one stays pending in memory."""
        view = StudyView(
            self.core.cache,
            loaded.study._study_id,
            loaded.spec.name,
            loaded.study.directions,
            trials,
        )
        trial = view.study(loaded.study.sampler, loaded.study.pruner).ask()
        try:
            params = suggest(trial, loaded.spec, loaded.space)
            return _Sample(view, trial, resolve_config(loaded.spec, params))
        except InvalidSpec as error:
            return _Sample(view, trial, None, f"invalid config: {error}")

    def _write_leased_trial(
        self, study_id: int, sample: _Sample, attrs: dict[str, Any], trials: list[FrozenTrial]
    ) -> tuple[int, int]:
        """Write the sampled trial with ``attrs`` as user attributes; returns (id, number).

        A new trial is written whole — parameters, the sampler's system attributes and
        ``attrs`` — in one transaction. A popped WAITING trial already exists: only ``attrs``
        are written.
        """
        core = self.core
        pending, trial = sample.view.pending, sample.trial
        if pending is None:
            for key, value in attrs.items():
                core.storage.set_trial_user_attr(trial._trial_id, key, value)
            return trial._trial_id, trial.number
        pending.user_attrs.update(attrs)
        if core.fast_rows:
            return self._write_new_trial(study_id, sample, trials)
        trial_id = core.cache.create_new_trial(study_id, template_trial=pending)
        # Optuna numbers a trial by counting the study's earlier trials; under the study lock
        # that is the snapshot's length, which the cache (filled by create_new_trial) confirms.
        number = pending.number
        try:
            confirmed = core.cache.get_trial_id_from_study_id_trial_number(study_id, number)
        except KeyError:
            confirmed = None
        if confirmed != trial_id:  # a trial was made outside the service: ask the database
            number = core.storage.get_trial(trial_id).number
        return trial_id, number

    def _write_new_trial(
        self, study_id: int, sample: _Sample, trials: list[FrozenTrial]
    ) -> tuple[int, int]:
        """The pending trial's rows in 4–5 statements instead of Optuna's 38 for 10
        parameters (``_optuna_rows.create_trial``); the number is the database's."""
        core, pending = self.core, sample.view.pending
        assert pending is not None
        loaded = core.load(study_id)
        known = loaded.distributions
        if not known.keys() >= pending.distributions.keys():
            known.update(_optuna_rows.first_distributions(trials))
        written = _optuna_rows.create_trial(core.storage, study_id, pending, known)
        for name, distribution in pending.distributions.items():
            known.setdefault(name, distribution)
        return written._trial_id, written.number

    def _lease_answer(
        self,
        loaded: LoadedStudy,
        trial_id: int,
        number: int,
        token: str,
        config: dict[str, Any],
        params: Mapping[str, Any],
        worker_id: str,
        kind: str = "trial",
        resume: ResumeFrom | None = None,
        task: dict[str, Any] | None = None,
    ) -> Lease:
        settings = self.core.settings
        if kind == LR_RANGE_TEST:
            task = loaded.spec.lr_range_test.model_dump(mode="json", exclude={"enabled"})
        return Lease(
            kind=kind,  # type: ignore[arg-type,unused-ignore]  # a LeaseKind: server-set
            task=task,
            trial_id=trial_id,
            trial_number=number,
            study=loaded.spec.name,
            lease_token=token,
            config=config,
            params=dict(params),
            objective_metrics=loaded.spec.metric_names,
            report_metric=loaded.spec.pruning_metric,  # issue 10: multi-objective primary
            heartbeat_interval_s=settings.heartbeat_interval_s,
            worker_id=worker_id,
            lease_timeout_s=settings.lease_timeout_s,
            # --- issue 14: checkpoints and resume
            checkpoint_every_epochs=settings.checkpoint_every_epochs,
            resume_from=resume,
            keep_best_model=settings.best_models_kept > 0,
        )
