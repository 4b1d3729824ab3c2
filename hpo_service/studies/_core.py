"""The core every job of the study service shares: the storage, the study lock, the studies
this process has loaded, and what it remembers of running trials and of each study's trials.

Nothing here changes a trial's state; the modules beside it (registry, leasing, reporting,
finishing, reaping) do, each through one ``StudyCore``.
"""

from __future__ import annotations

import threading
import time
import zlib
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import optuna
from optuna.artifacts._protocol import ArtifactStore
from optuna.distributions import BaseDistribution
from optuna.exceptions import UpdateFinishedTrialError
from optuna.trial import FrozenTrial
from sqlalchemy import ColumnElement, Float, cast, extract, func, select, text, update
from sqlalchemy.orm import Session

from hpo_service import lr_range
from hpo_service.artifacts import build_artifact_store
from hpo_service.config import Settings
from hpo_service.db import Database, prepare_service_schema
from hpo_service.errors import StudyNotFound
from hpo_service.grid import study_grid
from hpo_service.models import LeaseRow, StudyRow
from hpo_service.optimizers import build_pruner, build_sampler, pruning_primary
from hpo_service.schemas import StudySpec
from hpo_service.search_space import Param, check_spec
from hpo_service.studies import _optuna_rows
from hpo_service.studies._budget import TallyMemo
from hpo_service.study_view import StudyView

SPEC_ATTR = "spec"
#: How old (s) the study's trials may be when the pruner compares against finished trials. Only
#: trials that other replicas finished can be missing: this process's own leases refresh the
#: snapshot and its own results force a fresh read.
SNAPSHOT_MAX_AGE_S = 1.0
#: ... but refreshed no more often than this many times its own last read took (a read of a
#: study's running trials takes ~1 s on a loaded 2-core host at 64 running trials: refreshing it
#: every second made the snapshot the report path's largest cost, issue 12).
SNAPSHOT_READ_SHARE = 10.0
#: Running trials this process remembers between reports (least recently used dropped first).
RUNNING_CACHE_SIZE = 4096


@dataclass
class LoadedStudy:
    """A study as this process drives it: Optuna's handle, its spec and its space."""

    study: optuna.Study
    spec: StudySpec
    space: list[Param]
    # The study's trials as last read (monotonic time), for the pruner; not ``exact`` once this
    # process changed a trial's state after reading them.
    snapshot: list[FrozenTrial] | None = None
    snapshot_at: float = 0.0
    exact: bool = False
    # An LR range test's outcome (``hpo_service.lr_range``) as of loading: the space holds its
    # ranges once "applied"; None while the test is pending (or off).
    lr_range_test: dict[str, Any] | None = None
    snapshot_read_s: float = 0.0  # how long the last read of the snapshot took
    # Per parameter, its first distribution in the study (what a new one is checked against,
    # ``_optuna_rows.first_distributions``); filled under the study lock.
    distributions: dict[str, BaseDistribution] = field(default_factory=dict)
    # The budget's count of the study's leading finished trials (``_budget.TallyMemo``).
    tally: TallyMemo = field(default_factory=TallyMemo)


@dataclass
class RunningTrial:
    """A running trial as this process last wrote or read it.

    Workers report epochs in order and wait for each answer, so when this process handled the
    report of epoch e - 1 and now gets epoch e, no other replica can have written the trial in
    between: ``trial`` is current and need not be re-read.
    """

    trial: FrozenTrial
    last_epoch: int | None = None  # the epoch of the last report this process handled
    beat_at: float = field(default=float("-inf"))  # monotonic time of our last heartbeat write


def now() -> datetime:
    return datetime.now(UTC)


def aware(moment: datetime) -> datetime:
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


