"""Schedules as resources: create, list, inspect, update, pause/resume, delete.

A schedule is a cron expression read on the wall clock of an IANA zone plus a study template.
Everything is validated before anything is written — the cron, the zone, and the template as the
study it would create (the same checks as ``POST /v1/studies``) — so a bad schedule gets a 422
naming the field, never a night that fails later. When the schedule fires is ``fire_times``'s job;
firing it exactly once is ``scheduler``'s.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import delete, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from hpo_service.config import Settings
from hpo_service.errors import InvalidSpec, ScheduleExists, ScheduleNotFound
from hpo_service.fire_times import check_cron, next_fire_time, parse_zone
from hpo_service.grid import study_grid
from hpo_service.models import FiringRow, ScheduleRow
from hpo_service.optimizers import build_pruner, build_sampler
from hpo_service.schemas import (
    FiringInfo,
    ScheduleInfo,
    ScheduleSpec,
    ScheduleUpdate,
    StudySpec,
    StudyTemplate,
)
from hpo_service.search_space import check_spec
from hpo_service.studies import StudyService

Clock = Callable[[], datetime]


def utc_now() -> datetime:
    return datetime.now(UTC)


def aware(moment: datetime) -> datetime:
    """SQLite hands back naive datetimes; every time we store is UTC."""
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def _iso(moment: datetime | None) -> str | None:
    return aware(moment).isoformat() if moment is not None else None


def study_spec(template: StudyTemplate, name: str, seed: int | None = None) -> StudySpec:
    """The spec of one run: the template under ``name``, with the sampler's seed when given."""
    body: dict[str, Any] = {**template.model_dump(mode="json"), "name": name}
    if seed is not None:
        body["sampler"] = {**body["sampler"], "seed": seed}
    return StudySpec.model_validate(body)


def check_template(template: StudyTemplate) -> None:
    """Validate the template as the study it creates. Raises ``InvalidSpec('template.…')``."""
    spec = study_spec(template, "template-check")
    try:
        build_sampler(spec.sampler, study_grid(spec, check_spec(spec)))
        build_pruner(spec.pruner, spec.epochs)
    except InvalidSpec as error:
        raise InvalidSpec(f"template.{error.field}", error.reason) from error


def firing_info(row: FiringRow, schedule: str) -> FiringInfo:
    return FiringInfo(
        id=row.id,
        schedule=schedule,
        fire_key=row.fire_key,
        kind=row.kind,
        status=row.status,
        scheduled_for=aware(row.scheduled_for).isoformat(),
        local_time=row.local_time,
        study=row.study_name,
        seed=row.seed,
        warm_started=row.warm_started,
        detail=row.detail,
        claimed_at=_iso(row.claimed_at),
        finished_at=_iso(row.finished_at),
    )


def effective_grace_s(row: ScheduleRow, settings: Settings) -> float:
    """How late a missed fire time may still run (seconds): the schedule's own grace or the
    server's, never shorter than two ticks — a fire time is seen up to one tick late, and an
    on-time run must never be skipped as a miss."""
    configured = row.catchup_grace_s
    if configured is None:
        configured = settings.schedule_catchup_grace_s
    return max(configured, 2 * settings.scheduler_tick_s)


def find_schedule(session: Session, ref: str) -> ScheduleRow | None:
    """By name, or by id when ``ref`` is a number (names start with a letter)."""
    if ref.isdigit():
        return session.get(ScheduleRow, int(ref))
    return session.scalar(select(ScheduleRow).where(ScheduleRow.name == ref))


def get_schedule(session: Session, ref: str) -> ScheduleRow:
    """Raises ``ScheduleNotFound``."""
    row = find_schedule(session, ref)
    if row is None:
        raise ScheduleNotFound(ref)
    return row


