"""Recurring sweeps: when to fire, exactly once, and how to warm-start.

Each ``tick(now)`` looks at every enabled schedule:

1. **Take over stale claims.** A firing claimed more than ``HPO_SCHEDULE_CLAIM_TIMEOUT_S`` ago and
   never finished (its process died) is claimed again with a compare-and-set ``UPDATE`` and
   finished: study creation is idempotent by name, so nothing is created twice.
2. **Find what is due.** The latest fire time at or before ``now`` and after the schedule's
   anchor (its last fire time, or when it was created, resumed or re-timed). Older fire times
   since the anchor were missed (downtime): they are logged and recorded as ``skipped``, never
   run. The latest runs — as a ``catch_up`` if it coalesced misses — when it is at most the grace
   period late; otherwise it is skipped too.
3. **Claim it exactly once.** ``INSERT`` a firing row keyed by (schedule, wall-clock fire time).
   The unique constraint decides between scheduler threads, processes and server replicas on one
   database (SQLite or PostgreSQL): the insert that loses raises ``IntegrityError`` and walks
   away; only the winner creates the study.
4. **Create the study**, named ``{schedule}-{YYYY-MM-DD}`` by local date, with the previous
   run's top-k parameter sets enqueued before any worker can see it (warm start) and the
   sampler's seed kept (``fixed``) or advanced by the run index (``per_night``).

Times come from an injected clock, so tests drive a simulated clock through ``tick(now)``.
This module never imports the web framework; ``hpo serve`` runs ``run_scheduler`` in a thread and
``hpo scheduler`` runs it as a process of its own.
"""

from __future__ import annotations

import json
import logging
import threading
from datetime import datetime, timedelta
from itertools import islice
from typing import Any
from zoneinfo import ZoneInfo

from optuna.study import StudyDirection
from optuna.trial import TrialState
from sqlalchemy import func, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from hpo_service.config import Settings
from hpo_service.constraints import is_feasible
from hpo_service.errors import InvalidSpec, StudyExists
from hpo_service.fire_times import (
    FireTime,
    fire_key,
    fire_times_after,
    fires_at_most_daily,
    latest_fire_time,
    local_time,
    manual_study_name,
    parse_zone,
    study_name,
)
from hpo_service.models import FiringRow, ScheduleRow, StudyRow
from hpo_service.schedules import (
    Clock,
    aware,
    effective_grace_s,
    firing_info,
    get_schedule,
    study_spec,
    utc_now,
)
from hpo_service.schemas import FiringInfo, StudySpec, StudyTemplate
from hpo_service.search_space import check_spec, resolve_config
from hpo_service.studies import StudyService

log = logging.getLogger(__name__)
#: The detail of a fire time missed while no scheduler ran, coalesced into a later one.
COALESCED = "missed; coalesced into a later fire time"

#: Missed fire times recorded individually per tick; a longer outage is summarised in the log.
MAX_RECORDED_MISSES = 100
#: The study attribute that ties a study to the schedule and fire time that made it.
SCHEDULE_ATTR = "schedule"


