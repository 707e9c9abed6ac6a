"""Five-field cron expressions and their fire times in a time zone, as Kubernetes CronJob reads them.

Fields: minute (0-59), hour (0-23), day of month (1-31), month (1-12 or jan-dec), day of week (0-7, 0 and
7 are Sunday, or sun-sat); each a list of `*`, `n`, `a-b`, with an optional `/step`. When both day of month
and day of week are restricted (neither starts with `*`) a day matches either (cron's OR rule).
Macros: @yearly (@annually), @monthly, @weekly, @daily (@midnight), @hourly.

Wall-clock times in a time zone: a time that does not exist (the spring-forward gap) fires once at the
first instant after the gap; a time that exists twice (fall-back) fires once, at its first occurrence.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta, tzinfo

MONTHS = ("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec")
DAYS = ("sun", "mon", "tue", "wed", "thu", "fri", "sat")
MACROS = {
    "@yearly": "0 0 1 1 *",
    "@annually": "0 0 1 1 *",
    "@monthly": "0 0 1 * *",
    "@weekly": "0 0 * * 0",
    "@daily": "0 0 * * *",
    "@midnight": "0 0 * * *",
    "@hourly": "0 * * * *",
}
# (name, low, high, names): names[i] stands for low + i
_FIELDS = (
    ("minute", 0, 59, ()),
    ("hour", 0, 23, ()),
    ("day of month", 1, 31, ()),
    ("month", 1, 12, MONTHS),
    ("day of week", 0, 7, DAYS),
)
SEARCH_DAYS = 366 * 9  # Feb 29 on a given weekday-free rule recurs within 8 years (2096 → 2104)


class CronError(ValueError):
    """An expression that is not cron; the message names the field and the part."""


@dataclass(frozen=True)
class Cron:
    minutes: frozenset[int]
    hours: frozenset[int]
    days: frozenset[int]
    months: frozenset[int]
    weekdays: frozenset[int]  # 0 = Sunday
    days_restricted: bool
    weekdays_restricted: bool

    def day_matches(self, day: date) -> bool:
        if day.month not in self.months:
            return False
        dom = day.day in self.days
        dow = (day.isoweekday() % 7) in self.weekdays
        if self.days_restricted and self.weekdays_restricted:
            return dom or dow
        return dom and dow


def _value(text: str, low: int, high: int, names: tuple[str, ...], field: str) -> int:
    lowered = text.lower()
    if lowered in names:
        return low + names.index(lowered)
    if not text.isdigit():
        raise CronError(f"{field} field: {text!r} is not a number" + (" or a name" if names else ""))
    value = int(text)
    if not low <= value <= high:
        raise CronError(f"{field} field: {value} is outside {low}-{high}")
    return value


def _part(part: str, low: int, high: int, names: tuple[str, ...], field: str) -> set[int]:
    base, slash, step_text = part.partition("/")
    step = 1
    if slash:
        if not step_text.isdigit() or int(step_text) == 0:
            raise CronError(f"{field} field: step {step_text!r} must be a positive number")
        step = int(step_text)
    if base == "*":
        first, last = low, high
    elif "-" in base:
        a, _, b = base.partition("-")
        first, last = _value(a, low, high, names, field), _value(b, low, high, names, field)
        if first > last:
            raise CronError(f"{field} field: range {base!r} runs backwards")
    else:
        first = _value(base, low, high, names, field)
        last = high if slash else first
    return set(range(first, last + 1, step))


def _field(text: str, index: int) -> frozenset[int]:
    field, low, high, names = _FIELDS[index]
    values: set[int] = set()
    for part in text.split(","):
        if not part:
            raise CronError(f"{field} field: empty list item in {text!r}")
        values |= _part(part, low, high, names, field)
    return frozenset(values)


def parse(expression: str) -> Cron:
    """Parse a cron expression or macro; CronError names the field that is wrong."""
    text = expression.strip()
    if text.startswith("@"):
        if text.lower() not in MACROS:
            raise CronError(f"unknown macro {text!r}: use one of {', '.join(sorted(MACROS))}")
        text = MACROS[text.lower()]
    parts = text.split()
    if len(parts) != 5:
        raise CronError(f"expected 5 fields (minute hour day-of-month month day-of-week), got {len(parts)}")
    minutes, hours, days, months, weekdays = (_field(p, i) for i, p in enumerate(parts))
    weekdays = frozenset(d % 7 for d in weekdays)
    return Cron(
        minutes, hours, days, months, weekdays, not parts[2].startswith("*"), not parts[4].startswith("*")
    )


def _instant(wall: datetime, zone: tzinfo) -> datetime:
    """The UTC instant a wall-clock time fires at: its first occurrence, or the end of a DST gap."""
    first = wall.replace(tzinfo=zone, fold=0).astimezone(UTC)
    if first.astimezone(zone).replace(tzinfo=None) == wall:
        return first
    # In a gap: fold=1 reads it with the offset after the change (an instant before it); walk to the change.
    instant = wall.replace(tzinfo=zone, fold=1).astimezone(UTC).replace(second=0, microsecond=0)
    while instant.astimezone(zone).replace(tzinfo=None) < wall and instant < first:
        instant += timedelta(minutes=1)
    return instant


def _walls(cron: Cron, start: datetime) -> Iterator[datetime]:
    """Matching wall-clock times from `start` (naive, inclusive) on, in order."""
    day = start.date()
    for _ in range(SEARCH_DAYS):
        if cron.day_matches(day):
            for hour in sorted(cron.hours):
                for minute in sorted(cron.minutes):
                    wall = datetime(day.year, day.month, day.day, hour, minute)
                    if wall >= start:
                        yield wall
        day += timedelta(days=1)


def next_after(cron: Cron, after: datetime, zone: tzinfo = UTC) -> datetime | None:
    """The first fire time strictly after `after` (aware), as an aware UTC datetime; None within 9 years."""
    local = after.astimezone(zone).replace(tzinfo=None, second=0, microsecond=0)
    for wall in _walls(cron, local - timedelta(hours=3)):  # a fall-back hour may repeat walls before `local`
        instant = _instant(wall, zone)
        if instant > after:
            return instant
    return None


def last_at_or_before(cron: Cron, until: datetime, zone: tzinfo = UTC) -> datetime | None:
    """The newest fire time at or before `until` (aware), within 9 years."""
    local = until.astimezone(zone).replace(tzinfo=None)
    day = local.date() + timedelta(days=1)  # a gap's fire time may lie after its wall time
    for _ in range(SEARCH_DAYS):
        if cron.day_matches(day):
            for hour in sorted(cron.hours, reverse=True):
                for minute in sorted(cron.minutes, reverse=True):
                    instant = _instant(datetime(day.year, day.month, day.day, hour, minute), zone)
                    if instant <= until:
                        return instant
        day -= timedelta(days=1)
    return None


def fire_times(
    cron: Cron, after: datetime, until: datetime, zone: tzinfo = UTC, limit: int = 100
) -> tuple[int, datetime | None]:
    """(how many fire times lie in (after, until], the newest of them); the count stops at `limit` + 1
    (more than `limit` missed: CronJob's bound too)."""
    count, newest, current = 0, None, after
    while count <= limit:
        nxt = next_after(cron, current, zone)
        if nxt is None or nxt > until:
            return count, newest
        count, newest, current = count + 1, nxt, nxt
    return count, last_at_or_before(cron, until, zone)
