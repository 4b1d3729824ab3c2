"""When schedules fire: cron on local wall-clock time, daylight-saving gaps and repeats, keys."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from hpo_service.errors import InvalidSpec
from hpo_service.fire_times import (
    check_cron,
    fire_key,
    fire_times_after,
    fires_at_most_daily,
    latest_fire_time,
    manual_study_name,
    next_fire_time,
    parse_zone,
    study_name,
    to_instant,
)


def utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)  # type: ignore[misc]


def instants(cron: str, zone: str, start: datetime, end: datetime) -> list[datetime]:
    return [f.instant for f in fire_times_after(cron, parse_zone(zone), start, end)]


@pytest.mark.parametrize(
    ("zone", "cron", "start", "end", "expected"),
    [
        # Berlin springs forward 2026-03-29 02:00 CET → 03:00 CEST: 02:30 does not exist and
        # fires at the first instant after the gap, 03:00 CEST = 01:00 UTC — not skipped.
        (
            "Europe/Berlin",
            "30 2 * * *",
            utc(2026, 3, 28),
            utc(2026, 3, 31),
            [utc(2026, 3, 28, 1, 30), utc(2026, 3, 29, 1, 0), utc(2026, 3, 30, 0, 30)],
        ),
        # Berlin falls back 2026-10-25 03:00 CEST → 02:00 CET: 02:30 happens twice (00:30 and
        # 01:30 UTC); it fires at the first, once.
        (
            "Europe/Berlin",
            "30 2 * * *",
            utc(2026, 10, 24),
            utc(2026, 10, 27),
            [utc(2026, 10, 24, 0, 30), utc(2026, 10, 25, 0, 30), utc(2026, 10, 26, 1, 30)],
        ),
        # New York springs forward 2026-03-08 02:00 EST → 03:00 EDT (07:00 UTC).
        (
            "America/New_York",
            "30 2 * * *",
            utc(2026, 3, 7),
            utc(2026, 3, 10),
            [utc(2026, 3, 7, 7, 30), utc(2026, 3, 8, 7, 0), utc(2026, 3, 9, 6, 30)],
        ),
        # New York falls back 2026-11-01 02:00 EDT → 01:00 EST: 01:30 repeats.
        (
            "America/New_York",
            "30 1 * * *",
            utc(2026, 10, 31),
            utc(2026, 11, 3),
            [utc(2026, 10, 31, 5, 30), utc(2026, 11, 1, 5, 30), utc(2026, 11, 2, 6, 30)],
        ),
    ],
)
def test_daily_fire_times_across_dst_fire_every_night_once(
    zone: str, cron: str, start: datetime, end: datetime, expected: list[datetime]
) -> None:
    assert instants(cron, zone, start, end) == expected
    # The latest fire time seen from any instant in the night agrees with the forward walk.
    for instant in expected:
        latest = latest_fire_time(cron, parse_zone(zone), instant)
        assert latest is not None and latest.instant == instant


def test_the_second_pass_through_a_repeated_hour_sees_the_same_fire_key() -> None:
    zone = parse_zone("America/New_York")
    first = latest_fire_time("30 1 * * *", zone, utc(2026, 11, 1, 5, 45))  # 01:45 EDT
    second = latest_fire_time("30 1 * * *", zone, utc(2026, 11, 1, 6, 45))  # 01:45 EST
    assert first is not None and second is not None
    assert fire_key(first, zone) == fire_key(second, zone) == "2026-11-01T01:30 America/New_York"
    assert first.instant == second.instant == utc(2026, 11, 1, 5, 30)


def test_a_sub_hourly_cron_fires_each_instant_once_around_the_gap() -> None:
    zone = parse_zone("America/New_York")
    fires = list(
        fire_times_after("*/30 * * * *", zone, utc(2026, 3, 8, 6, 0), utc(2026, 3, 8, 8, 0))
    )
    # 01:30 EST, then 02:00/02:30/03:00 all land on 03:00 EDT (07:00 UTC) — once — then 03:30.
    assert [f.instant for f in fires] == [
        utc(2026, 3, 8, 6, 30),
        utc(2026, 3, 8, 7, 0),
        utc(2026, 3, 8, 7, 30),
        utc(2026, 3, 8, 8, 0),
    ]
    gap = latest_fire_time("*/30 * * * *", zone, utc(2026, 3, 8, 7, 10))
    assert gap is not None and fire_key(gap, zone) == fire_key(fires[1], zone)


def test_to_instant_maps_a_gap_to_the_end_of_the_gap_and_a_repeat_to_its_first_pass() -> None:
    berlin = parse_zone("Europe/Berlin")
    assert to_instant(datetime(2026, 3, 29, 2, 0), berlin) == utc(2026, 3, 29, 1, 0)
    assert to_instant(datetime(2026, 3, 29, 2, 59), berlin) == utc(2026, 3, 29, 1, 0)
    assert to_instant(datetime(2026, 3, 29, 3, 0), berlin) == utc(2026, 3, 29, 1, 0)
    assert to_instant(datetime(2026, 10, 25, 2, 30), berlin) == utc(2026, 10, 25, 0, 30)
    assert to_instant(datetime(2026, 6, 1, 12, 0), berlin) == utc(2026, 6, 1, 10, 0)


def test_latest_and_next_fire_time() -> None:
    zone = parse_zone("UTC")
    now = utc(2026, 1, 2, 12, 0)
    latest = latest_fire_time("30 2 * * *", zone, now)
    upcoming = next_fire_time("30 2 * * *", zone, now)
    assert latest is not None and latest.instant == utc(2026, 1, 2, 2, 30)
    assert upcoming is not None and upcoming.instant == utc(2026, 1, 3, 2, 30)
    exact = latest_fire_time("30 2 * * *", zone, utc(2026, 1, 2, 2, 30))
    assert exact is not None and exact.instant == utc(2026, 1, 2, 2, 30)


@pytest.mark.parametrize(
    ("expression", "reason"),
    [
        ("61 * * * *", "not a valid cron expression"),
        ("every night", "not a valid cron expression"),
        ("* * * *", "not a valid cron expression"),
        ("0 * * * * 30", "five fields"),
        ("0 0 31 2 *", "never fires"),
    ],
)
def test_bad_cron_expressions_name_the_field(expression: str, reason: str) -> None:
    with pytest.raises(InvalidSpec) as caught:
        check_cron(expression)
    assert caught.value.field == "cron"
    assert reason in caught.value.reason


@pytest.mark.parametrize("name", ["Mars/Olympus_Mons", "", "../etc/passwd", "/usr/share/x", "EST5"])
def test_bad_time_zones_name_the_field(name: str) -> None:
    with pytest.raises(InvalidSpec) as caught:
        parse_zone(name)
    assert caught.value.field == "timezone"


def test_study_names_follow_the_local_date() -> None:
    zone = parse_zone("Asia/Tokyo")
    fire = latest_fire_time("30 2 * * *", zone, utc(2026, 5, 1, 18, 0))  # 03:00 on 2 May, Tokyo
    assert fire is not None
    assert study_name("nightly", fire, fires_at_most_daily("30 2 * * *")) == "nightly-2026-05-02"
    assert study_name("often", fire, fires_at_most_daily("30 */6 * * *")) == "often-2026-05-02-0230"
    assert fires_at_most_daily("@daily") and not fires_at_most_daily("*/5 2 * * *")
    assert manual_study_name("nightly", utc(2026, 5, 1, 18, 4, 5), zone) == (
        "nightly-2026-05-02-manual-030405"
    )