class Scheduler:
    """Fires due schedules. One per process; several may run against one database."""

    def __init__(self, studies: StudyService, settings: Settings, clock: Clock = utc_now) -> None:
        self.studies = studies
        self.settings = settings
        self.db = studies.db
        self.clock = clock

    # --- the tick ---------------------------------------------------------------------------

    def tick(self, now: datetime | None = None) -> list[FiringInfo]:
        """Fire everything due at ``now`` (default: the clock). Returns the firings this call
        finished (created or failed); a schedule that errors is logged and the rest still run.
        """
        now = now or self.clock()
        with self.db.session() as session:
            ids = list(session.scalars(select(ScheduleRow.id).where(ScheduleRow.enabled)))
        done: list[FiringInfo] = []
        for schedule_id in ids:
            try:
                done += self._tick_schedule(schedule_id, now)
            except Exception:  # one broken schedule must not stop the others
                log.exception("scheduler: schedule %d failed to tick", schedule_id)
        return done

    def _tick_schedule(self, schedule_id: int, now: datetime) -> list[FiringInfo]:
        done = [
            info
            for firing_id in self._take_over_stale_claims(schedule_id, now)
            if (info := self._materialize(firing_id, now)) is not None
        ]
        with self.db.session() as session:
            row = session.get(ScheduleRow, schedule_id)
            if row is None or not row.enabled:
                return done
            name, cron, zone = row.name, row.cron, parse_zone(row.timezone)
            grace = timedelta(seconds=effective_grace_s(row, self.settings))
            anchor = self._anchor(session, row)
        latest = latest_fire_time(cron, zone, now)
        if latest is None or latest.instant <= anchor:
            return done
        missed = [
            fire
            for fire in islice(
                fire_times_after(cron, zone, anchor, until=latest.instant),
                MAX_RECORDED_MISSES + 1,
            )
            if fire.instant < latest.instant
        ]
        if missed:
            self._record_missed(schedule_id, name, zone, missed[:MAX_RECORDED_MISSES], now)
        lateness = now - latest.instant
        if lateness > grace:
            log.warning(
                "schedule %s: fire time %s was missed by %s, more than the %s grace period; "
                "not run",
                name,
                latest.local,
                lateness,
                grace,
            )
            self._skip(
                schedule_id,
                [latest],
                zone,
                f"missed by {lateness}, more than the {grace} grace period",
                now,
            )
            return done
        # Another node ticking at the same moment may have recorded the misses first (its
        # `_record_missed` moved the anchor past them): they still make this a catch-up.
        kind = "catch_up" if missed or self._coalesced_before(schedule_id, latest) else "scheduled"
        firing_id = self._claim(
            schedule_id,
            key=fire_key(latest, zone),
            kind=kind,
            fire=latest,
            study=study_name(name, latest, fires_at_most_daily(cron)),
            now=now,
        )
        if firing_id is not None:
            info = self._materialize(firing_id, now)
            if info is not None:
                done.append(info)
        return done

    @staticmethod
    def _anchor(session: Session, row: ScheduleRow) -> datetime:
        """Fire times at or before this are settled: the latest recorded scheduled fire time, or
        when the schedule was created, resumed or re-timed, whichever is later."""
        last = session.scalar(
            select(func.max(FiringRow.scheduled_for)).where(
                FiringRow.schedule_id == row.id, FiringRow.kind != "manual"
            )
        )
        since = aware(row.active_since)
        return max(since, aware(last)) if last is not None else since

    def _record_missed(
        self, schedule_id: int, name: str, zone: ZoneInfo, missed: list[FireTime], now: datetime
    ) -> None:
        more = " (and possibly more)" if len(missed) >= MAX_RECORDED_MISSES else ""
        log.warning(
            "schedule %s: %d fire time(s) missed while no scheduler ran%s, from %s to %s; "
            "not run (at most the latest one runs, as a catch-up)",
            name,
            len(missed),
            more,
            missed[0].local,
            missed[-1].local,
        )
        self._skip(schedule_id, missed, zone, COALESCED, now)

    def _coalesced_before(self, schedule_id: int, latest: FireTime) -> bool:
        """Whether fire times before ``latest`` and after the schedule's last one that ran
        were recorded as missed and coalesced into a later one (by any node)."""
        with self.db.session() as session:
            last_run = session.scalar(
                select(func.max(FiringRow.scheduled_for)).where(
                    FiringRow.schedule_id == schedule_id,
                    FiringRow.kind != "manual",
                    FiringRow.status != "skipped",
                )
            )
            query = select(FiringRow.id).where(
                FiringRow.schedule_id == schedule_id,
                FiringRow.detail == COALESCED,
                FiringRow.scheduled_for < latest.instant,
            )
            if last_run is not None:
                query = query.where(FiringRow.scheduled_for > last_run)
            return session.scalar(query.limit(1)) is not None

    def _skip(
        self, schedule_id: int, fires: list[FireTime], zone: ZoneInfo, reason: str, now: datetime
    ) -> None:
        """Record fire times as skipped; a fire time someone already recorded is left alone."""
        rows = [
            {
                "schedule_id": schedule_id,
                "fire_key": fire_key(fire, zone),
                "kind": "scheduled",
                "status": "skipped",
                "scheduled_for": fire.instant,
                "local_time": fire.local.isoformat(timespec="minutes"),
                "warm_started": 0,
                "detail": reason,
                "finished_at": now,
            }
            for fire in fires
        ]
        dialect = self.db.engine.dialect.name
        insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
        statement = insert(FiringRow).values(rows).on_conflict_do_nothing()
        with self.db.session() as session:
            session.execute(statement)

    # --- claiming: exactly once -------------------------------------------------------------

    def _claim(
        self,
        schedule_id: int,
        *,
        key: str,
        kind: str,
        fire: FireTime,
        study: str,
        now: datetime,
    ) -> int | None:
        """Insert the firing row; its id if this call won, None if another claimant did."""
        try:
            with self.db.session() as session:
                row = FiringRow(
                    schedule_id=schedule_id,
                    fire_key=key,
                    kind=kind,
                    status="claimed",
                    scheduled_for=fire.instant,
                    local_time=fire.local.isoformat(
                        timespec="seconds" if kind == "manual" else "minutes"
                    ),
                    study_name=study,
                    warm_started=0,
                    claimed_at=now,
                )
                session.add(row)
                session.flush()
                firing_id = row.id
        except IntegrityError:
            log.debug("schedule %d: %s was claimed by another scheduler", schedule_id, key)
            return None
        log.info("schedule %d: claimed %s (%s) for study %s", schedule_id, key, kind, study)
        return firing_id

    def _take_over_stale_claims(self, schedule_id: int, now: datetime) -> list[int]:
        """Claims whose owner stopped before finishing, now owned by this call (compare-and-set
        on ``claimed_at``, so of several schedulers exactly one takes each over)."""
        cutoff = now - timedelta(seconds=self.settings.schedule_claim_timeout_s)
        with self.db.session() as session:
            stale = list(
                session.execute(
                    select(FiringRow.id, FiringRow.claimed_at).where(
                        FiringRow.schedule_id == schedule_id,
                        FiringRow.status == "claimed",
                        FiringRow.claimed_at < cutoff,
                    )
                )
            )
        taken = []
        for firing_id, claimed_at in stale:
            with self.db.session() as session:
                result = session.execute(
                    update(FiringRow)
                    .where(
                        FiringRow.id == firing_id,
                        FiringRow.status == "claimed",
                        FiringRow.claimed_at == claimed_at,
                    )
                    .values(claimed_at=now)
                )
                won = getattr(result, "rowcount", 0) == 1
            if won:
                log.warning(
                    "scheduler: taking over firing %d, claimed at %s", firing_id, claimed_at
                )
                taken.append(firing_id)
        return taken

    # --- creating the run's study -----------------------------------------------------------

    def _materialize(
        self, firing_id: int, now: datetime, *, raise_errors: bool = False
    ) -> FiringInfo | None:
        """Create the claimed firing's study (idempotent by name) and mark the firing.

        A permanent problem (the name is taken by a study this schedule did not make, the
        template no longer validates) marks it ``failed`` — and is raised when ``raise_errors``.
        A database error leaves it ``claimed`` so a later tick takes it over.
        """
        with self.db.session() as session:
            firing = session.get(FiringRow, firing_id)
            schedule = session.get(ScheduleRow, firing.schedule_id) if firing else None
            if firing is None or schedule is None or firing.status != "claimed":
                return None
            assert firing.study_name is not None
            name, schedule_name = firing.study_name, schedule.name
            template = StudyTemplate.model_validate(schedule.template)
            runs_before = _count_runs_before(session, schedule.id, aware(firing.scheduled_for))
            seed = _seed(template, schedule.seed_policy, runs_before)
            top_k = schedule.warm_start_top_k
            previous = _previous_study(session, schedule.id, aware(firing.scheduled_for))
            marker = {
                "name": schedule_name,
                "fire_key": firing.fire_key,
                "kind": firing.kind,
                "run_index": runs_before,
            }
        try:
            spec = study_spec(template, name, seed)
            warm = self.warm_start_params(previous, spec, top_k) if previous else []
            created = self._create_once(spec, warm, marker)
        except (InvalidSpec, StudyExists) as error:
            log.error("schedule %s: run %s failed: %s", schedule_name, name, error)
            info = self._finish(firing_id, "failed", now, detail=str(error))
            if raise_errors:
                raise
            return info
        info = self._finish(firing_id, "created", now, seed=seed, warm_started=created)
        log.info(
            "schedule %s: created study %s (%d warm-start trial(s) enqueued, seed %s)",
            schedule_name,
            name,
            created,
            seed,
        )
        return info

    def _create_once(
        self, spec: StudySpec, warm: list[dict[str, Any]], marker: dict[str, Any]
    ) -> int:
        """Create the study unless this firing already did; returns the warm-start count.

        Our row and our marker: an earlier attempt finished creating it (and then lost its
        process) — done. An Optuna study without our row and without another firing's marker:
        left half-created by a crash inside creation — removed and created again. Anything else
        of that name is someone else's study: ``StudyExists``.
        """
        with self.db.session() as session:
            has_row = (
                session.scalar(select(StudyRow.study_id).where(StudyRow.name == spec.name))
                is not None
            )
        storage = self.studies.storage
        try:
            study_id: int | None = storage.get_study_id_from_name(spec.name)
        except KeyError:
            study_id = None
        if study_id is not None:
            found = storage.get_study_user_attrs(study_id).get(SCHEDULE_ATTR) or {}
            ours = found.get("fire_key") == marker["fire_key"]
            if has_row and ours:
                waiting = storage.get_all_trials(
                    study_id, deepcopy=False, states=(TrialState.WAITING,)
                )
                return sum(1 for trial in waiting if trial.user_attrs.get("enqueued"))
            if has_row or (found and not ours):
                raise StudyExists(spec.name)
            log.warning("removing study %s left half-created by a crash", spec.name)
            storage.delete_study(study_id)
        self.studies.create_study(spec, enqueue=warm, user_attrs={SCHEDULE_ATTR: marker})
        return len(warm)

    def _finish(
        self,
        firing_id: int,
        status: str,
        now: datetime,
        *,
        detail: str | None = None,
        seed: int | None = None,
        warm_started: int = 0,
    ) -> FiringInfo | None:
        with self.db.session() as session:
            firing = session.get(FiringRow, firing_id)
            if firing is None:  # the schedule was deleted meanwhile
                return None
            firing.status = status
            firing.detail = detail
            firing.seed = seed
            firing.warm_started = warm_started
            firing.finished_at = now
            schedule = session.get(ScheduleRow, firing.schedule_id)
            return firing_info(firing, schedule.name if schedule else "?")

    def warm_start_params(
        self, previous_study: str, spec: StudySpec, top_k: int
    ) -> list[dict[str, Any]]:
        """The previous run's best ``top_k`` complete trials' parameters, best first, fitted to
        tonight's space: a parameter tonight's space lacks, or whose value it no longer holds,
        is dropped (the sampler picks it); a set that no longer makes a valid config is left out.
        """
        if top_k <= 0:
            return []
        storage = self.studies.storage
        try:
            study_id = storage.get_study_id_from_name(previous_study)
        except KeyError:  # deleted since
            return []
        maximize = storage.get_study_directions(study_id)[0] == StudyDirection.MAXIMIZE
        complete = [
            t
            for t in storage.get_all_trials(study_id, deepcopy=False, states=(TrialState.COMPLETE,))
            if t.values and is_feasible(t)  # a collapsed or diverged trial is no warm start
        ]
        complete.sort(key=lambda t: (-t.values[0] if maximize else t.values[0], t.number))
        space = {param.name: param for param in check_spec(spec)}
        chosen: list[dict[str, Any]] = []
        seen: set[str] = set()
        for trial in complete:
            params = {
                key: value
                for key, value in trial.params.items()
                if key in space and space[key].contains(value)
            }
            fingerprint = json.dumps(params, sort_keys=True)
            if not params or fingerprint in seen:
                continue
            try:
                resolve_config(spec, params)
            except InvalidSpec as error:
                log.info(
                    "warm start: trial %d of %s left out: %s", trial.number, previous_study, error
                )
                continue
            seen.add(fingerprint)
            chosen.append(params)
            if len(chosen) == top_k:
                break
        return chosen

    # --- by hand ----------------------------------------------------------------------------

    def run_now(self, ref: str) -> FiringInfo:
        """Fire a schedule now, paused or not, as a ``manual`` run with its own study name.

        Raises ``ScheduleNotFound``, ``StudyExists`` (two runs in the same second).
        """
        now = self.clock()
        with self.db.session() as session:
            row = get_schedule(session, ref)
            schedule_id, name, zone = row.id, row.name, parse_zone(row.timezone)
        study = manual_study_name(name, now, zone)
        with self.db.session() as session:
            if session.scalar(select(StudyRow.study_id).where(StudyRow.name == study)) is not None:
                raise StudyExists(study)
        fire = FireTime(local=local_time(now, zone), instant=now)
        firing_id = self._claim(
            schedule_id,
            key=f"manual {now.isoformat()}",
            kind="manual",
            fire=fire,
            study=study,
            now=now,
        )
        if firing_id is None:
            raise StudyExists(study)
        info = self._materialize(firing_id, now, raise_errors=True)
        assert info is not None
        return info


