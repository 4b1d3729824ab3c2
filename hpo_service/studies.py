"""Every state transition of a study or a trial; nothing else calls Optuna's ask/tell.

Create a study from a spec; lease a trial (ask + suggest) to a worker; record heartbeats; report
intermediate values and decide pruning; complete or fail it (tell); reap expired leases and queue a
retry with the same parameters.

Budget and concurrency are enforced under a per-study lock that holds across server replicas: a
PostgreSQL advisory lock taken in the lease transaction, plus a process lock (SQLite has one writer
process by design, see ARCHITECTURE.md). Optuna owns trial state; our ``hpo_leases`` row holds the
lease token and the answer given to ``complete``, so a repeated ``complete`` gets the same answer
and a late one after the reaper failed the trial gets ``TrialReaped`` instead of being dropped.
Finishing a trial is claimed with a compare-and-set on that row, so of two results for one trial,
sent to any replicas, exactly one is told.

The per-trial path does as few database round trips as it can (``docs/benchmarks.md``):
- trials are read through one Optuna ``_CachedStorage`` per process, which re-reads only running
  and new trials (finished trials never change);
- a lease samples against that read and writes the whole new trial — parameters and
  attributes — in one transaction (``study_view.StudyView``) instead of one commit per
  ``suggest_*``;
- a report writes its metrics and its intermediate value and decides pruning from the running
  trial this process already holds, re-reading it only when this process did not handle the
  trial's previous report (``_RunningTrial``); the study's finished trials for the pruner come
  from a snapshot at most ``SNAPSHOT_MAX_AGE_S`` old, refreshed whenever this process
  leases a trial of the study and re-read after it finished one.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import secrets
import threading
import time
import warnings
import zlib
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import optuna
from optuna.exceptions import ExperimentalWarning, UpdateFinishedTrialError
from optuna.trial import FrozenTrial, TrialState
from sqlalchemy import and_, or_, select, text, update
from sqlalchemy.orm import Session

from hpo_service.config import Settings
from hpo_service.db import Database, prepare_service_schema
from hpo_service.errors import (
    InvalidSpec,
    LeaseMismatch,
    ResultConflict,
    StudyExists,
    StudyNotFound,
    StudyNotRunning,
    TrialNotFound,
    TrialReaped,
)
from hpo_service.grid import fit_budget_to_grid, study_grid
from hpo_service.logging_setup import trial_fields
from hpo_service.models import LeaseRow, StudyRow
from hpo_service.optimizers import build_pruner, build_sampler, describe
from hpo_service.schemas import (
    CompleteAnswer,
    FailAnswer,
    HeartbeatAnswer,
    Lease,
    ReportAnswer,
    StudyInfo,
    StudySpec,
    StudyState,
    TrialCounts,
    TrialPage,
    TrialSummary,
)
from hpo_service.search_space import Param, check_spec, resolve_config, suggest
from hpo_service.storage import build_storage
from hpo_service.study_view import StudyView

log = logging.getLogger(__name__)

SPEC_ATTR = "spec"
ACTIVE_STATES = ("running", "stopped", "cancelled")
#: How old (s) the study's trials may be when the pruner compares against finished trials. Only
#: trials that other replicas finished can be missing: this process's own leases refresh the
#: snapshot and its own results force a fresh read.
SNAPSHOT_MAX_AGE_S = 1.0
#: Running trials this process remembers between reports (least recently used dropped first).
RUNNING_CACHE_SIZE = 4096
#: ``hpo_leases.outcome`` while a result is being told; the final outcome replaces it.
CLAIMED = {"complete": "completing", "fail": "failing"}


@dataclass
class _Loaded:
    """A study as this process drives it: Optuna's handle, its spec and its space."""

    study: optuna.Study
    spec: StudySpec
    space: list[Param]
    # The study's trials as last read (monotonic time), for the pruner; not ``exact`` once this
    # process changed a trial's state after reading them.
    snapshot: list[FrozenTrial] | None = None
    snapshot_at: float = 0.0
    exact: bool = False


@dataclass
class _Sample:
    """A sampled trial not yet leased: pending in ``view`` (new) or popped (WAITING)."""

    view: StudyView
    trial: optuna.Trial
    config: dict[str, Any] | None  # None: the sampled values make no valid config
    failure: str = ""


@dataclass
class _RunningTrial:
    """A running trial as this process last wrote or read it.

    Workers report epochs in order and wait for each answer, so when this process handled the
    report of epoch e - 1 and now gets epoch e, no other replica can have written the trial in
    between: ``trial`` is current and need not be re-read.
    """

    trial: FrozenTrial
    last_epoch: int | None = None  # the epoch of the last report this process handled
    beat_at: float = field(default=float("-inf"))  # monotonic time of our last heartbeat write


def _fingerprint(values: Sequence[float]) -> str:
    return hashlib.sha256(json.dumps([float(v) for v in values]).encode()).hexdigest()


