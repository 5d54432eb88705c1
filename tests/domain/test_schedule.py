from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from capacitor_trio.domain.schedule import (
    Schedule,
    ScheduleError,
    Window,
    parse_schedule,
    parse_window,
    schedule_gate,
)

BERLIN = ZoneInfo("Europe/Berlin")
NEW_YORK = ZoneInfo("America/New_York")


def at(zone, *args, fold=0):
    return datetime(*args, tzinfo=zone, fold=fold)


# --- parsing -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "start", "end"),
    [
        ("13:30 - 17:00", 13 * 60 + 30, 17 * 60),
        ("19:00-23:59", 19 * 60, 23 * 60 + 59),
        ("7:30 - 9:00", 7 * 60 + 30, 9 * 60),
        ("  00:00   -   06:00  ", 0, 6 * 60),
        ("\t22:00 -06:00\n", 22 * 60, 6 * 60),
        ("08:00 \u2013 09:00", 8 * 60, 9 * 60),
        ("12:00 - 12:00", 12 * 60, 12 * 60),
    ],
)
def test_parse_window_accepts(text, start, end):
    assert parse_window(text) == Window(start, end)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "   ",
        "13:30",
        "13:30 - ",
        "13:30:00 - 17:00:00",
        "13:30 - 17:00:00",
        "24:00 - 01:00",
        "23:00 - 24:00",
        "12:60 - 13:00",
        "12:00 - 13:7",
        "1330 - 1700",
        "13.30 - 17.00",
        "1:30 pm - 5:00 pm",
        "13:30 - 17:00 - 18:00",
        "13:30 17:00",
        "-1:00 - 02:00",
        "\u0661\u0662:00 - 13:00",  # Arabic-Indic digits are not hours
        "always",
    ],
)
def test_parse_window_rejects_with_entry_named(text):
    with pytest.raises(ScheduleError) as info:
        parse_window(text)
    assert repr(text) in str(info.value)
    assert isinstance(info.value, ValueError)


def test_parse_window_out_of_range_messages():
    with pytest.raises(ScheduleError, match="start hour 25"):
        parse_window("25:00 - 01:00")
    with pytest.raises(ScheduleError, match="end minute 61"):
        parse_window("01:00 - 02:61")


def test_parse_window_rejects_non_string():
    with pytest.raises(ScheduleError, match="810"):
        parse_window(810)  # type: ignore[arg-type]  # what YAML 1.1 makes of a bare 13:30


def test_parse_schedule():
    assert parse_schedule([]) == Schedule()
    assert parse_schedule(None) == Schedule()
    s = parse_schedule(["19:00 - 23:59", "00:00 - 06:00"])
    assert s.windows == (Window(19 * 60, 23 * 60 + 59), Window(0, 6 * 60))
    assert s.entries() == ("19:00 - 23:59", "00:00 - 06:00")
    assert parse_schedule(["7:30-9:00"]).entries() == ("07:30 - 09:00",)


def test_parse_schedule_names_bad_entry():
    with pytest.raises(ScheduleError, match="'25:00 - 26:00'"):
        parse_schedule(["13:30 - 17:00", "25:00 - 26:00"])


def test_parse_schedule_rejects_bare_string():
    with pytest.raises(ScheduleError, match="list"):
        parse_schedule("13:30 - 17:00")


def test_window_validates_range():
    with pytest.raises(ValueError):
        Window(0, 1440)
    with pytest.raises(ValueError):
        Window(-1, 5)


# --- is_open ---------------------------------------------------------------------------------


def test_empty_schedule_always_open():
    s = Schedule()
    assert s.is_open(at(UTC, 2024, 1, 1, 3, 0))
    assert s.always_open
    assert s.next_change(at(UTC, 2024, 1, 1, 3, 0)) is None


def test_end_minute_inclusive():
    s = parse_schedule(["13:30 - 17:00"])
    assert not s.is_open(at(UTC, 2024, 5, 1, 13, 29, 59))
    assert s.is_open(at(UTC, 2024, 5, 1, 13, 30))
    assert s.is_open(at(UTC, 2024, 5, 1, 17, 0, 59, 999999))
    assert not s.is_open(at(UTC, 2024, 5, 1, 17, 1))


def test_whole_day_is_always_open():
    s = parse_schedule(["00:00 - 23:59"])
    assert s.always_open
    assert s.next_change(at(BERLIN, 2024, 3, 31, 1, 0)) is None
    assert parse_schedule(["22:00 - 21:59"]).always_open
    assert parse_schedule(["00:00 - 11:59", "12:00 - 23:59"]).always_open
    assert not parse_schedule(["00:00 - 11:59", "12:01 - 23:59"]).always_open


