"""Every state transition of a study or a trial; nothing else calls Optuna's ask/tell.

Create a study from a spec; lease a trial (ask + suggest) to a worker; record heartbeats; report
intermediate values and decide pruning; complete or fail it (tell); reap expired leases and queue a
retry with the same parameters. ``StudyService`` is the one entry point; each job lives in its
own module, all sharing one ``StudyCore`` (the storage, the per-study lock, this process's
memory of studies and running trials):

- ``_registry``  — study CRUD, listing, enqueue (``StudyRegistry``);
- ``_leasing``   — the lease protocol: budget, concurrency, sampling (``LeaseProtocol``);
- ``_reporting`` — heartbeats, per-epoch reports and pruning (``Reporting``);
- ``_finishing`` — complete and fail, each exactly once (``Finishing``);
- ``_reaping``   — expired and lease-less trials, and the retry policy (``Reaper``);
- ``_checkpoints`` — checkpoints, resuming a retry, and their retention (``Checkpoints``);
- ``_final_eval`` — the final evaluation of an ended study's winners (``FinalEvaluations``);
- ``_diagnostics`` — every epoch's record kept, the diagnostics plot redrawn (``Diagnostics``);
- ``_trials``    — a trial's history, resolved config and reproducibility record;
- ``_checks``, ``_budget`` — lease-token and trial-state checks; the budget tally.

Budget and concurrency are enforced under a per-study lock that holds across server replicas: a
PostgreSQL advisory lock taken in the lease transaction, plus a process lock (SQLite has one writer
process by design, see ARCHITECTURE.md). Optuna owns trial state; our ``hpo_leases`` row holds the
lease token and the answer given to ``complete``, so a repeated ``complete`` gets the same answer
and a late one after the reaper failed the trial gets ``TrialReaped`` instead of being dropped.

The per-trial path does as few database round trips as it can (``docs/benchmarks.md``):
- trials are read through one Optuna ``_CachedStorage`` per process, which re-reads only running
  and new trials (finished trials never change);
- a lease samples against that read and writes the whole new trial — parameters and
  attributes — in one transaction (``study_view.StudyView``) instead of one commit per
  ``suggest_*``;
- a report writes its metrics and its intermediate value and decides pruning from the running
  trial this process already holds, re-reading it only when this process did not handle the
  trial's previous report; the study's finished trials for the pruner come from a snapshot
  refreshed whenever this process leases a trial of the study and re-read after it finished
  one — and, on PostgreSQL (other replicas write too), once it is older than
  ``SNAPSHOT_MAX_AGE_S`` and than ``SNAPSHOT_READ_SHARE`` times its own last read.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import optuna
from optuna.artifacts._protocol import ArtifactStore

from hpo_service.config import Settings
from hpo_service.db import Database
from hpo_service.errors import HPOError
from hpo_service.schemas import (
    CompleteAnswer,
    FailAnswer,
    HeartbeatAnswer,
    Lease,
    LRRangeTestAnswer,
    LRRangeTestResult,
    ReportAnswer,
    ReproRecord,
    StudyInfo,
    StudySpec,
    StudyState,
    TrialConfig,
    TrialHistory,
    TrialPage,
)
from hpo_service.storage import build_storage
from hpo_service.studies import _trials
from hpo_service.studies._budget import work_may_come
from hpo_service.studies._checkpoints import Checkpoints
from hpo_service.studies._core import SNAPSHOT_MAX_AGE_S, SNAPSHOT_READ_SHARE, SPEC_ATTR, StudyCore
from hpo_service.studies._diagnostics import Diagnostics
from hpo_service.studies._final_eval import FinalEvaluations
from hpo_service.studies._finishing import Finishing, TrialFailure, TrialResult
from hpo_service.studies._leasing import LeaseProtocol
from hpo_service.studies._probes import ProbeResults
from hpo_service.studies._reaping import Reaper
from hpo_service.studies._registry import StudyRegistry
from hpo_service.studies._reporting import EpochReport, Reporting

__all__ = [
    "SNAPSHOT_MAX_AGE_S",
    "SNAPSHOT_READ_SHARE",
    "SPEC_ATTR",
    "EpochReport",
    "StudyCore",
    "StudyService",
    "TrialFailure",
    "TrialResult",
]


class StudyService:
    """The domain layer. One per process; thread-safe. A thin facade over the jobs above."""

    def __init__(
        self,
        settings: Settings,
        storage: optuna.storages.RDBStorage | None = None,
        artifact_store: ArtifactStore | None = None,
    ) -> None:
        # The service keeps each lease's liveness itself (``hpo_leases.beat_at_s``); Optuna's
        # heartbeat table is not written, so Optuna's own stale-trial check finds nothing.
        storage = storage or build_storage(settings)
        # One artifact store (checkpoints, kept models, plots): the app's, else one from settings.
        self.core = StudyCore(settings, storage, artifact_store)
        # issue 14: per-epoch history, and diagnostics plots when the caller gave a store (the
        # app does; a bare service in a script or test draws none)
        self.diagnostics = Diagnostics(self.core, artifact_store)
        self.registry = StudyRegistry(self.core)
        self.leasing = LeaseProtocol(self.core)
        self.reporting = Reporting(self.core, self.diagnostics)
        self.finishing = Finishing(self.core, self.diagnostics)
        self.reaper = Reaper(self.core)
        self.probes = ProbeResults(self.core, self.diagnostics)
        self.checkpoints = Checkpoints(self.core)  # issue 14: checkpoints, resume, retention
        self.final_evaluations = FinalEvaluations(self.core)  # issue 14.4: the winners

    # --- what other parts of the server read -------------------------------------------------

    @property
    def settings(self) -> Settings:
        return self.core.settings

    @property
    def storage(self) -> optuna.storages.RDBStorage:
        return self.core.storage

    @property
    def cache(self) -> optuna.storages.BaseStorage:
        return self.core.cache

    @property
    def db(self) -> Database:
        return self.core.db

    @property
    def reaped_leases(self) -> int:
        """Trials this process failed for an expired lease (``/metrics``)."""
        return self.reaper.reaped_leases

    # --- studies ------------------------------------------------------------------------------

    def create_study(
        self,
        spec: StudySpec,
        *,
        enqueue: Sequence[Mapping[str, Any]] = (),
        user_attrs: Mapping[str, Any] | None = None,
    ) -> StudyInfo:
        return self.registry.create_study(spec, enqueue=enqueue, user_attrs=user_attrs)

    def list_studies(self, state: StudyState | None = None) -> list[StudyInfo]:
        return self.registry.list_studies(state)

    def get_study(self, name: str) -> StudyInfo:
        return self.registry.get_study(name)

    def list_trials(self, name: str, offset: int = 0, limit: int = 100) -> TrialPage:
        return self.registry.list_trials(name, offset, limit)

    def set_state(self, name: str, state: StudyState) -> StudyInfo:
        return self.registry.set_state(name, state)

    def delete_study(self, name: str) -> None:
        self.registry.delete_study(name)

    def enqueue(self, name: str, param_sets: list[dict[str, Any]]) -> int:
        return self.registry.enqueue(name, param_sets)

    # --- the worker protocol ------------------------------------------------------------------

    def lease(
        self,
        worker_id: str,
        wait_s: float = 0.0,
        kinds: Sequence[str] = ("trial",),
        device: str | None = None,
    ) -> Lease | None:
        return self.leasing.lease(worker_id, wait_s, kinds, device=device)

    def lr_range_test(
        self, trial_id: int, token: str, result: LRRangeTestResult
    ) -> LRRangeTestAnswer:
        """An ``lr_range_test`` lease's curve: sets the study's LR ranges (``_probes``)."""
        return self.probes.lr_range_test(trial_id, token, result)

    def work_may_come(self, kinds: Sequence[str] = ("trial",)) -> bool:
        """False when no study can give work now (a worker may exit: ``--exit-when-idle``);
        True while some running study is waiting on its caps or its running trials (or, for
        a worker of ``kinds`` with ``final_evaluation``, on its winners' evaluation)."""
        return work_may_come(self.core, kinds)

    def heartbeat(self, trial_id: int, token: str) -> HeartbeatAnswer:
        return self.reporting.heartbeat(trial_id, token)

    def report(
        self,
        trial_id: int,
        token: str,
        epoch: int,
        value: float | None,
        metrics: Mapping[str, Any],
    ) -> ReportAnswer:
        """Store the epoch's objective value as an intermediate value and its metrics as a user
        attribute, then ask the study's pruner. A repeated report of an epoch with the same value is
        not re-stored.
        A report counts as a heartbeat.

        Raises ``TrialNotFound``, ``LeaseMismatch``, ``TrialFinished`` / ``TrialReaped`` (the
        trial is no longer running), ``ReportConflict`` (the epoch was reported with another
        value) or ``InvalidValue`` (a non-finite value).
        """
        item = EpochReport(trial_id, token, epoch, value, metrics)
        answer = self.report_many([item])[0]
        if isinstance(answer, HPOError):
            raise answer
        return answer

    def complete(
        self,
        trial_id: int,
        token: str,
        values: Sequence[float],
        metrics: Mapping[str, Any],
        *,
        output_tail: str | None = None,
    ) -> CompleteAnswer:
        return self.finishing.complete(trial_id, token, values, metrics, output_tail=output_tail)

    def fail(
        self,
        trial_id: int,
        token: str,
        reason: str,
        retryable: bool,
        pruned: bool = False,
        diverged: bool = False,  # issue 10: completed infeasible (hpo_service.constraints)
        *,
        output_tail: str | None = None,
    ) -> FailAnswer:
        return self.finishing.fail(
            trial_id, token, reason, retryable, pruned, diverged, output_tail=output_tail
        )

    # --- the batched worker protocol: many trials per request, per-trial answers ------------

    def lease_many(
        self,
        worker_id: str,
        count: int,
        wait_s: float = 0.0,
        slots: Sequence[str] | None = None,
        device: str | None = None,
        kinds: Sequence[str] = ("trial",),
    ) -> list[Lease]:
        return self.leasing.lease_many(worker_id, count, wait_s, kinds, slots=slots, device=device)

    def heartbeat_many(self, leases: Sequence[tuple[int, str]]) -> list[HeartbeatAnswer | HPOError]:
        return self.reporting.heartbeat_many(leases)

    def report_many(self, reports: Sequence[EpochReport]) -> list[ReportAnswer | HPOError]:
        # A `prune` answer ends its trial PRUNED before it is sent (issue 16).
        return self.finishing.settle_pruned(reports, self.reporting.report_many(reports))

    def complete_many(self, results: Sequence[TrialResult]) -> list[CompleteAnswer | HPOError]:
        return self.finishing.complete_many(results)

    def fail_many(self, failures: Sequence[TrialFailure]) -> list[FailAnswer | HPOError]:
        return self.finishing.fail_many(failures)

    # --- a trial's own records (issue 14) ---------------------------------------------------

    def trial_history(self, name: str, number: int) -> TrialHistory:
        return _trials.trial_history(self.core, self.diagnostics, name, number)

    def trial_config(self, name: str, number: int) -> TrialConfig:
        return _trials.trial_config(self.core, name, number)

    def record_repro(self, trial_id: int, token: str, record: ReproRecord) -> None:
        _trials.record_repro(self.core, trial_id, token, record)

    # --- reaping ------------------------------------------------------------------------------

    def reap(self) -> int:
        """Fail every trial whose lease expired (by the database clock) and queue retries.
        Returns how many studies were checked."""
        return self.reaper.reap()
