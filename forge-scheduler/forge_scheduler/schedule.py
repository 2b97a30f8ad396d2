"""Which UTC instants a cron expression fires at in an IANA time zone.

Expressions have 5 fields (``minute hour day-of-month month day-of-week``) or 6 fields with
*seconds first* (``second minute hour day-of-month month day-of-week``, as in Quartz/Spring),
or one of croniter's aliases (``@hourly``, ``@daily``, ...).

A slot is a local wall-clock time that matches the expression, turned into a UTC instant.
croniter only ever sees naive local times, so it never has to reason about offsets; the
daylight-saving rules live here and are explicit:

* **spring forward** - a local time that does not exist (it falls in the gap) fires once, at
  the instant the gap ends (``02:30`` on the day Berlin jumps from 02:00 to 03:00 fires at
  03:00 CEST). Several gap times collapse into that one instant.
* **fall back** - a local time that occurs twice fires at its first occurrence only, unless
  the hour field is a wildcard (``*``): then the cron keeps its rhythm and fires in both
  passes (``*/15 * * * *`` fires every 15 real minutes through the repeated hour; ``30 1 * * *``
  fires once). This is cronie's rule.

Slots are identified by their UTC instant, so every slot is distinct and strictly ordered.
"""

from __future__ import annotations

import datetime as dt
import functools
import heapq
from typing import Iterator
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import attrs
from croniter import croniter
from croniter.croniter import CroniterBadDateError, CroniterError

UTC = dt.timezone.utc
_BUCKET = 900  # seconds; no real time zone keeps an offset for less than 15 minutes
_ALIASES = ("@yearly", "@annually", "@monthly", "@weekly", "@daily", "@midnight", "@hourly")


class CronExpressionError(ValueError):
    """An expression or time zone that cannot be scheduled; the message says why."""


def parse_zone(name: str) -> ZoneInfo:
    if not isinstance(name, str) or not name.strip():
        raise CronExpressionError(f"time zone must be an IANA name such as 'Europe/Berlin', got {name!r}")
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError, OSError):
        raise CronExpressionError(f"unknown time zone {name!r} (expected an IANA name such as 'Europe/Berlin' or 'UTC')") from None