def test_single_minute_window():
    s = parse_schedule(["12:00 - 12:00"])
    assert s.is_open(at(UTC, 2024, 5, 1, 12, 0, 30))
    assert not s.is_open(at(UTC, 2024, 5, 1, 12, 1))
    assert not s.is_open(at(UTC, 2024, 5, 1, 11, 59, 59))
    assert s.next_change(at(UTC, 2024, 5, 1, 12, 0, 30)) == at(UTC, 2024, 5, 1, 12, 1)


def test_wrapping_window():
    s = parse_schedule(["22:00 - 06:00"])
    assert s.is_open(at(UTC, 2024, 5, 1, 23, 0))
    assert s.is_open(at(UTC, 2024, 5, 2, 0, 0))
    assert s.is_open(at(UTC, 2024, 5, 2, 6, 0, 59))
    assert not s.is_open(at(UTC, 2024, 5, 2, 6, 1))
    assert not s.is_open(at(UTC, 2024, 5, 2, 21, 59, 59))
    assert s.next_change(at(UTC, 2024, 5, 1, 23, 0)) == at(UTC, 2024, 5, 2, 6, 1)
    assert s.next_change(at(UTC, 2024, 5, 2, 12, 0)) == at(UTC, 2024, 5, 2, 22, 0)


def test_union_of_windows_and_adjacent_windows_merge():
    s = parse_schedule(["19:00 - 23:59", "00:00 - 06:00"])
    # 23:59 inclusive + 00:00: one continuous opening, no flip at midnight
    assert s.next_change(at(UTC, 2024, 5, 1, 20, 0)) == at(UTC, 2024, 5, 2, 6, 1)
    assert s.next_change(at(UTC, 2024, 5, 2, 7, 0)) == at(UTC, 2024, 5, 2, 19, 0)


def test_time_zone_is_respected():
    s = parse_schedule(["09:00 - 17:00"])
    instant = at(UTC, 2024, 7, 1, 7, 30)  # 09:30 in Berlin (CEST), 03:30 in New York (EDT)
    assert s.is_open(instant, BERLIN)
    assert not s.is_open(instant, NEW_YORK)
    assert not s.is_open(instant)  # read on UTC
    assert s.next_change(instant, NEW_YORK) == at(NEW_YORK, 2024, 7, 1, 9, 0)
    assert s.next_change(instant, NEW_YORK).tzinfo is UTC


def test_fixed_offset_timezone():
    plus_five_thirty = timezone(timedelta(hours=5, minutes=30))
    s = parse_schedule(["09:00 - 17:00"])
    instant = at(UTC, 2024, 7, 1, 3, 30)  # 09:00 in India
    assert s.is_open(instant, plus_five_thirty)
    assert s.next_change(at(UTC, 2024, 7, 1, 0, 0), plus_five_thirty) == instant


def test_naive_datetime_refused():
    with pytest.raises(ValueError, match="aware"):
        Schedule().is_open(datetime(2024, 1, 1))


# --- DST -------------------------------------------------------------------------------------


def test_berlin_spring_forward_window_in_skipped_hour_does_not_happen():
    # 2024-03-31 02:00 CET -> 03:00 CEST; 02:00-02:59 never appears on the wall clock
    s = parse_schedule(["02:15 - 02:45"])
    before = at(BERLIN, 2024, 3, 31, 1, 0)
    assert s.next_change(before) == at(BERLIN, 2024, 4, 1, 2, 15)


def test_berlin_spring_forward_window_cut_by_the_jump():
    s = parse_schedule(["01:30 - 02:30"])
    open_at = at(BERLIN, 2024, 3, 31, 1, 45)
    assert s.is_open(open_at)
    change = s.next_change(open_at)
    # closes at the transition instant (01:00 UTC), when the clock jumps to 03:00
    assert change == datetime(2024, 3, 31, 1, 0, tzinfo=UTC)
    local = change.astimezone(BERLIN)
    assert (local.hour, local.minute) == (3, 0)
    assert not s.is_open(change, BERLIN)


def test_berlin_spring_forward_window_opened_by_the_jump():
    s = parse_schedule(["02:30 - 04:00"])
    change = s.next_change(at(BERLIN, 2024, 3, 31, 1, 0))
    assert change == datetime(2024, 3, 31, 1, 0, tzinfo=UTC)  # opens at the jump to 03:00
    assert s.is_open(change, BERLIN)
    assert s.next_change(change, BERLIN) == at(BERLIN, 2024, 3, 31, 4, 1)
    # the window lasted one hour and a minute of real time that day
    assert s.next_change(change, BERLIN).timestamp() - change.timestamp() == 61 * 60


