"""The service's own tables (prefix ``hpo_``): only what Optuna has no place for.

Optuna owns trial state. These tables hold the control state of a study (running, stopped,
cancelled) and one lease per handed-out trial: its token, its worker, and — once the trial is
finished through the service — the answer given, so a repeated ``complete`` gets the same answer.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    func,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class Base(DeclarativeBase):
    pass


class StudyRow(Base):
    __tablename__ = "hpo_studies"

    study_id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    name: Mapped[str] = mapped_column(String(200), unique=True, index=True)
    state: Mapped[str] = mapped_column(String(20), default="running", index=True)
    n_trials: Mapped[int] = mapped_column(Integer)
    max_concurrent: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    last_leased_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


class LeaseRow(Base):
    __tablename__ = "hpo_leases"
    __table_args__ = (Index("ix_hpo_leases_outcome_beat", "outcome", "beat_at_s"),)

    trial_id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    study_id: Mapped[int] = mapped_column(Integer, index=True)
    trial_number: Mapped[int] = mapped_column(Integer)
    token: Mapped[str] = mapped_column(String(64))
    worker_id: Mapped[str] = mapped_column(String(200), index=True)
    leased_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    # Set once the worker finished the trial through the service: "complete" or "fail".
    outcome: Mapped[str | None] = mapped_column(String(20), nullable=True)
    fingerprint: Mapped[str | None] = mapped_column(String(64), nullable=True)
    answer: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    # The lease's last sign of life (granted, beat, report, a claim to finish), by the database
    # clock in seconds since the epoch: the reaper fails leases older than the lease timeout.
    beat_at_s: Mapped[float | None] = mapped_column(Float, nullable=True)


# --- recurring sweeps ------------------------------------------------------------------------


class ScheduleRow(Base):
    """A recurring sweep: a cron expression in a time zone and the study template it fires.

    Times come from the scheduler's clock (injected in tests), not from a server default.
    """

    __tablename__ = "hpo_schedules"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(80), unique=True, index=True)
    cron: Mapped[str] = mapped_column(String(100))
    timezone: Mapped[str] = mapped_column(String(64))
    template: Mapped[dict[str, Any]] = mapped_column(JSON)
    warm_start_top_k: Mapped[int] = mapped_column(Integer)
    seed_policy: Mapped[str] = mapped_column(String(20))
    enabled: Mapped[bool] = mapped_column(Boolean)
    catchup_grace_s: Mapped[float | None] = mapped_column(Float, nullable=True)
    regression_threshold: Mapped[float] = mapped_column(Float)
    # Fire times at or before this instant are never due: set on create, resume, and when the
    # cron or zone changes, so pausing or re-timing a schedule never triggers a catch-up.
    active_since: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class FiringRow(Base):
    """One fire time of a schedule. The unique (schedule_id, fire_key) is what makes a fire
    time run once across scheduler processes: whoever inserts the row creates the study."""

    __tablename__ = "hpo_firings"
    __table_args__ = (
        UniqueConstraint("schedule_id", "fire_key", name="uq_hpo_firings_schedule_key"),
        Index("ix_hpo_firings_schedule_time", "schedule_id", "scheduled_for"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    schedule_id: Mapped[int] = mapped_column(
        Integer, ForeignKey("hpo_schedules.id", ondelete="CASCADE")
    )
    fire_key: Mapped[str] = mapped_column(String(120))
    kind: Mapped[str] = mapped_column(String(20))  # scheduled | catch_up | manual
    status: Mapped[str] = mapped_column(String(20))  # claimed | created | skipped | failed
    scheduled_for: Mapped[datetime] = mapped_column(DateTime(timezone=True))  # the fire instant
    local_time: Mapped[str] = mapped_column(String(32))  # wall-clock, in the schedule's zone
    study_name: Mapped[str | None] = mapped_column(String(200), nullable=True)
    seed: Mapped[int | None] = mapped_column(Integer, nullable=True)
    warm_started: Mapped[int] = mapped_column(Integer, default=0)
    detail: Mapped[str | None] = mapped_column(Text, nullable=True)  # why skipped or failed
    claimed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


# --- per-epoch diagnostics (issue 14) --------------------------------------------------------


class EpochRecordRow(Base):
    """One epoch of one trial's diagnostics, as reported (``hpo_service.history``).

    Optuna keeps only the latest ``metrics`` attribute per trial; this keeps every epoch, one
    compact JSON record each, bounded in size (``history.MAX_RECORD_BYTES``). Keyed by
    (trial, epoch), so a repeated report of an epoch is not stored twice.
    """

    __tablename__ = "hpo_epoch_records"

    trial_id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    epoch: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    study_id: Mapped[int] = mapped_column(Integer, index=True)
    record: Mapped[dict[str, Any]] = mapped_column(JSON)
