"""Firing exactly once: two scheduler instances racing on one database (SQLite and PostgreSQL)
over a simulated clock — 30 nights, daylight-saving nights, downtime, pauses, crashes."""

from __future__ import annotations

from collections import Counter
from datetime import UTC, datetime, timedelta
from typing import Any

import optuna
import pytest
from schedule_helpers import (
    Node,
    SimClock,
    every,
    nodes,
    race,
    schedule_settings,
    schedule_spec,
    template,
    utc,
)
from sqlalchemy import select

from hpo_service.errors import StudyExists
from hpo_service.fire_times import fire_times_after, parse_zone
from hpo_service.models import FiringRow, StudyRow
from hpo_service.schedules import study_spec
from hpo_service.schemas import ScheduleUpdate, StudyTemplate


def study_names(node: Node) -> list[str]:
    with node.studies.db.session() as session:
        return sorted(session.scalars(select(StudyRow.name)))


def firings(node: Node) -> list[FiringRow]:
    with node.studies.db.session() as session:
        return list(session.scalars(select(FiringRow).order_by(FiringRow.scheduled_for)))


def as_utc(moment: datetime) -> datetime:
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)  # SQLite drops the zone


def test_thirty_nights_two_schedulers_thirty_studies(database_url: str) -> None:
    """Hourly ticks for 30 days in New York (spring-forward night included), both schedulers
    released together at every tick: each fire time is claimed by exactly one of them."""
    start = utc(2026, 3, 1, 5, 0)  # midnight in New York
    clock = SimClock(start)
    with nodes(schedule_settings(database_url), clock, 2) as pair:
        pair[0].schedules.create(schedule_spec(timezone="America/New_York"))
        race(pair, every(start, start + timedelta(days=30), timedelta(hours=1)), clock)
        expected = [f"nightly-2026-03-{day:02d}" for day in range(1, 31)]
        assert study_names(pair[0]) == expected
        assert sorted(f.study for f in pair[0].fired + pair[1].fired) == expected  # one winner
        rows = firings(pair[0])
        assert [(r.kind, r.status) for r in rows] == [("scheduled", "created")] * 30
        storage = pair[1].studies.storage
        assert sorted(s.study_name for s in storage.get_all_studies()) == expected


@pytest.mark.parametrize(
    ("zone", "cron", "night", "fires_at"),
    [
        ("Europe/Berlin", "30 2 * * *", "2026-03-29", utc(2026, 3, 29, 1, 0)),  # gap → 03:00
        ("Europe/Berlin", "30 2 * * *", "2026-10-25", utc(2026, 10, 25, 0, 30)),  # 1st 02:30
        ("America/New_York", "30 2 * * *", "2026-03-08", utc(2026, 3, 8, 7, 0)),  # gap → 03:00
        ("America/New_York", "30 1 * * *", "2026-11-01", utc(2026, 11, 1, 5, 30)),  # 1st 01:30
    ],
)
def test_a_daylight_saving_night_fires_once(
    database_url: str, zone: str, cron: str, night: str, fires_at: datetime
) -> None:
    """Half-hourly ticks (both passes through a repeated hour) over the night before, the
    transition night and the night after."""
    start = fires_at - timedelta(hours=36)
    clock = SimClock(start)
    with nodes(schedule_settings(database_url), clock, 2) as pair:
        pair[0].schedules.create(schedule_spec(cron=cron, timezone=zone))
        race(pair, every(start, start + timedelta(hours=72), timedelta(minutes=30)), clock)
        names = study_names(pair[0])
        assert f"nightly-{night}" in names
        assert len(names) == 3 and len(set(names)) == 3  # the night before, this one, after
        [transition] = [r for r in firings(pair[0]) if r.study_name == f"nightly-{night}"]
        assert as_utc(transition.scheduled_for) == fires_at
        assert len(pair[0].fired) + len(pair[1].fired) == 3