class ScheduleService:
    """CRUD of schedules. Thread-safe; one per process, beside the ``StudyService``."""

    def __init__(self, studies: StudyService, settings: Settings, clock: Clock = utc_now) -> None:
        self.studies = studies
        self.settings = settings
        self.db = studies.db
        self.clock = clock

    def create(self, spec: ScheduleSpec) -> ScheduleInfo:
        """Raises ``InvalidSpec`` (cron, timezone, template.…) or ``ScheduleExists``."""
        check_cron(spec.cron)
        parse_zone(spec.timezone)
        check_template(spec.template)
        now = self.clock()
        try:
            with self.db.session() as session:
                if find_schedule(session, spec.name) is not None:
                    raise ScheduleExists(spec.name)
                session.add(
                    ScheduleRow(
                        name=spec.name,
                        cron=spec.cron,
                        timezone=spec.timezone,
                        template=spec.template.model_dump(mode="json"),
                        warm_start_top_k=spec.warm_start_top_k,
                        seed_policy=spec.seed_policy,
                        enabled=spec.enabled,
                        catchup_grace_s=spec.catchup_grace_s,
                        regression_threshold=spec.regression_threshold,
                        active_since=now,
                        created_at=now,
                        updated_at=now,
                    )
                )
        except IntegrityError as error:  # another replica created it between check and insert
            raise ScheduleExists(spec.name) from error
        return self.get(spec.name)

    def list_schedules(self) -> list[ScheduleInfo]:
        with self.db.session() as session:
            rows = list(session.scalars(select(ScheduleRow).order_by(ScheduleRow.name)))
            return [self._info(session, row) for row in rows]

    def get(self, ref: str) -> ScheduleInfo:
        """Raises ``ScheduleNotFound``."""
        with self.db.session() as session:
            return self._info(session, get_schedule(session, ref))

    def update(self, ref: str, patch: ScheduleUpdate) -> ScheduleInfo:
        """Apply the fields given. A new cron or zone restarts the schedule's clock, so fire
        times of the old rule are never caught up. Raises ``InvalidSpec`` or ``ScheduleNotFound``.
        """
        given = patch.model_fields_set
        if patch.cron is not None:
            check_cron(patch.cron)
        if patch.timezone is not None:
            parse_zone(patch.timezone)
        if patch.template is not None:
            check_template(patch.template)
        for field in given - {"catchup_grace_s"}:
            if getattr(patch, field) is None:
                raise InvalidSpec(field, "must not be null")
        now = self.clock()
        with self.db.session() as session:
            row = get_schedule(session, ref)
            retimed = (patch.cron is not None and patch.cron != row.cron) or (
                patch.timezone is not None and patch.timezone != row.timezone
            )
            resumed = patch.enabled is True and not row.enabled
            for field in given:
                value = getattr(patch, field)
                if field == "template":
                    value = patch.template.model_dump(mode="json") if patch.template else None
                setattr(row, field, value)
            if retimed or resumed:
                row.active_since = now
            row.updated_at = now
            name = row.name
        return self.get(name)

    def set_enabled(self, ref: str, enabled: bool) -> ScheduleInfo:
        """Pause, or resume from now on: fire times missed while paused are not caught up."""
        return self.update(ref, ScheduleUpdate(enabled=enabled))

    def delete(self, ref: str) -> None:
        """Delete the schedule and its firing records; the studies it created remain."""
        with self.db.session() as session:
            row = get_schedule(session, ref)
            session.execute(delete(FiringRow).where(FiringRow.schedule_id == row.id))
            session.delete(row)

    def firings(self, ref: str, limit: int = 50) -> list[FiringInfo]:
        """The newest ``limit`` firings (any status), newest first."""
        with self.db.session() as session:
            row = get_schedule(session, ref)
            rows = session.scalars(
                select(FiringRow)
                .where(FiringRow.schedule_id == row.id)
                .order_by(FiringRow.scheduled_for.desc(), FiringRow.id.desc())
                .limit(limit)
            )
            return [firing_info(firing, row.name) for firing in rows]

    def _info(self, session: Session, row: ScheduleRow) -> ScheduleInfo:
        last = session.scalar(
            select(FiringRow)
            .where(FiringRow.schedule_id == row.id, FiringRow.status != "skipped")
            .order_by(FiringRow.claimed_at.desc().nulls_last(), FiringRow.id.desc())
            .limit(1)
        )
        upcoming = None
        if row.enabled:
            zone = parse_zone(row.timezone)
            upcoming = next_fire_time(row.cron, zone, max(self.clock(), aware(row.active_since)))
        return ScheduleInfo(
            id=row.id,
            name=row.name,
            cron=row.cron,
            timezone=row.timezone,
            template=StudyTemplate.model_validate(row.template),
            warm_start_top_k=row.warm_start_top_k,
            seed_policy=row.seed_policy,
            enabled=row.enabled,
            catchup_grace_s=effective_grace_s(row, self.settings),
            regression_threshold=row.regression_threshold,
            active_since=aware(row.active_since).isoformat(),
            created_at=aware(row.created_at).isoformat(),
            updated_at=aware(row.updated_at).isoformat(),
            next_fire_local=upcoming.local.isoformat(timespec="minutes") if upcoming else None,
            next_fire_at=upcoming.instant.isoformat() if upcoming else None,
            last_firing=firing_info(last, row.name) if last is not None else None,
        )