class StudyCore:
    """The storage, the per-study lock and this process's memory of studies. Thread-safe."""

    def __init__(
        self,
        settings: Settings,
        storage: optuna.storages.RDBStorage,
        artifacts: ArtifactStore | None = None,
    ) -> None:
        self.settings = settings
        self.storage = storage
        # Optuna's own cache over the storage, shared by every study of this process: finished
        # trials are read once, later reads fetch only running and new trials.
        self.cache = optuna.storages.get_storage(self.storage)
        # Checkpoints and plots (issue 14): written only by this server, never by workers.
        self.artifacts = artifacts if artifacts is not None else build_artifact_store(settings)
        self.db = Database(self.storage.engine)
        prepare_service_schema(self.storage.engine)  # creates on an empty DB, never migrates
        self.is_postgres = self.storage.engine.dialect.name == "postgresql"
        # New trials and reports written row by row through Optuna's models (issue 12), on the
        # Optuna series and backends that module was checked against.
        self.fast_rows = self.storage.engine.dialect.name in ("sqlite", "postgresql") and (
            _optuna_rows.warn_if_unsupported()
        )
        self.guard = threading.Lock()
        self._locks: dict[int, threading.RLock] = {}
        self._loaded: dict[int, LoadedStudy] = {}
        self._running: OrderedDict[int, RunningTrial] = OrderedDict()

    # --- locking and loading ----------------------------------------------------------------

    @contextmanager
    def study_lock(self, study_id: int) -> Iterator[Session]:
        """Serialise the trial-creating operations of one study (lease, enqueue, fail with its
        retry, reap) across threads and server replicas; ``complete`` is claimed by
        compare-and-set instead (``_finishing.Finishing.claim``).

        Yields a session whose transaction holds the lock; commit releases it. On SQLite only
        the process lock applies (one writer process) and our own writes must come after
        Optuna's in the same critical section, or the two connections would deadlock.
        """
        with self.guard:
            lock = self._locks.setdefault(study_id, threading.RLock())
        with lock, self.db.session() as session:
            if self.is_postgres:
                key = zlib.crc32(f"hpo-study-{study_id}".encode())
                session.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": key})
            yield session

    def load(self, study_id: int) -> LoadedStudy:
        loaded = self._loaded.get(study_id)
        if loaded is not None:
            return loaded
        name = self.storage.get_study_name_from_id(study_id)
        attrs = self.storage.get_study_user_attrs(study_id)
        spec = StudySpec.model_validate(attrs[SPEC_ATTR])
        lr_test = attrs.get(lr_range.STUDY_ATTR)
        space = check_spec(lr_range.with_ranges(spec, lr_test))
        study = optuna.load_study(
            study_name=name,
            storage=self.cache,
            sampler=build_sampler(spec.sampler, study_grid(spec, space)),
            pruner=build_pruner(spec.pruner, spec.epochs, pruning_primary(spec)),
        )
        loaded = LoadedStudy(study=study, spec=spec, space=space, lr_range_test=lr_test)
        with self.guard:
            self._loaded.setdefault(study_id, loaded)
            return self._loaded[study_id]

    def remember_loaded(self, study_id: int, loaded: LoadedStudy) -> None:
        with self.guard:
            self._loaded[study_id] = loaded

    def forget_loaded(self, study_id: int) -> None:
        with self.guard:
            self._loaded.pop(study_id, None)

    def database_clock_s(self) -> ColumnElement[float]:
        """Now by the database's clock, in seconds since the epoch, to the millisecond or better
        (SQLite's ``CURRENT_TIMESTAMP``, which Optuna's heartbeats use, has whole seconds only).
        Every lease age is measured by this one clock, so host clock skew is harmless."""
        if self.is_postgres:
            return cast(extract("epoch", func.clock_timestamp()), Float)
        return (func.julianday("now") - 2440587.5) * 86400.0

    def record_beat(self, trial_id: int) -> None:
        """The lease of ``trial_id`` is alive now (one statement). A lease already reaped or
        finished stays so."""
        self.record_beats([trial_id])

    def record_beats(self, trial_ids: Sequence[int]) -> None:
        """The leases of ``trial_ids`` are alive now, in one statement."""
        if not trial_ids:
            return
        with self.db.session() as session:
            session.execute(
                update(LeaseRow)
                .where(LeaseRow.trial_id.in_(trial_ids), LeaseRow.outcome.is_(None))
                .values(beat_at_s=self.database_clock_s())
                .execution_options(synchronize_session=False)
            )

    def write_reports(
        self, reports: Sequence[tuple[int, dict[str, Any] | None, tuple[int, float] | None]]
    ) -> dict[int, UpdateFinishedTrialError]:
        """Reports' writes in one transaction: per ``(trial id, metrics, intermediate)`` the
        ``metrics`` user attribute (if given) and the intermediate value ``(step, value)`` (if
        given). Returns, by trial id, Optuna's ``UpdateFinishedTrialError`` for each trial no
        longer running (nothing of it written); the others are written.

        Optuna's public API commits each write on its own and reads the trial for each (a
        transaction and five statements per report, the report path's largest cost, issue
        12): the rows go through ``_optuna_rows.write_reports`` instead, three statements
        for the whole batch. An Optuna other than the series that module was checked against
        gets the public calls. A conflicting concurrent write (``IntegrityError``) fails the
        whole call, never silently a part.
        """
        if self.fast_rows:
            return _optuna_rows.write_reports(self.storage, reports)
        refused: dict[int, UpdateFinishedTrialError] = {}
        for trial_id, metrics, intermediate in reports:
            try:
                if metrics is not None:
                    self.storage.set_trial_user_attr(trial_id, "metrics", metrics)
                if intermediate is not None:
                    self.storage.set_trial_intermediate_value(trial_id, *intermediate)
            except UpdateFinishedTrialError as error:
                refused[trial_id] = error
        return refused

    @staticmethod
    def row(session: Session, name: str) -> StudyRow:
        """The study's control row. Raises ``StudyNotFound``."""
        row = session.scalar(select(StudyRow).where(StudyRow.name == name))
        if row is None:
            raise StudyNotFound(name)
        return row

    # --- what this process remembers of running trials ------------------------------------

    def remember_running(self, trial_id: int, running: RunningTrial) -> None:
        with self.guard:
            self._running[trial_id] = running
            self._running.move_to_end(trial_id)
            while len(self._running) > RUNNING_CACHE_SIZE:
                self._running.popitem(last=False)

    def forget_running(self, trial_id: int) -> None:
        with self.guard:
            self._running.pop(trial_id, None)

    def known_running(self, trial_id: int) -> RunningTrial | None:
        with self.guard:
            return self._running.get(trial_id)

    # --- the study's trials as the pruner and tell see them --------------------------------

    @staticmethod
    def remember_snapshot(loaded: LoadedStudy, trials: list[FrozenTrial]) -> None:
        loaded.snapshot, loaded.snapshot_at, loaded.exact = trials, time.monotonic(), True

    @staticmethod
    def snapshot_changed(loaded: LoadedStudy) -> None:
        """This process just changed a trial's state: the snapshot no longer tells it."""
        loaded.exact = False

    def pruning_snapshot(self, loaded: LoadedStudy) -> list[FrozenTrial]:
        """The study's trials for the pruner: the last snapshot unless this process changed a
        trial's state since, or — only where another writer may have written (PostgreSQL:
        several replicas) — it is older than ``SNAPSHOT_MAX_AGE_S`` and than
        ``SNAPSHOT_READ_SHARE`` times its own last read; else a fresh read.

        SQLite has one writer, this process (ARCHITECTURE: "SQLite is single-writer"), so its
        snapshot is never stale by age: every trial is created under the study lock, which
        refreshes it, and every state change here marks it inexact. The running trial being
        reported is passed to the pruner as written (``view``), not from the snapshot.
        """
        snapshot = loaded.snapshot
        stale = False
        if self.is_postgres:
            age = time.monotonic() - loaded.snapshot_at
            stale = age > max(SNAPSHOT_MAX_AGE_S, SNAPSHOT_READ_SHARE * loaded.snapshot_read_s)
        if snapshot is None or not loaded.exact or stale:
            started = time.monotonic()
            snapshot = self.cache.get_all_trials(loaded.study._study_id, deepcopy=False)
            self.remember_snapshot(loaded, snapshot)
            loaded.snapshot_read_s = time.monotonic() - started
        return snapshot

    def view(
        self, loaded: LoadedStudy, trials: list[FrozenTrial], current: FrozenTrial
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