def _finite_metrics(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """Metrics as JSON-safe values: non-finite floats become None rather than breaking JSON."""

    def clean(value: Any) -> Any:
        if isinstance(value, float) and not math.isfinite(value):
            return None
        if isinstance(value, list):
            return [clean(v) for v in value]
        return value

    return {key: clean(value) for key, value in metrics.items()}


def _now() -> datetime:
    return datetime.now(UTC)


def _aware(moment: datetime) -> datetime:
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def _check_param_sets(
    spec: StudySpec, space: Sequence[Param], param_sets: Sequence[Mapping[str, Any]]
) -> None:
    """Each set names only parameters of the space, inside it, and makes a valid config.

    Raises ``InvalidSpec`` naming ``params[i].<name>``.
    """
    by_name = {p.name: p for p in space}
    for index, params in enumerate(param_sets):
        for key, value in params.items():
            param = by_name.get(key)
            if param is None:
                raise InvalidSpec(f"params[{index}].{key}", "not a parameter of this study")
            if not param.contains(value):
                raise InvalidSpec(f"params[{index}].{key}", f"{value!r} is outside the space")
        try:
            resolve_config(spec, params)
        except InvalidSpec as error:
            raise InvalidSpec(f"params[{index}].{error.field}", error.reason) from error


class StudyService:
    """The domain layer. One per process; thread-safe."""

    def __init__(
        self, settings: Settings, storage: optuna.storages.RDBStorage | None = None
    ) -> None:
        self.settings = settings
        self.storage = storage or build_storage(settings, on_stale=self._on_stale_trial)
        if storage is not None:
            storage.heartbeat_stale_trial_callback = self._on_stale_trial
        # Optuna's own cache over the storage, shared by every study of this process: finished
        # trials are read once, later reads fetch only running and new trials.
        self.cache = optuna.storages.get_storage(self.storage)
        self.db = Database(self.storage.engine)
        prepare_service_schema(self.storage.engine)  # creates on an empty DB, never migrates
        self._is_postgres = self.storage.engine.dialect.name == "postgresql"
        self._guard = threading.Lock()
        self._locks: dict[int, threading.RLock] = {}
        self._loaded: dict[int, _Loaded] = {}
        self.reaped_leases = 0  # trials this process failed for an expired lease (/metrics)
        self._running: OrderedDict[int, _RunningTrial] = OrderedDict()

    # --- locking and loading ----------------------------------------------------------------

    @contextmanager
    def _study_lock(self, study_id: int) -> Iterator[Session]:
        """Serialise the trial-creating operations of one study (lease, enqueue, fail with its
        retry, reap) across threads and server replicas; ``complete`` is claimed by
        compare-and-set instead (``_claim``).

        Yields a session whose transaction holds the lock; commit releases it. On SQLite only
        the process lock applies (one writer process) and our own writes must come after
        Optuna's in the same critical section, or the two connections would deadlock.
        """
        with self._guard:
            lock = self._locks.setdefault(study_id, threading.RLock())
        with lock, self.db.session() as session:
            if self._is_postgres:
                key = zlib.crc32(f"hpo-study-{study_id}".encode())
                session.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": key})
            yield session

    def _load(self, study_id: int) -> _Loaded:
        loaded = self._loaded.get(study_id)
        if loaded is not None:
            return loaded
        name = self.storage.get_study_name_from_id(study_id)
        attrs = self.storage.get_study_user_attrs(study_id)
        spec = StudySpec.model_validate(attrs[SPEC_ATTR])
        space = check_spec(spec)
        study = optuna.load_study(
            study_name=name,
            storage=self.cache,
            sampler=build_sampler(spec.sampler, study_grid(spec, space)),
            pruner=build_pruner(spec.pruner, spec.epochs),
        )
        loaded = _Loaded(study=study, spec=spec, space=space)
        with self._guard:
            self._loaded.setdefault(study_id, loaded)
            return self._loaded[study_id]

    def _row(self, session: Session, name: str) -> StudyRow:
        row = session.scalar(select(StudyRow).where(StudyRow.name == name))
        if row is None:
            raise StudyNotFound(name)
        return row

    # --- studies ------------------------------------------------------------------------------

    def create_study(
        self,
        spec: StudySpec,
        *,
        enqueue: Sequence[Mapping[str, Any]] = (),
        user_attrs: Mapping[str, Any] | None = None,
    ) -> StudyInfo:
        """Validate everything first, then write; a failure half-way deletes what was written.

        ``enqueue``: parameter sets queued before any worker can see the study (a scheduled
        run's warm start), checked like ``enqueue()``. ``user_attrs``: extra study attributes.
        Raises ``InvalidSpec`` (field and reason) or ``StudyExists``.
        """
        space = check_spec(spec)
        spec = fit_budget_to_grid(spec, space)  # a grid study ends with its grid
        _check_param_sets(spec, space, enqueue)
        sampler = build_sampler(spec.sampler, study_grid(spec, space))
        pruner = build_pruner(spec.pruner, spec.epochs)
        with self.db.session() as session:
            if session.scalar(select(StudyRow).where(StudyRow.name == spec.name)) is not None:
                raise StudyExists(spec.name)
        try:
            study = optuna.create_study(
                study_name=spec.name,
                storage=self.cache,
                sampler=sampler,
                pruner=pruner,
                directions=spec.directions,
            )
        except optuna.exceptions.DuplicatedStudyError as error:
            raise StudyExists(spec.name) from error
        study_id = study._study_id
        try:
            study.set_user_attr(SPEC_ATTR, spec.model_dump(mode="json"))
            study.set_user_attr("sampler", describe(sampler))
            study.set_user_attr("pruner", describe(pruner))
            study.set_user_attr("search_space", [p.name for p in space])
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ExperimentalWarning)
                study.set_metric_names(spec.metric_names)
            for key, value in (user_attrs or {}).items():
                study.set_user_attr(key, value)
            for params in enqueue:  # before the row below makes the study visible to workers
                study.enqueue_trial(dict(params), user_attrs={"enqueued": True})
            with self.db.session() as session:
                session.add(
                    StudyRow(
                        study_id=study_id,
                        name=spec.name,
                        state="running",
                        n_trials=spec.budget.n_trials,
                        max_concurrent=spec.budget.max_concurrent,
                    )
                )
        except BaseException:
            self.cache.delete_study(study_id)
            raise
        with self._guard:
            self._loaded[study_id] = _Loaded(study=study, spec=spec, space=space)
        log.info("created study %s (id %d)", spec.name, study_id)
        return self.get_study(spec.name)

    def list_studies(self, state: StudyState | None = None) -> list[StudyInfo]:
        with self.db.session() as session:
            names = list(session.scalars(select(StudyRow.name).order_by(StudyRow.study_id)))
        infos = [self.get_study(name) for name in names]
        return [info for info in infos if state is None or info.state == state]

    def get_study(self, name: str) -> StudyInfo:
        with self.db.session() as session:
            row = self._row(session, name)
        loaded = self._load(row.study_id)
        trials = self.cache.get_all_trials(row.study_id, deepcopy=False)
        counts = TrialCounts(
            **{
                state.name.lower(): sum(1 for t in trials if t.state == state)
                for state in (
                    TrialState.WAITING,
                    TrialState.RUNNING,
                    TrialState.COMPLETE,
                    TrialState.PRUNED,
                    TrialState.FAIL,
                )
            }
        )
        return StudyInfo(
            name=row.name,
            study_id=row.study_id,
            state=self._effective_state(row, trials, loaded.spec),
            directions=loaded.spec.directions,
            metric_names=loaded.spec.metric_names,
            counts=counts,
            best_trials=[self._summary(t) for t in self._best(loaded.study)],
            spec=loaded.spec,
            created_at=_aware(row.created_at).isoformat(),
        )

    def _best(self, study: optuna.Study) -> list[FrozenTrial]:
        try:
            if len(study.directions) == 1:
                return [study.best_trial]
            return list(study.best_trials)
        except ValueError:  # no completed trial yet
            return []

    def list_trials(self, name: str, offset: int = 0, limit: int = 100) -> TrialPage:
        with self.db.session() as session:
            row = self._row(session, name)
            workers = {
                trial_id: worker_id
                for trial_id, worker_id in session.execute(
                    select(LeaseRow.trial_id, LeaseRow.worker_id).where(
                        LeaseRow.study_id == row.study_id
                    )
                )
            }
        trials = self.cache.get_all_trials(row.study_id, deepcopy=False)  # sorted by number
        page = trials[offset : offset + limit]
        return TrialPage(
            study=name,
            total=len(trials),
            offset=offset,
            limit=limit,
            trials=[self._summary(t, workers.get(t._trial_id)) for t in page],
        )

    def _summary(self, trial: FrozenTrial, worker_id: str | None = None) -> TrialSummary:
        duration = trial.duration.total_seconds() if trial.duration is not None else None
        history = trial.system_attrs.get("retry_history") or []
        return TrialSummary(
            number=trial.number,
            trial_id=trial._trial_id,
            state=trial.state.name.lower(),
            params=trial.params,
            values=trial.values,
            intermediate_values=trial.intermediate_values,
            metrics=trial.user_attrs.get("metrics", {}),
            worker_id=worker_id or trial.user_attrs.get("worker_id"),
            retry_of=history[-1] if history else None,
            datetime_start=trial.datetime_start.isoformat() if trial.datetime_start else None,
            datetime_complete=(
                trial.datetime_complete.isoformat() if trial.datetime_complete else None
            ),
            duration_s=duration,
        )

    def set_state(self, name: str, state: StudyState) -> StudyInfo:
        """stop: no new trials, running ones finish. cancel: running ones are told to stop."""
        with self.db.session() as session:
            row = self._row(session, name)
            if row.state in ("running", "stopped") or (
                row.state == state and state in ("stopped", "cancelled")
            ):
                row.state = state
            elif row.state != state:
                raise StudyNotRunning(f"study {name!r} is {row.state}; it cannot be {state}")
        return self.get_study(name)

    def delete_study(self, name: str) -> None:
        with self.db.session() as session:
            row = self._row(session, name)
            study_id = row.study_id
            session.delete(row)
            session.query(LeaseRow).filter(LeaseRow.study_id == study_id).delete()
        with self._guard:
            self._loaded.pop(study_id, None)
        self.cache.delete_study(study_id)  # through the cache, which forgets the study's trials

    def enqueue(self, name: str, param_sets: list[dict[str, Any]]) -> int:
        """Queue known configurations; each is checked against the study's space first.

        Raises ``InvalidSpec`` naming ``params[i].<name>``; nothing is queued if any set is bad.
        """
        with self.db.session() as session:
            row = self._row(session, name)
        loaded = self._load(row.study_id)
        _check_param_sets(loaded.spec, loaded.space, param_sets)
        with self._study_lock(row.study_id):
            for params in param_sets:
                loaded.study.enqueue_trial(params, user_attrs={"enqueued": True})
        return len(param_sets)

    # --- budget -------------------------------------------------------------------------------

    @staticmethod
    def _tally(trials: Sequence[FrozenTrial]) -> tuple[int, int, int, int]:
        """(finished-or-running toward the budget, running, waiting, final failures).

        A failed trial that was retried does not count: its retry stands in for it.
        """
        retried = {n for t in trials for n in (t.system_attrs.get("retry_history") or [])}
        running = waiting = done = final_failures = 0
        for trial in trials:
            if trial.state == TrialState.RUNNING:
                running += 1
            elif trial.state == TrialState.WAITING:
                waiting += 1
            elif trial.state in (TrialState.COMPLETE, TrialState.PRUNED):
                done += 1
            elif trial.state == TrialState.FAIL and trial.number not in retried:
                final_failures += 1
        return done + running + final_failures, running, waiting, final_failures

    def _effective_state(
        self, row: StudyRow, trials: Sequence[FrozenTrial], spec: StudySpec
    ) -> str:
        if row.state != "running":
            return row.state
        counted, running, _waiting, failures = self._tally(trials)
        if failures >= spec.budget.max_failed:
            return "failed"
        if counted >= spec.budget.n_trials and running == 0:
            return "completed"
        return "running"

    # --- the worker protocol ---------------------------------------------------------------

    def lease(self, worker_id: str, wait_s: float = 0.0) -> Lease | None:
        """Hand a trial to a worker, long-polling up to ``wait_s`` seconds; None if no work.

        A worker that comes back with the same id gets its own running trial back.
        """
        deadline = time.monotonic() + wait_s
        while True:
            lease = self._own_running_trial(worker_id) or self._try_lease(worker_id)
            if lease is not None:
                return lease
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            time.sleep(min(self.settings.long_poll_step_s, remaining))

    def _own_running_trial(self, worker_id: str) -> Lease | None:
        with self.db.session() as session:
            rows = list(
                session.scalars(
                    select(LeaseRow).where(
                        LeaseRow.worker_id == worker_id, LeaseRow.outcome.is_(None)
                    )
                )
            )
        for row in rows:
            try:
                trial = self.storage.get_trial(row.trial_id)
            except KeyError:
                continue
            if trial.state == TrialState.RUNNING and self._stop_reason(row.study_id) is None:
                self.storage.record_heartbeat(row.trial_id)
                loaded = self._load(row.study_id)
                config = trial.user_attrs.get("config") or resolve_config(loaded.spec, trial.params)
                return self._lease_answer(
                    loaded, row.trial_id, trial.number, row.token, config, trial.params
                )
        return None

    def _try_lease(self, worker_id: str) -> Lease | None:
        with self.db.session() as session:
            # Fairness: the running study served longest ago goes first.
            candidates = list(
                session.execute(
                    select(StudyRow.study_id)
                    .where(StudyRow.state == "running")
                    .order_by(StudyRow.last_leased_at.asc().nulls_first(), StudyRow.study_id)
                ).scalars()
            )
        for study_id in candidates:
            lease = self._lease_from(study_id, worker_id)
            if lease is not None:
                return lease
        return None

    def _lease_from(self, study_id: int, worker_id: str) -> Lease | None:
        loaded = self._load(study_id)
        budget = loaded.spec.budget
        with self._study_lock(study_id) as session:
            row = session.get(StudyRow, study_id)
            if row is None or row.state != "running":
                return None
            if (
                budget.timeout_s is not None
                and (_now() - _aware(row.created_at)).total_seconds() > budget.timeout_s
            ):
                row.state = "stopped"
                log.info("study %s reached its timeout; no new trials", row.name)
                return None
            # Complete under the lock: every trial of a study is created under it (leases,
            # enqueues, retries), so no trial can appear behind the cache's back.
            trials = self.cache.get_all_trials(study_id, deepcopy=False)
            self._remember_snapshot(loaded, trials)
            counted, running, _waiting, failures = self._tally(trials)
            if failures >= budget.max_failed or counted >= budget.n_trials:
                return None
            if running >= min(budget.max_concurrent, row.max_concurrent):
                return None
            # Sampled under the lock, so the sampler sees every trial leased before this one
            # (constant liar). Sampling ahead of the lock was measured slower in one process:
            # the sampling threads held the GIL while the lock holder waited on the database.
            sample = self._sample(loaded, trials)
            if sample.config is None:
                reason = {"fail_reason": sample.failure}
                _, number = self._write_leased_trial(study_id, sample, reason)
                loaded.study.tell(number, state=TrialState.FAIL)
                log.warning("trial %d of %s has an %s", number, row.name, sample.failure)
                return None
            attrs = {"worker_id": worker_id, "config": sample.config}
            trial_id, number = self._write_leased_trial(study_id, sample, attrs)
        # The trial now counts toward the budget; the rest needs no lock (and the lock's own
        # transaction wrote nothing, so releasing it waits for no disk flush). A trial without
        # a heartbeat is never reaped, so a crash before the beat leaves it RUNNING — as before.
        self.storage.record_heartbeat(trial_id)
        token = secrets.token_urlsafe(24)
        with self.db.session() as session:
            session.add(
                LeaseRow(
                    trial_id=trial_id,
                    study_id=study_id,
                    trial_number=number,
                    token=token,
                    worker_id=worker_id,
                )
            )
            session.execute(  # fairness: the study served longest ago goes first
                update(StudyRow).where(StudyRow.study_id == study_id).values(last_leased_at=_now())
            )
        pending = sample.view.pending
        if pending is not None:  # what was just written is the running trial as it stands
            leased = copy.deepcopy(pending)
            leased._trial_id, leased.number = trial_id, number
            self._remember_running(trial_id, _RunningTrial(leased, beat_at=time.monotonic()))
        log.info(
            "leased trial %d of %s to %s",
            number,
            row.name,
            worker_id,
            extra=trial_fields(
                "lease_granted",
                study=row.name,
                study_id=study_id,
                trial_id=trial_id,
                trial_number=number,
                worker_id=worker_id,
            ),
        )
        return self._lease_answer(
            loaded, trial_id, number, token, sample.config, sample.trial.params
        )

    def _sample(self, loaded: _Loaded, trials: list[FrozenTrial]) -> _Sample:
        """Ask the study's sampler for a trial over ``trials``; a WAITING trial is popped
        (through the real storage) if there is one, else a new one stays pending in memory."""
        view = StudyView(
            self.cache, loaded.study._study_id, loaded.spec.name, loaded.study.directions, trials
        )
        trial = view.study(loaded.study.sampler, loaded.study.pruner).ask()
        try:
            params = suggest(trial, loaded.spec, loaded.space)
            return _Sample(view, trial, resolve_config(loaded.spec, params))
        except InvalidSpec as error:
            return _Sample(view, trial, None, f"invalid config: {error}")

    def _write_leased_trial(
        self, study_id: int, sample: _Sample, attrs: dict[str, Any]
    ) -> tuple[int, int]:
        """Write the sampled trial with ``attrs`` as user attributes; returns (id, number).

        A new trial is written whole — parameters, the sampler's system attributes and
        ``attrs`` — in one transaction. A popped WAITING trial already exists: only ``attrs``
        are written.
        """
        pending, trial = sample.view.pending, sample.trial
        if pending is None:
            for key, value in attrs.items():
                self.storage.set_trial_user_attr(trial._trial_id, key, value)
            return trial._trial_id, trial.number
        pending.user_attrs.update(attrs)
        trial_id = self.cache.create_new_trial(study_id, template_trial=pending)
        # Optuna numbers a trial by counting the study's earlier trials; under the study lock
        # that is the snapshot's length, which the cache (filled by create_new_trial) confirms.
        number = pending.number
        try:
            confirmed = self.cache.get_trial_id_from_study_id_trial_number(study_id, number)
        except KeyError:
            confirmed = None
        if confirmed != trial_id:  # a trial was made outside the service: ask the database
            number = self.storage.get_trial(trial_id).number
        return trial_id, number

    def _lease_answer(
        self,
        loaded: _Loaded,
        trial_id: int,
        number: int,
        token: str,
        config: dict[str, Any],
        params: Mapping[str, Any],
    ) -> Lease:
        single = len(loaded.spec.objectives) == 1
        return Lease(
            trial_id=trial_id,
            trial_number=number,
            study=loaded.spec.name,
            lease_token=token,
            config=config,
            params=dict(params),
            objective_metrics=loaded.spec.metric_names,
            report_metric=loaded.spec.metric_names[0] if single else None,
            heartbeat_interval_s=self.settings.heartbeat_interval_s,
            lease_timeout_s=self.settings.lease_timeout_s,
        )

    def _check_lease(self, session: Session, trial_id: int, token: str) -> LeaseRow:
        row = session.get(LeaseRow, trial_id)
        if row is None:
            raise TrialNotFound(trial_id)
        if not secrets.compare_digest(row.token, token):
            raise LeaseMismatch(f"the lease token does not match trial {trial_id}'s lease")
        return row

    def _lease_and_study_state(self, trial_id: int, token: str) -> tuple[LeaseRow, str | None]:
        """The lease (token checked) and its study's state (None: deleted), in one query."""
        with self.db.session() as session:
            found = session.execute(
                select(LeaseRow, StudyRow.state)
                .outerjoin(StudyRow, StudyRow.study_id == LeaseRow.study_id)
                .where(LeaseRow.trial_id == trial_id)
            ).first()
        if found is None:
            raise TrialNotFound(trial_id)
        row, state = found
        if not secrets.compare_digest(row.token, token):
            raise LeaseMismatch(f"the lease token does not match trial {trial_id}'s lease")
        return row, state

    @staticmethod
    def _not_running(row: LeaseRow, state: TrialState | str) -> TrialReaped:
        name = state.name.lower() if isinstance(state, TrialState) else state
        if name == "fail" and row.outcome is None:
            return TrialReaped(
                f"trial {row.trial_number} is fail: its lease expired and it was failed "
                "(a retry was queued if retries remained)"
            )
        return TrialReaped(f"trial {row.trial_number} was already finished ({name})")

    def _running_trial(self, row: LeaseRow) -> FrozenTrial:
        """The trial behind an open lease, which must still be running.

        Raises ``TrialReaped`` when the lease was finished through the service or the trial is
        no longer running (the reaper failed it).
        """
        if row.outcome is not None:
            raise self._not_running(row, row.outcome)
        trial = self.storage.get_trial(row.trial_id)
        if trial.state != TrialState.RUNNING:
            self._forget_running(row.trial_id)
            raise self._not_running(row, trial.state)
        return trial

    def _finished_meanwhile(self, row: LeaseRow, error: Exception) -> TrialReaped:
        """Optuna refused a write because the trial finished after we checked it."""
        self._forget_running(row.trial_id)
        state = self.storage.get_trial(row.trial_id).state
        reaped = self._not_running(row, state)
        reaped.__cause__ = error
        return reaped

    @staticmethod
    def _reason_to_stop(study_state: str | None) -> str | None:
        if study_state is None:
            return "study deleted"
        return "study cancelled" if study_state == "cancelled" else None

    def _stop_reason(self, study_id: int) -> str | None:
        with self.db.session() as session:
            row = session.get(StudyRow, study_id)
        return self._reason_to_stop(row.state if row is not None else None)

    # --- what this process remembers of running trials ------------------------------------

    def _remember_running(self, trial_id: int, running: _RunningTrial) -> None:
        with self._guard:
            self._running[trial_id] = running
            self._running.move_to_end(trial_id)
            while len(self._running) > RUNNING_CACHE_SIZE:
                self._running.popitem(last=False)

    def _forget_running(self, trial_id: int) -> None:
        with self._guard:
            self._running.pop(trial_id, None)

    def _current_running(self, row: LeaseRow, epoch: int) -> _RunningTrial:
        """The running trial for a report of ``epoch``: remembered if this process handled the
        report of ``epoch - 1`` (see ``_RunningTrial``), else read. Raises ``TrialReaped``."""
        with self._guard:
            known = self._running.get(row.trial_id)
        if known is not None and known.last_epoch is not None and epoch == known.last_epoch + 1:
            if row.outcome is not None:
                raise self._not_running(row, row.outcome)
            return known
        trial = self._running_trial(row)
        running = _RunningTrial(trial, beat_at=known.beat_at if known else float("-inf"))
        self._remember_running(row.trial_id, running)
        return running

    def _beat(self, trial_id: int, running: _RunningTrial | None, due_only: bool) -> None:
        """Record a heartbeat; with ``due_only``, only if this process has not recorded one in
        the last half heartbeat interval (a lease outlives a whole interval without a beat)."""
        now = time.monotonic()
        recent = (
            running is not None and now - running.beat_at < self.settings.heartbeat_interval_s / 2
        )
        if due_only and recent:
            return
        self.storage.record_heartbeat(trial_id)
        if running is not None:
            running.beat_at = now

    def _remember_snapshot(self, loaded: _Loaded, trials: list[FrozenTrial]) -> None:
        loaded.snapshot, loaded.snapshot_at, loaded.exact = trials, time.monotonic(), True

    def _snapshot_changed(self, loaded: _Loaded) -> None:
        """This process just changed a trial's state: the snapshot no longer tells it."""
        loaded.exact = False

    def _pruning_snapshot(self, loaded: _Loaded) -> list[FrozenTrial]:
        """The study's trials for the pruner: the last snapshot while it is younger than
        ``SNAPSHOT_MAX_AGE_S`` and this process changed no trial since; else a fresh read."""
        snapshot = loaded.snapshot
        age = time.monotonic() - loaded.snapshot_at
        if snapshot is None or not loaded.exact or age > SNAPSHOT_MAX_AGE_S:
            snapshot = self.cache.get_all_trials(loaded.study._study_id, deepcopy=False)
            self._remember_snapshot(loaded, snapshot)
        return snapshot

    def _view(
        self, loaded: _Loaded, trials: list[FrozenTrial], current: FrozenTrial
    ) -> optuna.Study:
        """The study as Optuna's pruner and ``tell`` see it: ``trials`` with ``current`` in it."""
        view = StudyView(
            self.cache,
            loaded.study._study_id,
            loaded.spec.name,
            loaded.study.directions,
            trials,
            current=current,
        )
        return view.study(loaded.study.sampler, loaded.study.pruner)

    # --- heartbeat and report ---------------------------------------------------------------

    def heartbeat(self, trial_id: int, token: str) -> HeartbeatAnswer:
        row, study_state = self._lease_and_study_state(trial_id, token)
        self._running_trial(row)  # a heartbeat is rare enough to re-read the trial's state
        with self._guard:
            known = self._running.get(trial_id)
        self._beat(trial_id, known, due_only=False)
        reason = self._reason_to_stop(study_state)
        if reason is not None:
            return HeartbeatAnswer(action="stop", reason=reason)
        return HeartbeatAnswer(action="continue")

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
        if value is not None and not math.isfinite(value):
            raise InvalidSpec("value", f"must be a finite number (got {value})")
        row, study_state = self._lease_and_study_state(trial_id, token)
        loaded = self._load(row.study_id)
        running = self._current_running(row, epoch)
        try:
            # Optuna refuses writes to a finished trial: this is the running check.
            self.storage.set_trial_user_attr(
                trial_id, "metrics", _finite_metrics({"epoch": epoch, **metrics})
            )
            self._beat(trial_id, running, due_only=True)
            reason = self._reason_to_stop(study_state)
            if reason is not None:
                running.last_epoch = epoch
                return ReportAnswer(action="stop", reason=reason)
            if value is None or len(loaded.spec.objectives) != 1:
                running.last_epoch = epoch
                return ReportAnswer(action="continue")
            if epoch not in running.trial.intermediate_values:
                self.storage.set_trial_intermediate_value(trial_id, epoch, value)
                running.trial.intermediate_values[epoch] = value
        except UpdateFinishedTrialError as error:
            raise self._finished_meanwhile(row, error) from error
        running.last_epoch = epoch
        # Trial.should_prune() without re-reading anything: the pruner gets the trial as just
        # written and the study's trials from the snapshot.
        study = self._view(loaded, self._pruning_snapshot(loaded), running.trial)
        if study.pruner.prune(study, copy.deepcopy(running.trial)):
            return ReportAnswer(action="prune", reason=f"pruned at epoch {epoch}")
        return ReportAnswer(action="continue")

    # --- complete and fail ------------------------------------------------------------------

    def _claim(self, row: LeaseRow, outcome: str, fingerprint: str) -> dict[str, Any] | None:
        """Claim the right to finish ``row``'s trial with this result (a compare-and-set on the
        lease row, atomic across threads and replicas). Returns None when claimed — also when
        the same result was claimed before but not finished (a retry after a crash) — or the
        answer recorded for this same result. Raises ``ResultConflict`` for another result.
        """
        pending = CLAIMED[outcome]
        with self.db.session() as session:
            claimed = session.execute(
                update(LeaseRow)
                .where(
                    LeaseRow.trial_id == row.trial_id,
                    or_(
                        LeaseRow.outcome.is_(None),
                        and_(LeaseRow.outcome == pending, LeaseRow.fingerprint == fingerprint),
                    ),
                )
                .values(outcome=pending, fingerprint=fingerprint)
            )
            if claimed.rowcount == 1:  # type: ignore[attr-defined]
                return None
            current = session.get(LeaseRow, row.trial_id, populate_existing=True)
        if current is None:
            raise TrialNotFound(row.trial_id)
        return self._previous_answer(current, outcome, fingerprint)

    @staticmethod
    def _previous_answer(
        row: LeaseRow, outcome: str, fingerprint: str | None
    ) -> dict[str, Any] | None:
        """The answer recorded for this result (``fingerprint`` None: any result with this
        outcome), None if the trial is still open, or ``ResultConflict``."""
        if row.outcome is None:
            return None
        if row.outcome == outcome and fingerprint in (None, row.fingerprint):
            return row.answer
        if row.outcome == CLAIMED[outcome] and fingerprint in (None, row.fingerprint):
            return None  # claimed with this result but not finished: finish it again
        raise ResultConflict(
            f"trial {row.trial_number} was already finished ({row.outcome}) with a different "
            "result; the first result stands"
        )

    def _release(self, row: LeaseRow, outcome: str, fingerprint: str) -> None:
        """Undo our claim when the trial turned out not to be running (the reaper failed it),
        so later calls get ``TrialReaped`` rather than a conflict with a result never told."""
        with self.db.session() as session:
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
        with self.db.session() as session:
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
        bad = [v for v in values if not math.isfinite(v)]
        if bad:
            raise InvalidSpec("values", f"must be finite numbers (got {bad})")
        fingerprint = _fingerprint(values)
        with self.db.session() as session:
            row = self._check_lease(session, trial_id, token)
        loaded = self._load(row.study_id)
        if len(values) != len(loaded.spec.objectives):
            raise InvalidSpec(
                "values",
                f"this study has {len(loaded.spec.objectives)} objective(s) "
                f"({', '.join(loaded.spec.metric_names)}); got {len(values)} value(s)",
            )
        previous = self._previous_answer(row, "complete", fingerprint)
        if previous is None:
            previous = self._claim(row, "complete", fingerprint)
        if previous is not None:
            return CompleteAnswer.model_validate(previous)
        try:
            self.storage.set_trial_user_attr(trial_id, "metrics", _finite_metrics(dict(metrics)))
            if output_tail:  # the program's last output (`hpo agent`)
                self.storage.set_trial_user_attr(trial_id, "output_tail", output_tail)
            self._tell(loaded, row, list(values))
        except (UpdateFinishedTrialError, ValueError) as error:
            # Finished before us: by an earlier try of this same result whose answer was not
            # recorded, or by the reaper.
            trial = self.storage.get_trial(trial_id)
            if trial.state == TrialState.RUNNING:
                raise
            if trial.state != TrialState.COMPLETE or trial.values is None:
                self._release(row, "complete", fingerprint)
                raise self._not_running(row, trial.state) from error
            if _fingerprint(trial.values) != fingerprint:
                raise ResultConflict(
                    f"trial {trial.number} already completed with values {trial.values}"
                ) from error
        finally:
            self._forget_running(trial_id)
            self._snapshot_changed(loaded)
        answer = CompleteAnswer(
            trial_id=trial_id, trial_number=row.trial_number, state="complete", values=list(values)
        )
        self._record_answer(trial_id, "complete", answer.model_dump(mode="json"))
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

    def _tell(self, loaded: _Loaded, row: LeaseRow, values: list[float]) -> None:
        """``study.tell`` — without re-reading the trial when this process holds it (the state
        change itself is still a compare-and-set in Optuna's storage)."""
        with self._guard:
            known = self._running.get(row.trial_id)
        if known is None:
            loaded.study.tell(row.trial_number, values)
            return
        study = self._view(loaded, loaded.snapshot or [], known.trial)
        study.tell(row.trial_number, values)

    def fail(
        self,
        trial_id: int,
        token: str,
        reason: str,
        retryable: bool,
        pruned: bool = False,
        *,
        output_tail: str | None = None,
    ) -> FailAnswer:
        """A worker gives a trial up: pruned (told PRUNED), or failed and maybe retried."""
        with self.db.session() as session:
            row = self._check_lease(session, trial_id, token)
        loaded = self._load(row.study_id)
        state = "pruned" if pruned else "fail"
        # A repeated fail gets the first answer, whichever state it asked for.
        previous = self._previous_answer(row, "fail", None)
        if previous is None:
            previous = self._claim(row, "fail", state)
        if previous is not None:
            return FailAnswer.model_validate(previous)
        retry_number: int | None = None
        try:
            with self._study_lock(row.study_id) as session:  # a retry creates a trial
                trial = self.storage.get_trial(trial_id)
                if trial.state != TrialState.RUNNING:
                    self._release(row, "fail", state)
                    raise self._not_running(row, trial.state)
                if output_tail:  # the program's last output (`hpo agent`)
                    self.storage.set_trial_user_attr(trial_id, "output_tail", output_tail)
                if pruned:
                    loaded.study.tell(row.trial_number, state=TrialState.PRUNED)
                else:
                    self.storage.set_trial_user_attr(trial_id, "fail_reason", reason[:2000])
                    loaded.study.tell(row.trial_number, state=TrialState.FAIL)
                    study_row = session.get(StudyRow, row.study_id)
                    if retryable and study_row is not None and study_row.state == "running":
                        retry_number = self._requeue(
                            loaded, trial
                        )  # read above; what it copies is unchanged
        finally:
            self._forget_running(trial_id)
            self._snapshot_changed(loaded)
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

    # --- reaping and retries ----------------------------------------------------------------

    def _requeue(self, loaded: _Loaded, failed: FrozenTrial) -> int | None:
        """Queue a WAITING copy of a failed trial with the same parameters, within the retry
        bound; the same attributes as Optuna's ``RetryHeartbeatStaleTrialCallback``. Returns the
        new trial's number, or None when retries are exhausted.
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
            self.storage.get_all_trials(
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

    def _on_stale_trial(self, study: optuna.Study, trial: FrozenTrial) -> None:
        """Optuna's stale-trial callback: the lease expired, so retry if the study still runs."""
        study_id = study._study_id
        with self._guard:
            self.reaped_leases += 1
        self._forget_running(trial._trial_id)
        with self.db.session() as session:
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
            self._requeue(self._load(study_id), trial)

    def reap(self) -> int:
        """Fail every trial whose lease expired (by the database clock) and queue retries.

        Returns how many studies were checked. Safe to run in several replicas at once:
        Optuna fails a trial with a compare-and-set, so only one replica retries it.
        """
        with self.db.session() as session:
            study_ids = list(
                session.scalars(select(StudyRow.study_id).where(StudyRow.state.in_(ACTIVE_STATES)))
            )
        for study_id in study_ids:
            loaded = self._load(study_id)
            with self._study_lock(study_id), warnings.catch_warnings():
                warnings.simplefilter("ignore", ExperimentalWarning)
                optuna.storages.fail_stale_trials(loaded.study)
            self._snapshot_changed(loaded)
        return len(study_ids)