def test_downtime_across_three_fire_times_gives_one_catch_up(database_url: str) -> None:
    clock = SimClock(utc(2026, 1, 1))
    with nodes(schedule_settings(database_url), clock, 2) as pair:
        pair[0].schedules.create(schedule_spec())
        race(pair, [utc(2026, 1, 1, 3, 0)], clock)  # night 1 on time
        # Down from 1 Jan 03:00 to 4 Jan 04:00: the 2, 3 and 4 Jan fire times pass unseen.
        race(pair, [utc(2026, 1, 4, 4, 0), utc(2026, 1, 4, 4, 30)], clock)
        race(pair, [utc(2026, 1, 5, 2, 45)], clock)  # back to normal
        assert study_names(pair[0]) == [
            "nightly-2026-01-01",
            "nightly-2026-01-04",
            "nightly-2026-01-05",
        ]
        summary = [(r.local_time[:10], r.kind, r.status) for r in firings(pair[0])]
        assert summary == [
            ("2026-01-01", "scheduled", "created"),
            ("2026-01-02", "scheduled", "skipped"),
            ("2026-01-03", "scheduled", "skipped"),
            ("2026-01-04", "catch_up", "created"),
            ("2026-01-05", "scheduled", "created"),
        ]


def test_misses_another_node_recorded_first_still_make_the_next_run_a_catch_up(
    database_url: str,
) -> None:
    """The race the test above can lose: one node records the missed fire times (which moves
    every node's anchor past them) and the other claims the latest one. Played in order here,
    so it cannot pass by luck."""
    clock = SimClock(utc(2026, 1, 1))
    with nodes(schedule_settings(database_url), clock, 2) as pair:
        info = pair[0].schedules.create(schedule_spec())
        race(pair, [utc(2026, 1, 1, 3, 0)], clock)  # night 1 on time
        zone = parse_zone("UTC")
        missed = list(
            fire_times_after("30 2 * * *", zone, utc(2026, 1, 1, 3), until=utc(2026, 1, 3, 3))
        )
        assert [m.local.day for m in missed] == [2, 3]
        # Node 0 got as far as recording the misses; node 1 ticks next and claims 4 Jan.
        pair[0].scheduler._record_missed(info.id, "nightly", zone, missed, utc(2026, 1, 4, 4))
        pair[1].fired.extend(pair[1].scheduler.tick(utc(2026, 1, 4, 4, 0)))
        summary = [(r.local_time[:10], r.kind, r.status) for r in firings(pair[0])]
        assert summary[-1] == ("2026-01-04", "catch_up", "created")