def test_berlin_fall_back_window_in_repeated_hour_opens_twice():
    # 2024-10-27 03:00 CEST -> 02:00 CET; 02:00-02:59 happens twice
    s = parse_schedule(["02:10 - 02:20"])
    t = at(BERLIN, 2024, 10, 26, 12, 0)
    flips = []
    for _ in range(4):
        t = s.next_change(t, BERLIN)
        flips.append(t)
    assert flips == [
        datetime(2024, 10, 27, 0, 10, tzinfo=UTC),
        datetime(2024, 10, 27, 0, 21, tzinfo=UTC),
        datetime(2024, 10, 27, 1, 10, tzinfo=UTC),
        datetime(2024, 10, 27, 1, 21, tzinfo=UTC),
    ]


def test_new_york_wrapping_window_across_fall_back():
    # 2024-11-03 02:00 EDT -> 01:00 EST; a night window is an hour longer that night
    s = parse_schedule(["22:00 - 06:00"])
    opened = at(NEW_YORK, 2024, 11, 2, 22, 0)
    closed = s.next_change(opened)
    assert closed == at(NEW_YORK, 2024, 11, 3, 6, 1)
    assert closed.timestamp() - opened.timestamp() == (9 * 60 + 1) * 60


def test_new_york_wrapping_window_across_spring_forward():
    s = parse_schedule(["22:00 - 06:00"])
    opened = at(NEW_YORK, 2024, 3, 9, 22, 0)
    closed = s.next_change(opened)
    assert closed == at(NEW_YORK, 2024, 3, 10, 6, 1)
    assert closed.timestamp() - opened.timestamp() == (7 * 60 + 1) * 60


# --- gate helper and precedence ----------------------------------------------------------------


def test_schedule_gate_epoch():
    s = parse_schedule(["22:00 - 06:00"])
    now = datetime(2024, 5, 1, 12, 0, tzinfo=BERLIN).timestamp()
    is_open, change = schedule_gate(s, BERLIN, now)
    assert not is_open
    assert change == datetime(2024, 5, 1, 22, 0, tzinfo=BERLIN).timestamp()
    assert change - now == 10 * 3600
    assert schedule_gate(Schedule(), BERLIN, now) == (True, None)
    assert schedule_gate(s, UTC, 0.5) == (True, 6 * 3600 + 60.0)


# --- properties ----------------------------------------------------------------------------------

ZONES = [
    UTC,
    BERLIN,
    NEW_YORK,
    ZoneInfo("Australia/Lord_Howe"),  # 30-minute DST shift
    ZoneInfo("America/St_Johns"),  # half-hour offset
    ZoneInfo("Pacific/Apia"),  # skipped 2011-12-30 entirely
]

windows = st.builds(Window, st.integers(0, 1439), st.integers(0, 1439))
schedules = st.lists(windows, min_size=1, max_size=3).map(lambda ws: Schedule(tuple(ws)))
instants = st.datetimes(
    min_value=datetime(2011, 12, 25), max_value=datetime(2030, 12, 31), timezones=st.just(UTC)
)
# bias towards DST transition days
dst_instants = st.sampled_from(
    [
        datetime(2024, 3, 30, 20, 0, tzinfo=UTC),
        datetime(2024, 10, 26, 20, 0, tzinfo=UTC),
        datetime(2024, 3, 10, 0, 0, tzinfo=UTC),
        datetime(2024, 11, 2, 20, 0, tzinfo=UTC),
        datetime(2024, 4, 6, 10, 0, tzinfo=UTC),
        datetime(2024, 10, 5, 10, 0, tzinfo=UTC),
        datetime(2011, 12, 29, 0, 0, tzinfo=UTC),
    ]
).flatmap(lambda d: st.integers(0, 36 * 3600).map(lambda s: d + timedelta(seconds=s)))


def _brute_next_change(s: Schedule, t: datetime, zone) -> datetime | None:
    state = s.is_open(t, zone)
    probe = t.replace(second=0, microsecond=0) + timedelta(minutes=1)
    for _ in range(4 * 24 * 60):
        if s.is_open(probe, zone) != state:
            return probe
        probe += timedelta(minutes=1)
    return None


@settings(max_examples=120, deadline=None)
@given(schedules, st.one_of(instants, dst_instants), st.sampled_from(ZONES))
def test_next_change_matches_minute_by_minute_scan(s, t, zone):
    expected = _brute_next_change(s, t, zone)
    got = s.next_change(t, zone)
    if s.always_open:
        assert got is None
        assert expected is None
        return
    assert got is not None
    assert got == expected
    assert got > t
    assert s.is_open(got, zone) != s.is_open(t, zone)
    # still the old state one microsecond before the flip
    just_before = got.astimezone(UTC) - timedelta(microseconds=1)
    assert s.is_open(just_before, zone) == s.is_open(t, zone)


@settings(max_examples=200, deadline=None)
@given(windows, st.integers(0, 1439))
def test_window_contains_matches_definition(w, minute):
    length = (w.end - w.start) % 1440 + 1
    assert w.contains(minute) == ((minute - w.start) % 1440 < length)


@given(windows)
def test_window_roundtrip(w):
    assert parse_window(str(w)) == w
