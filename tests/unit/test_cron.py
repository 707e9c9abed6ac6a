"""Cron expressions as a FineTuneSchedule reads them: fields, names, the day-of-month/day-of-week OR rule,
macros, leap days, time zones across DST changes, missed runs; invalid expressions name the field."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest
from finetune_operator.finetuneschedule import cron

BERLIN = ZoneInfo("Europe/Berlin")
NEW_YORK = ZoneInfo("America/New_York")


def utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)  # type: ignore[misc]


def fires(expression: str, after: datetime, n: int, zone: ZoneInfo | None = None) -> list[datetime]:
    parsed, found, current = cron.parse(expression), [], after
    for _ in range(n):
        nxt = cron.next_after(parsed, current, zone or UTC)  # type: ignore[arg-type]
        assert nxt is not None
        found.append(nxt)
        current = nxt
    return found


def test_every_monday_at_three() -> None:
    # 2026-12-06 is a Sunday
    assert fires("0 3 * * 1", utc(2026, 12, 6, 12), 2) == [utc(2026, 12, 7, 3), utc(2026, 12, 14, 3)]


def test_next_is_strictly_after() -> None:
    assert fires("0 3 * * *", utc(2026, 12, 7, 3), 1) == [utc(2026, 12, 8, 3)]


def test_steps_ranges_and_lists() -> None:
    assert fires("*/20 9-10 * * *", utc(2026, 1, 1), 7) == [
        utc(2026, 1, 1, 9, 0), utc(2026, 1, 1, 9, 20), utc(2026, 1, 1, 9, 40),
        utc(2026, 1, 1, 10, 0), utc(2026, 1, 1, 10, 20), utc(2026, 1, 1, 10, 40),
        utc(2026, 1, 2, 9, 0),
    ]  # fmt: skip
    assert fires("5,10-12/2 0 * * *", utc(2026, 1, 1), 3) == [
        utc(2026, 1, 1, 0, 5), utc(2026, 1, 1, 0, 10), utc(2026, 1, 1, 0, 12)
    ]  # fmt: skip
    assert fires("30 1/6 * * *", utc(2026, 1, 1), 4)[-1] == utc(2026, 1, 1, 19, 30)  # n/step: n to the end


def test_month_and_day_names_case_insensitive() -> None:
    assert cron.parse("0 0 1 JAN-mar,Dec *").months == frozenset({1, 2, 3, 12})
    assert cron.parse("0 0 * * MON-Fri").weekdays == frozenset({1, 2, 3, 4, 5})
    assert cron.parse("0 0 * * 7").weekdays == frozenset({0})  # 7 is Sunday too


def test_day_of_month_or_day_of_week_when_both_restricted() -> None:
    # the 13th or any Friday: 2026-02-06 (Fri), 2026-02-13 (Fri and 13th), 2026-02-20 (Fri), 2026-03-06 ...
    got = fires("0 0 13 * 5", utc(2026, 2, 1), 4)
    assert got == [utc(2026, 2, 6), utc(2026, 2, 13), utc(2026, 2, 20), utc(2026, 2, 27)]
    assert fires("0 0 13 * 5", utc(2026, 3, 7), 1) == [utc(2026, 3, 13)]  # a Friday the 13th
    assert fires("0 0 12 * 5", utc(2026, 3, 7), 1) == [utc(2026, 3, 12)]  # a Thursday: dom alone matches


def test_a_star_day_field_means_and() -> None:
    # dom `*` (or `*/2`): only the weekday restricts
    assert fires("0 0 * * 5", utc(2026, 2, 1), 1) == [utc(2026, 2, 6)]
    assert fires("0 0 */2 * 1", utc(2026, 2, 1), 2) == [
        utc(2026, 2, 9),
        utc(2026, 2, 23),
    ]  # odd days, Mondays


def test_feb_29_fires_only_in_leap_years() -> None:
    assert fires("0 12 29 2 *", utc(2026, 3, 1), 2) == [utc(2028, 2, 29, 12), utc(2032, 2, 29, 12)]


def test_a_day_that_never_exists_never_fires() -> None:
    assert cron.next_after(cron.parse("0 0 30 2 *"), utc(2026, 1, 1)) is None


@pytest.mark.parametrize(
    ("macro", "expected"),
    [
        ("@hourly", utc(2026, 5, 5, 11)),
        ("@daily", utc(2026, 5, 6)),
        ("@midnight", utc(2026, 5, 6)),
        ("@weekly", utc(2026, 5, 10)),
        ("@monthly", utc(2026, 6, 1)),
        ("@yearly", utc(2027, 1, 1)),
        ("@annually", utc(2027, 1, 1)),
    ],
)
def test_macros(macro: str, expected: datetime) -> None:
    assert fires(macro, utc(2026, 5, 5, 10, 30), 1) == [expected]


def test_time_zone_wall_clock() -> None:
    # without a zone: UTC; 03:00 in Berlin is 02:00 UTC in winter, 01:00 UTC in summer
    assert fires("0 3 * * *", utc(2026, 1, 10), 1) == [utc(2026, 1, 10, 3)]  # default UTC
    assert fires("0 3 * * *", utc(2026, 7, 10), 1, BERLIN) == [utc(2026, 7, 10, 1)]
    assert fires("0 3 * * *", utc(2026, 1, 10), 1, BERLIN) == [utc(2026, 1, 10, 2)]


def test_spring_forward_gap_fires_once_right_after_the_gap() -> None:
    # Berlin 2026-03-29: 02:00 CET → 03:00 CEST (01:00 UTC); 02:30 does not exist that day
    got = fires("30 2 * * *", utc(2026, 3, 28, 12), 2, BERLIN)
    assert got == [utc(2026, 3, 29, 1, 0), utc(2026, 3, 30, 0, 30)]
    assert got[0].astimezone(BERLIN).hour == 3 and got[0].astimezone(BERLIN).minute == 0
    # every 15 minutes: the skipped hour's times collapse into one run at 03:00
    quarter = fires("*/15 * * * *", utc(2026, 3, 29, 0, 40), 3, BERLIN)
    assert quarter == [utc(2026, 3, 29, 0, 45), utc(2026, 3, 29, 1, 0), utc(2026, 3, 29, 1, 15)]


def test_fall_back_overlap_fires_once_at_the_first_occurrence() -> None:
    # Berlin 2026-10-25: 03:00 CEST → 02:00 CET (01:00 UTC); 02:30 happens twice
    got = fires("30 2 * * *", utc(2026, 10, 24, 12), 2, BERLIN)
    assert got == [utc(2026, 10, 25, 0, 30), utc(2026, 10, 26, 1, 30)]
    # New York 2026-11-01: 01:30 EDT (05:30 UTC) and 01:30 EST (06:30 UTC): only the first
    assert fires("30 1 * * *", utc(2026, 11, 1), 2, NEW_YORK) == [
        utc(2026, 11, 1, 5, 30),
        utc(2026, 11, 2, 6, 30),
    ]


@pytest.mark.parametrize(
    ("expression", "named"),
    [
        ("0 3 * *", "expected 5 fields"),
        ("0 3 * * * *", "expected 5 fields"),
        ("60 * * * *", "minute field: 60 is outside 0-59"),
        ("0 24 * * *", "hour field: 24 is outside 0-23"),
        ("0 0 0 * *", "day of month field: 0 is outside 1-31"),
        ("0 0 * 13 *", "month field: 13 is outside 1-12"),
        ("0 0 * * 8", "day of week field: 8 is outside 0-7"),
        ("0 0 * foo *", "month field: 'foo' is not a number or a name"),
        ("0 0 * * mon-", "day of week field"),
        ("*/0 * * * *", "minute field: step '0' must be a positive number"),
        ("5-1 * * * *", "minute field: range '5-1' runs backwards"),
        ("1,,2 * * * *", "minute field: empty list item"),
        ("@every5m", "unknown macro"),
        ("0 x * * *", "hour field: 'x' is not a number"),
    ],
)
def test_invalid_expressions_name_the_field(expression: str, named: str) -> None:
    with pytest.raises(cron.CronError, match=named.replace("(", r"\(")):
        cron.parse(expression)


def test_missed_runs_count_and_newest() -> None:
    daily = cron.parse("0 3 * * *")
    count, newest = cron.fire_times(daily, utc(2026, 1, 1, 4), utc(2026, 1, 5, 12))
    assert (count, newest) == (4, utc(2026, 1, 5, 3))
    assert cron.fire_times(daily, utc(2026, 1, 5, 3), utc(2026, 1, 5, 12)) == (0, None)


def test_many_missed_runs_stop_counting_but_find_the_newest() -> None:
    every_minute = cron.parse("* * * * *")
    count, newest = cron.fire_times(every_minute, utc(2026, 1, 1), utc(2026, 3, 1, 0, 0, 30), limit=100)
    assert count == 101 and newest == utc(2026, 3, 1)


def test_newest_at_or_before_across_a_gap() -> None:
    got = cron.last_at_or_before(cron.parse("30 2 * * *"), utc(2026, 3, 29, 1, 5), BERLIN)
    assert got == utc(2026, 3, 29, 1, 0)
    assert cron.last_at_or_before(cron.parse("30 2 * * *"), utc(2026, 3, 29, 0, 59), BERLIN) == (
        utc(2026, 3, 28, 1, 30)
    )
    assert cron.next_after(cron.parse("0 0 * * *"), utc(2026, 1, 1) - timedelta(seconds=1)) == utc(2026, 1, 1)