def _count_runs_before(session: Session, schedule_id: int, before: datetime) -> int:
    """How many runs of the schedule created a study before ``before``: the run index."""
    count = session.scalar(
        select(func.count())
        .select_from(FiringRow)
        .where(
            FiringRow.schedule_id == schedule_id,
            FiringRow.status == "created",
            FiringRow.scheduled_for < before,
        )
    )
    return int(count or 0)


def _previous_study(session: Session, schedule_id: int, before: datetime) -> str | None:
    """The study of the schedule's latest run before ``before`` (scheduled or manual)."""
    return session.scalar(
        select(FiringRow.study_name)
        .where(
            FiringRow.schedule_id == schedule_id,
            FiringRow.status == "created",
            FiringRow.scheduled_for < before,
        )
        .order_by(FiringRow.scheduled_for.desc(), FiringRow.id.desc())
        .limit(1)
    )


def _seed(template: StudyTemplate, policy: str, run_index: int) -> int | None:
    """``fixed``: the template's seed every run; ``per_night``: seed + run index. No seed in the
    template (random) stays random under both."""
    base = template.sampler.seed
    if base is None:
        return None
    return base + run_index if policy == "per_night" else base


def run_scheduler(scheduler: Scheduler, interval_s: float, stop: threading.Event) -> None:
    """Tick at once (a restart catches up at start) and then every ``interval_s`` seconds until
    ``stop`` is set; a failed tick is logged and the next one tries again."""
    while True:
        try:
            scheduler.tick()
        except Exception:
            log.exception("scheduler tick failed")
        if stop.wait(interval_s):
            return