@attrs.frozen
class CronSchedule:
    expression: str
    timezone: str
    zone: ZoneInfo = attrs.field(repr=False, eq=False)
    has_seconds: bool
    #: the hour field is ``*``: fire in both passes of a repeated (fall-back) hour
    hour_wildcard: bool

    @classmethod
    def parse(cls, expression: str, timezone: str = "UTC") -> "CronSchedule":
        """Validate ``expression`` and ``timezone``; raises :class:`CronExpressionError`."""
        zone = parse_zone(timezone)
        if not isinstance(expression, str) or not expression.strip():
            raise CronExpressionError(f"cron expression must be a non-empty string, got {expression!r}")
        expr = " ".join(expression.split())
        fields = expr.split(" ")
        if expr.startswith("@"):
            if expr.lower() not in _ALIASES:
                raise CronExpressionError(f"unknown cron alias {expr!r}; known: {', '.join(_ALIASES)}")
            has_seconds = False
        elif len(fields) in (5, 6):
            has_seconds = len(fields) == 6
        else:
            raise CronExpressionError(
                f"cron expression {expr!r} has {len(fields)} fields; expected 5 (minute hour day month weekday) "
                f"or 6 (second minute hour day month weekday)")
        try:
            probe = croniter(expr, dt.datetime(2000, 1, 1), second_at_beginning=has_seconds)
        except (CroniterError, ValueError, KeyError, TypeError) as exc:
            raise CronExpressionError(f"invalid cron expression {expr!r}: {exc}") from None
        hours = probe.expanded[1]
        sched = cls(expr, timezone, zone, has_seconds, hours == ["*"] or set(hours) == set(range(24)))
        try:
            probe.get_next(dt.datetime)
        except CroniterBadDateError:
            raise CronExpressionError(f"cron expression {expr!r} never fires (no matching date)") from None
        return sched

    # --- local time <-> UTC -----------------------------------------------------------
    def _iter(self, start: dt.datetime) -> croniter:
        return croniter(self.expression, start, second_at_beginning=self.has_seconds)

    def local(self, instant: dt.datetime) -> dt.datetime:
        """The naive local wall-clock time of a UTC instant."""
        return instant.astimezone(self.zone).replace(tzinfo=None)

    def _offset(self, bucket: int) -> dt.timedelta:
        return _offset_at(self.timezone, bucket)

    def _offsets_near(self, instant: dt.datetime, before: int, after: int) -> list[dt.timedelta]:
        b = int(instant.timestamp()) // _BUCKET
        return [self._offset(b + k) for k in range(-before, after + 1)]

    def instants(self, naive: dt.datetime) -> list[dt.datetime]:
        """UTC instants a matching local time ``naive`` fires at (see the module's DST rules)."""
        first = naive.replace(tzinfo=self.zone, fold=0).astimezone(UTC)
        second = naive.replace(tzinfo=self.zone, fold=1).astimezone(UTC)
        if first == second:
            return [first]
        lo, hi = min(first, second), max(first, second)
        if self.local(lo) == naive:  # exists twice: the repeated hour of a fall-back
            return [lo, hi] if self.hour_wildcard else [lo]
        return [self._transition(lo, hi)]  # does not exist: fire when the gap ends

    def _transition(self, lo: dt.datetime, hi: dt.datetime) -> dt.datetime:
        """The first instant in (lo, hi] whose offset differs from lo's (bisection on seconds)."""
        before = lo.astimezone(self.zone).utcoffset()
        a, b = int(lo.timestamp()), int(hi.timestamp())
        while b - a > 1:
            mid = (a + b) // 2
            if dt.datetime.fromtimestamp(mid, UTC).astimezone(self.zone).utcoffset() == before:
                a = mid
            else:
                b = mid
        return dt.datetime.fromtimestamp(b, UTC)

    # --- slots ----------------------------------------------------------------------
    def iter_after(self, after: dt.datetime) -> Iterator[dt.datetime]:
        """Every slot strictly after ``after``, ascending, forever."""
        after = _utc(after)
        start = self.local(after)
        slots: Iterator[dt.datetime] = self._forward(start)
        offs = self._offsets_near(after, 0, 16)
        back = max(dt.timedelta(0), offs[0] - min(offs))
        if back and self.hour_wildcard:
            # the clock goes back soon: the second pass of the repeated hour holds slots after
            # ``after`` whose local times lie before ``start``; only that stretch is walked
            ends = self._transition(after, after + dt.timedelta(seconds=16 * _BUCKET))
            lo = max(start - back, self.local(ends))
            slots = heapq.merge(slots, self._second_pass(lo, start))
        last = after
        for u in slots:
            if u > last:
                last = u
                yield u

    def _forward(self, start: dt.datetime) -> Iterator[dt.datetime]:
        """Instants of the local matches from ``start`` on, ascending (a heap reorders the
        second pass of a repeated hour, whose instants come an offset change later)."""
        it = self._iter(start.replace(microsecond=0) - dt.timedelta(seconds=1))
        pending: list[dt.datetime] = []
        approx = self._offset(int(start.replace(tzinfo=UTC).timestamp()) // _BUCKET)
        while True:
            naive = it.get_next(dt.datetime)
            for u in self.instants(naive):
                heapq.heappush(pending, u)
            # later local times map to instants above this floor, so what lies below is final
            floor = (naive - max(self._offsets_near(naive.replace(tzinfo=UTC) - approx, 12, 16))).replace(tzinfo=UTC)
            while pending and pending[0] <= floor:
                yield heapq.heappop(pending)

    def _second_pass(self, lo: dt.datetime, hi: dt.datetime) -> Iterator[dt.datetime]:
        """Second-pass instants of the repeated local times in ``[lo, hi)``, ascending."""
        it = self._iter(lo.replace(microsecond=0) - dt.timedelta(seconds=1))
        while True:
            naive = it.get_next(dt.datetime)
            if naive >= hi:
                return
            found = self.instants(naive)
            if len(found) == 2:
                yield found[1]

    def next_after(self, after: dt.datetime) -> dt.datetime:
        return next(self.iter_after(after))

    def between(self, after: dt.datetime, until: dt.datetime, *, limit: int | None = None) -> list[dt.datetime]:
        """Slots in ``(after, until]``, ascending; at most ``limit`` (the earliest ones)."""
        until = _utc(until)
        out: list[dt.datetime] = []
        if _utc(after) >= until:
            return out
        for u in self.iter_after(after):
            if u > until or (limit is not None and len(out) >= limit):
                break
            out.append(u)
        return out

    def count_between(self, after: dt.datetime, until: dt.datetime, *, cap: int) -> int:
        """How many slots lie in ``(after, until]``, counting at most ``cap``."""
        return len(self.between(after, until, limit=cap))

    def latest(self, after: dt.datetime, until: dt.datetime, n: int) -> list[dt.datetime]:
        """The ``n`` most recent slots in ``(after, until]``, ascending, without walking the
        whole interval: a window found by stepping back ``n`` local matches, doubled until
        it holds ``n`` slots or reaches ``after``."""
        after, until = _utc(after), _utc(until)
        if n <= 0 or after >= until:
            return []
        it = self._iter(self.local(until) + dt.timedelta(seconds=1))
        earliest = self.local(until)
        for _ in range(n):
            try:
                earliest = it.get_prev(dt.datetime)
            except CroniterBadDateError:
                break
        window = max(dt.timedelta(seconds=1), self.local(until) - earliest + dt.timedelta(seconds=1))
        while True:
            start = max(after, until - window)
            found = self.between(start, until)
            if len(found) >= n or start <= after:
                return found[-n:]
            window *= 2


def _utc(t: dt.datetime) -> dt.datetime:
    if t.tzinfo is None:
        raise ValueError(f"expected an aware datetime, got naive {t!r}")
    return t.astimezone(UTC)


@functools.lru_cache(maxsize=65536)
def _offset_at(zone_name: str, bucket: int) -> dt.timedelta:
    return dt.datetime.fromtimestamp(bucket * _BUCKET, UTC).astimezone(ZoneInfo(zone_name)).utcoffset()