def test_a_miss_older_than_the_grace_period_is_logged_not_run(
    database_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    clock = SimClock(utc(2026, 1, 1))
    with nodes(schedule_settings(database_url), clock, 1) as [node]:
        node.schedules.create(schedule_spec(catchup_grace_s=3600))
        node.scheduler.tick(utc(2026, 1, 1, 3, 0))
        # Back 2 h 30 min after the 4 Jan fire time, past the 1 h grace: nothing runs.
        node.scheduler.tick(utc(2026, 1, 4, 5, 0))
        assert study_names(node) == ["nightly-2026-01-01"]
        assert "more than the 1:00:00 grace period" in caplog.text
        assert [r.status for r in firings(node)] == ["created", "skipped", "skipped", "skipped"]
        node.scheduler.tick(utc(2026, 1, 5, 2, 30))  # the next fire time runs on time
        assert study_names(node) == ["nightly-2026-01-01", "nightly-2026-01-05"]


def test_pause_and_resume_never_catch_up_the_paused_nights(database_url: str) -> None:
    clock = SimClock(utc(2026, 1, 1))
    with nodes(schedule_settings(database_url), clock, 1) as [node]:
        node.schedules.create(schedule_spec())
        node.scheduler.tick(utc(2026, 1, 1, 3, 0))
        clock.now = utc(2026, 1, 1, 12, 0)
        node.schedules.set_enabled("nightly", False)
        for day in (2, 3):
            node.scheduler.tick(utc(2026, 1, day, 3, 0))
        clock.now = utc(2026, 1, 3, 3, 10)  # resume 40 min after the 3 Jan fire time
        info = node.schedules.set_enabled("nightly", True)
        assert info.next_fire_at == utc(2026, 1, 4, 2, 30).isoformat()
        node.scheduler.tick(utc(2026, 1, 3, 3, 20))
        node.scheduler.tick(utc(2026, 1, 4, 3, 0))
        assert study_names(node) == ["nightly-2026-01-01", "nightly-2026-01-04"]


def test_a_new_cron_applies_from_now_without_catching_up_the_old_rule(database_url: str) -> None:
    clock = SimClock(utc(2026, 1, 1))
    with nodes(schedule_settings(database_url), clock, 1) as [node]:
        node.schedules.create(schedule_spec())
        clock.now = utc(2026, 1, 1, 12, 0)
        node.schedules.update("nightly", ScheduleUpdate(cron="0 6 * * *"))  # 06:00 passed
        node.scheduler.tick(utc(2026, 1, 1, 12, 5))
        assert study_names(node) == []
        node.scheduler.tick(utc(2026, 1, 2, 6, 1))
        assert study_names(node) == ["nightly-2026-01-02"]


def test_a_claim_whose_process_died_is_finished_by_another_scheduler_once(
    database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = SimClock(utc(2026, 1, 1))
    settings = schedule_settings(database_url, schedule_claim_timeout_s=300)
    with nodes(settings, clock, 3) as (crashing, healthy, other):
        crashing.schedules.create(schedule_spec())

        def crash(*args: Any, **kwargs: Any) -> None:
            raise RuntimeError("simulated crash after the claim")

        monkeypatch.setattr(crashing.studies, "create_study", crash)
        crashing.scheduler.tick(utc(2026, 1, 1, 2, 31))  # claims, then "dies"
        healthy.scheduler.tick(utc(2026, 1, 1, 2, 32))  # the claim is fresh: hands off
        assert study_names(healthy) == []
        assert [r.status for r in firings(healthy)] == ["claimed"]
        race([healthy, other], [utc(2026, 1, 1, 2, 40)], clock)  # timed out: one takes over
        assert study_names(healthy) == ["nightly-2026-01-01"]
        assert [r.status for r in firings(healthy)] == ["created"]
        assert [f.study for f in healthy.fired + other.fired] == ["nightly-2026-01-01"]


def test_a_study_left_half_created_by_a_crash_is_recreated(database_url: str) -> None:
    """An Optuna study without the service's row (the process died inside creation)."""
    clock = SimClock(utc(2026, 1, 1))
    settings = schedule_settings(database_url, schedule_claim_timeout_s=60)
    with nodes(settings, clock, 1) as [node]:
        node.schedules.create(schedule_spec())
        optuna.create_study(study_name="nightly-2026-01-01", storage=node.studies.storage)
        node.scheduler.tick(utc(2026, 1, 1, 2, 31))
        info = node.studies.get_study("nightly-2026-01-01")
        assert info.spec.name == "nightly-2026-01-01" and info.state == "running"
        assert [r.status for r in firings(node)] == ["created"]


def test_a_study_name_taken_by_someone_else_fails_the_night_visibly(database_url: str) -> None:
    clock = SimClock(utc(2026, 1, 1))
    with nodes(schedule_settings(database_url), clock, 1) as [node]:
        node.schedules.create(schedule_spec())
        taken = study_spec(StudyTemplate.model_validate(template()), "nightly-2026-01-01")
        node.studies.create_study(taken)
        node.scheduler.tick(utc(2026, 1, 1, 2, 31))
        [row] = firings(node)
        assert row.status == "failed" and "already exists" in (row.detail or "")


def test_run_now_creates_a_manual_run_that_does_not_move_the_schedule(database_url: str) -> None:
    clock = SimClock(utc(2026, 1, 1, 12, 0, 5))
    with nodes(schedule_settings(database_url), clock, 1) as [node]:
        node.schedules.create(schedule_spec(enabled=False))
        firing = node.scheduler.run_now("nightly")  # paused schedules can still run by hand
        assert firing.kind == "manual" and firing.status == "created"
        assert firing.study == "nightly-2026-01-01-manual-120005"
        with pytest.raises(StudyExists):
            node.scheduler.run_now("nightly")  # the same second
        node.schedules.set_enabled("nightly", True)
        node.scheduler.tick(utc(2026, 1, 2, 2, 30))
        assert study_names(node) == ["nightly-2026-01-01-manual-120005", "nightly-2026-01-02"]
        kinds = Counter(r.kind for r in firings(node))
        assert kinds == {"manual": 1, "scheduled": 1}
