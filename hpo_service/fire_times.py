"""When a schedule fires: cron expressions read on local wall-clock time in an IANA time zone.

Pure functions, no database. The rules that make daylight-saving transitions safe:

1. Fire times are computed by ``croniter`` on **naive local wall-clock time**, so ``30 2 * * *``
   means 02:30 on the clock of the schedule's zone every day, whatever the UTC offset is.
2. Each wall-clock fire time is mapped to one instant (``to_instant``):
   - an **ambiguous** time (the repeated hour when clocks fall back) maps to its *first*
     occurrence, and the firing is keyed by the wall-clock time (``fire_key``), so the second
     pass through the same hour finds the key taken: it fires once;
   - a **nonexistent** time (the hour skipped when clocks spring forward) maps to the first
     instant after the gap (02:30 on a 02:00→03:00 night fires at 03:00): not skipped.
3. Several wall-clock times that map to one instant (a sub-hourly cron inside a gap) fire once.

Raises ``InvalidSpec`` naming ``cron`` or ``timezone`` for expressions or zones that cannot be used.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from croniter import CroniterBadCronError, CroniterBadDateError, CroniterError, croniter

from hpo_service.errors import InvalidSpec

#: Wall-clock search margin around an instant. UTC offsets change by at most a few hours at a
#: transition (one hour for DST almost everywhere), so scanning this far past a local time is
#: enough to see every fire time whose instant lies on the other side of a transition.
_OFFSET_MARGIN = timedelta(hours=3)


@dataclass(frozen=True)
class FireTime:
    """One fire time of a schedule: its wall-clock time in the zone and the instant it fires."""

    local: datetime  # naive wall-clock time in the schedule's zone
    instant: datetime  # aware, UTC


def parse_zone(name: str) -> ZoneInfo:
    """The IANA zone ``name``. Raises ``InvalidSpec('timezone', ...)`` for an unknown zone."""
    if not name or name != name.strip() or name.startswith(("/", ".")) or ".." in name:
        raise InvalidSpec("timezone", f"{name!r} is not an IANA time zone name")
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError, OSError) as error:
        raise InvalidSpec(
            "timezone", f"unknown IANA time zone {name!r} (e.g. 'Europe/Berlin', 'UTC')"
        ) from error


def check_cron(expression: str) -> croniter:
    """Validate a five-field cron expression (minute hour day-of-month month day-of-week).

    Aliases such as ``@daily`` are accepted; second and year fields are not, and neither is an
    expression that never fires (``0 0 31 2 *``). Raises ``InvalidSpec('cron', reason)``.
    """
    try:
        parsed = croniter(expression, datetime(2000, 1, 1))
    except (CroniterBadCronError, CroniterError, ValueError, KeyError) as error:
        raise InvalidSpec("cron", f"{expression!r} is not a valid cron expression: {error}") from (
            error
        )
    if len(parsed.expanded) != 5:
        raise InvalidSpec(
            "cron",
            f"{expression!r} has {len(parsed.expanded)} fields; use the five fields "
            "'minute hour day-of-month month day-of-week' (no seconds or years)",
        )
    try:
        parsed.get_next(datetime)
    except CroniterBadDateError as error:
        raise InvalidSpec("cron", f"{expression!r} never fires") from error
    return parsed


def fires_at_most_daily(expression: str) -> bool:
    """Whether the cron fires at most once per local day (one minute and one hour value)."""
    minutes, hours = check_cron(expression).expanded[:2]
    return len(minutes) == 1 and len(hours) == 1 and "*" not in minutes and "*" not in hours


def to_instant(local: datetime, zone: ZoneInfo) -> datetime:
    """The UTC instant of naive wall-clock time ``local`` in ``zone`` (rules 2 above)."""
    first = local.replace(tzinfo=zone, fold=0).astimezone(UTC)
    if first.astimezone(zone).replace(tzinfo=None) == local:
        return first  # exists; fold=0 is the first of two occurrences when it is ambiguous
    # Nonexistent (PEP 495): fold=0 reads it with the offset before the gap (an instant after the
    # transition), fold=1 with the offset after it (an instant before). Transitions fall on whole
    # seconds; bisect for the first second whose wall-clock time is at or past ``local``.
    low = int(local.replace(tzinfo=zone, fold=1).astimezone(UTC).timestamp())
    high = int(first.timestamp())
    while high - low > 1:
        middle = (low + high) // 2
        if local_time(datetime.fromtimestamp(middle, UTC), zone) >= local:
            high = middle
        else:
            low = middle
    return datetime.fromtimestamp(high, UTC)


def local_time(instant: datetime, zone: ZoneInfo) -> datetime:
    """Naive wall-clock time in ``zone`` of an aware instant."""
    return instant.astimezone(zone).replace(tzinfo=None)


def fire_times_after(
    expression: str, zone: ZoneInfo, after: datetime, until: datetime | None = None
) -> Iterator[FireTime]:
    """Fire times with ``after < instant`` (``<= until`` when given), oldest first.

    Each instant is yielded once, even where several wall-clock times share it (a gap).
    """
    cursor = croniter(expression, local_time(after, zone) - _OFFSET_MARGIN)
    last: datetime | None = None
    while True:
        try:
            local = cursor.get_next(datetime)
        except CroniterBadDateError:  # the expression never fires again
            return
        instant = to_instant(local, zone)
        if until is not None and instant > until:
            return  # instants never decrease as wall-clock time grows: nothing later is due
        if instant <= after or instant == last:
            continue
        last = instant
        yield FireTime(local=local, instant=instant)


def latest_fire_time(expression: str, zone: ZoneInfo, now: datetime) -> FireTime | None:
    """The most recent fire time with ``instant <= now``; None if the cron never fired before.

    Walks back from a little past ``now``'s wall-clock time: the instant of a wall-clock time
    never decreases as the wall-clock time grows, so the first one at or before ``now`` is the
    latest. Of several wall-clock times sharing that instant (a gap) the earliest is returned,
    as ``fire_times_after`` does, so both name the firing by the same key.
    """
    cursor = croniter(expression, local_time(now, zone) + _OFFSET_MARGIN)
    found: FireTime | None = None
    while True:
        try:
            local = cursor.get_prev(datetime)
        except CroniterBadDateError:
            return found
        instant = to_instant(local, zone)
        if found is not None and instant != found.instant:
            return found
        if instant <= now:
            found = FireTime(local=local, instant=instant)


def next_fire_time(expression: str, zone: ZoneInfo, now: datetime) -> FireTime | None:
    """The first fire time strictly after ``now``; None if the cron never fires again."""
    return next(fire_times_after(expression, zone, now), None)


def fire_key(fire: FireTime, zone: ZoneInfo) -> str:
    """The firing's identity: its wall-clock time and zone. Both passes through a repeated hour
    give the same key, which is what makes the database's unique constraint fire them once."""
    return f"{fire.local.isoformat(timespec='minutes')} {zone.key}"


def study_name(schedule: str, fire: FireTime, at_most_daily: bool) -> str:
    """``{schedule}-{YYYY-MM-DD}`` by local date; with ``-HHMM`` when the cron fires more often."""
    name = f"{schedule}-{fire.local:%Y-%m-%d}"
    return name if at_most_daily else f"{name}-{fire.local:%H%M}"


def manual_study_name(schedule: str, now: datetime, zone: ZoneInfo) -> str:
    """A run started by hand: ``{schedule}-{YYYY-MM-DD}-manual-{HHMMSS}`` in local time."""
    return f"{schedule}-{local_time(now, zone):%Y-%m-%d-manual-%H%M%S}"
