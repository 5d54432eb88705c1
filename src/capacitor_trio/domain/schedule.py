"""ProcessSchedule: daily delivery windows (capacitor-behaviour.md §4).

A schedule is a list of entries ``HH:MM - HH:MM`` (24-hour clock). Capacitor leaves most of the
semantics undocumented; these are our choices (also in docs/behaviour.md):

* Windows are daily and read on the wall clock of the configured IANA time zone (``timeZone``).
  Whether "now" is inside a window depends only on the local wall-clock minute, so across a DST
  change a window simply follows the clock: a window inside the skipped hour does not happen that
  day, and one inside the repeated hour is open both times round.
* The end minute is inclusive: ``13:30 - 17:00`` is open from 13:30:00 through 17:00:59, so
  ``00:00 - 23:59`` is the whole day.
* An end before the start wraps past midnight: ``22:00 - 06:00`` is open from 22:00 through 06:00:59
  the next morning. Start equal to end is that one minute.
* Several entries are a union. An empty schedule means always open.
* A node's schedule replaces the global one when the node has one (no intersection); see
  ``config.models.effective``.
* Entry whitespace is tolerated (``19:00-23:59``, `` 7:30 -  9:00``, an en dash); seconds,
  out-of-range fields and anything else are a :class:`ScheduleError` naming the entry.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from datetime import UTC, date, datetime, time, timedelta, tzinfo
from zoneinfo import ZoneInfo

import attrs

MINUTES_PER_DAY = 24 * 60

_ENTRY = re.compile(
    r"""^\s*
    (?P<sh>[0-9]{1,2}):(?P<sm>[0-9]{2})
    \s*[-\u2013]\s*
    (?P<eh>[0-9]{1,2}):(?P<em>[0-9]{2})
    \s*$""",
    re.VERBOSE,
)


class ScheduleError(ValueError):
    """A ProcessSchedule entry that cannot be parsed."""


def _fmt(minute: int) -> str:
    return f"{minute // 60:02d}:{minute % 60:02d}"


@attrs.frozen
class Window:
    """One daily window, as minutes of the day; ``end`` is inclusive and may be before ``start``."""

    start: int = attrs.field(
        validator=attrs.validators.and_(
            attrs.validators.ge(0), attrs.validators.lt(MINUTES_PER_DAY)
        )
    )
    end: int = attrs.field(
        validator=attrs.validators.and_(
            attrs.validators.ge(0), attrs.validators.lt(MINUTES_PER_DAY)
        )
    )

    @property
    def wraps(self) -> bool:
        """True when the window runs past midnight (end before start)."""
        return self.end < self.start

    def contains(self, minute_of_day: int) -> bool:
        """Whether the wall-clock minute ``minute_of_day`` (0..1439) is inside the window."""
        if self.wraps:
            return minute_of_day >= self.start or minute_of_day <= self.end
        return self.start <= minute_of_day <= self.end

    def __str__(self) -> str:
        return f"{_fmt(self.start)} - {_fmt(self.end)}"


def _to_windows(windows: Iterable[Window]) -> tuple[Window, ...]:
    return tuple(windows)


@attrs.frozen
class Schedule:
    """A union of daily windows; no windows means always open."""

    windows: tuple[Window, ...] = attrs.field(default=(), converter=_to_windows)

    @property
    def always_open(self) -> bool:
        """True when the windows cover every minute of the day (or there are none)."""
        return not self._edges()

    def entries(self) -> tuple[str, ...]:
        """The windows in the canonical ``HH:MM - HH:MM`` spelling (for the API and config)."""
        return tuple(str(w) for w in self.windows)

    def open_at_minute(self, minute_of_day: int) -> bool:
        """Whether the schedule is open at a wall-clock minute of the day."""
        if not self.windows:
            return True
        return any(w.contains(minute_of_day) for w in self.windows)

    def is_open(self, at: datetime, tz: tzinfo | None = None) -> bool:
        """Whether deliveries may run at the instant ``at`` (an aware datetime).

        Windows are read on the wall clock of ``tz`` when given, else of ``at``'s own tzinfo
        (so pass ``datetime.now(zone)`` or give ``tz``).
        """
        local = _localise(at, tz)
        return self.open_at_minute(local.hour * 60 + local.minute)

    def next_change(self, at: datetime, tz: tzinfo | None = None) -> datetime | None:
        """The first instant after ``at`` at which :meth:`is_open` flips, or None if it never does.

        The result is an aware datetime in UTC: local times near a DST change are ambiguous, and
        Python compares and subtracts same-zone datetimes on the wall clock, so UTC is the only
        safe currency (convert with ``.astimezone(zone)`` for display). It is exact to the second,
        including DST transitions, where the flip can happen at the transition instant itself.
        """
        zone = tz if tz is not None else at.tzinfo
        local = _localise(at, tz)
        assert zone is not None  # _localise rejected naive datetimes
        edges = self._edges()
        if not edges:
            return None
        now_utc = at.astimezone(UTC)
        state = self.open_at_minute(local.hour * 60 + local.minute)
        first_day = local.date() - timedelta(days=1)
        # A flip is due within a day or two in any real zone; look a block of days at a time so a
        # skipped calendar day (Samoa 2011) is no trouble either.
        for block in range(0, 366, 8):
            start_day = first_day + timedelta(days=block)
            candidates = sorted({t for t in _candidates(edges, zone, start_day, 9) if t > now_utc})
            for t in candidates:
                t_local = t.astimezone(zone)
                if self.open_at_minute(t_local.hour * 60 + t_local.minute) != state:
                    return t
        return None  # pragma: no cover - unreachable with real zones

    def _edges(self) -> tuple[int, ...]:
        """Minutes of the day at which the open/closed state differs from the minute before."""
        if not self.windows:
            return ()
        points = {w.start for w in self.windows} | {
            (w.end + 1) % MINUTES_PER_DAY for w in self.windows
        }
        return tuple(
            sorted(
                m
                for m in points
                if self.open_at_minute(m) != self.open_at_minute((m - 1) % MINUTES_PER_DAY)
            )
        )


def _localise(at: datetime, tz: tzinfo | None) -> datetime:
    if at.tzinfo is None or at.utcoffset() is None:
        raise ValueError(f"schedule times must be timezone-aware, got naive {at!r}")
    return at.astimezone(tz) if tz is not None else at


def _candidates(
    edges: Iterable[int], zone: tzinfo, start_day: date, days: int
) -> Iterable[datetime]:
    """UTC instants where the schedule may flip: every edge wall time (both folds) and every
    UTC-offset transition in ``days`` days from ``start_day``."""
    edges = tuple(edges)
    for k in range(days):
        day = start_day + timedelta(days=k)
        for minute in edges:
            wall = datetime.combine(day, time(minute // 60, minute % 60), tzinfo=zone)
            yield wall.astimezone(UTC)
            yield wall.replace(fold=1).astimezone(UTC)
    begin = datetime.combine(start_day, time(0), tzinfo=zone).astimezone(UTC) - timedelta(hours=14)
    yield from _offset_transitions(zone, begin, begin + timedelta(days=days, hours=28))


def _offset_transitions(zone: tzinfo, begin: datetime, end: datetime) -> Iterable[datetime]:
    """Instants (UTC, whole seconds) in [begin, end) where ``zone``'s UTC offset changes.

    Found by bisection over 3-hour steps: no zone changes its offset twice within 3 hours.
    """
    step = timedelta(hours=3)
    lo = begin.replace(microsecond=0)
    lo_off = lo.astimezone(zone).utcoffset()
    while lo < end:
        hi = lo + step
        hi_off = hi.astimezone(zone).utcoffset()
        if hi_off != lo_off:
            a, b = (
                int(lo.timestamp()),
                int(hi.timestamp()),
            )  # offset(a) = lo_off, offset(b) != lo_off
            while b - a > 1:
                mid = (a + b) // 2
                if datetime.fromtimestamp(mid, zone).utcoffset() == lo_off:
                    a = mid
                else:
                    b = mid
            yield datetime.fromtimestamp(b, UTC)
        lo, lo_off = hi, hi_off


def parse_window(text: str) -> Window:
    """Parse one ``HH:MM - HH:MM`` entry; raise :class:`ScheduleError` naming it if it is bad."""
    if not isinstance(text, str):
        raise ScheduleError(
            f"ProcessSchedule entry {text!r} is not a string; expected 'HH:MM - HH:MM'"
        )
    m = _ENTRY.match(text)
    if m is None:
        raise ScheduleError(
            f"ProcessSchedule entry {text!r} is not a window 'HH:MM - HH:MM' (24-hour clock, "
            "no seconds)"
        )
    minutes = []
    for h_key, m_key, which in (("sh", "sm", "start"), ("eh", "em", "end")):
        hour, minute = int(m[h_key]), int(m[m_key])
        if hour > 23:
            raise ScheduleError(
                f"ProcessSchedule entry {text!r}: {which} hour {hour} is not in 0-23"
            )
        if minute > 59:
            raise ScheduleError(
                f"ProcessSchedule entry {text!r}: {which} minute {minute} is not in 0-59"
            )
        minutes.append(hour * 60 + minute)
    return Window(minutes[0], minutes[1])


def parse_schedule(entries: Sequence[str] | None) -> Schedule:
    """Parse a ProcessSchedule list; None or an empty list is the always-open schedule."""
    if entries is None:
        return Schedule()
    if isinstance(entries, str | bytes):
        raise ScheduleError(
            f"ProcessSchedule must be a list of 'HH:MM - HH:MM' entries, got the string {entries!r}"
        )
    return Schedule(tuple(parse_window(e) for e in entries))


def schedule_gate(
    schedule: Schedule, tz: ZoneInfo | tzinfo, now_epoch: float
) -> tuple[bool, float | None]:
    """(open now, epoch seconds of the next flip or None) for an epoch time from a wall clock."""
    at = datetime.fromtimestamp(now_epoch, tz)
    change = schedule.next_change(at)
    return schedule.is_open(at), (change.timestamp() if change is not None else None)
