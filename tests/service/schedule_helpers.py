"""Builders for the schedule tests: settings, a simulated clock, racing schedulers, trials."""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from helpers import TINY_FIXED

from hpo_service.config import Settings
from hpo_service.scheduler import Scheduler
from hpo_service.schedules import ScheduleService
from hpo_service.schemas import FiringInfo, ScheduleSpec
from hpo_service.studies import StudyService


def utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)  # type: ignore[misc]


def schedule_settings(database_url: str, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "database_url": database_url,
        "heartbeat_interval_s": 0.2,
        "lease_timeout_s": 1,
        "run_reaper": False,
        "run_scheduler": False,  # tests tick explicitly on a simulated clock
        "db_connect_retries": 0,
    }
    values.update(overrides)
    return Settings(**values)


def template(**overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "dataset": "synthetic",
        "epochs": 3,
        "budget": {"n_trials": 20, "max_concurrent": 4},
        "sampler": {"name": "random", "seed": 7},
        "fixed": dict(TINY_FIXED),
    }
    body.update(overrides)
    return body


def schedule_spec(name: str = "nightly", **overrides: Any) -> ScheduleSpec:
    body: dict[str, Any] = {
        "name": name,
        "cron": "30 2 * * *",
        "timezone": "UTC",
        "template": template(),
    }
    body.update(overrides)
    return ScheduleSpec.model_validate(body)


@dataclass
class SimClock:
    """A clock the test moves by hand."""

    now: datetime

    def __call__(self) -> datetime:
        return self.now


@dataclass
class Node:
    """What one server or scheduler process holds: its own engine, services and clock."""

    studies: StudyService
    schedules: ScheduleService
    scheduler: Scheduler
    fired: list[FiringInfo] = field(default_factory=list)


@contextmanager
def nodes(settings: Settings, clock: SimClock, count: int) -> Iterator[list[Node]]:
    """``count`` independent service stacks on one database, as separate processes would be."""
    built: list[Node] = []
    try:
        for _ in range(count):
            studies = StudyService(settings)
            built.append(
                Node(
                    studies=studies,
                    schedules=ScheduleService(studies, settings, clock),
                    scheduler=Scheduler(studies, settings, clock),
                )
            )
        yield built
    finally:
        for node in built:
            node.studies.storage.engine.dispose()


def race(racers: Sequence[Node], instants: Sequence[datetime], clock: SimClock) -> None:
    """Every node ticks at every instant, all released at once by a barrier (one thread each),
    so claims of the same fire time really race in the database."""
    barrier = threading.Barrier(len(racers))
    errors: list[BaseException] = []

    def run(node: Node) -> None:
        try:
            for instant in instants:
                barrier.wait(timeout=120)
                node.fired.extend(node.scheduler.tick(instant))
        except BaseException as error:  # surfaced below; a broken barrier stops the others
            errors.append(error)
            barrier.abort()

    threads = [threading.Thread(target=run, args=(node,)) for node in racers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=600)
    assert not any(thread.is_alive() for thread in threads)
    if instants:
        clock.now = instants[-1]
    if errors:
        raise errors[0]


def every(start: datetime, end: datetime, step: timedelta) -> list[datetime]:
    instants = []
    moment = start
    while moment <= end:
        instants.append(moment)
        moment += step
    return instants


def plant(studies: StudyService, study: str, values: Sequence[float | str]) -> list[dict[str, Any]]:
    """Run trials of ``study`` through the worker protocol: a number completes the trial with
    that value, ``"pruned"`` prunes it, ``"fail"`` fails it. Returns each trial's params."""
    planted = []
    for value in values:
        lease = studies.lease("planter")
        assert lease is not None and lease.study == study, lease
        if value == "pruned":
            studies.fail(lease.trial_id, lease.lease_token, "pruned", False, pruned=True)
        elif value == "fail":
            studies.fail(lease.trial_id, lease.lease_token, "boom", retryable=False)
        else:
            studies.complete(lease.trial_id, lease.lease_token, [float(value)], {})
        trial = studies.storage.get_trial(lease.trial_id)
        planted.append(dict(trial.params))
    return planted
