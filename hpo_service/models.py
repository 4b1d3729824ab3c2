"""The service's own tables (prefix ``hpo_``): only what Optuna has no place for.

Optuna owns trial state. These tables hold the control state of a study (running, stopped,
cancelled) and one lease per handed-out trial: its token, its worker, and — once the trial is
finished through the service — the answer given, so a repeated ``complete`` gets the same answer.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, DateTime, Integer, String, func
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
