"""Slot computation: 5/6-field expressions, IANA zones, daylight-saving changes."""

import datetime as dt
from zoneinfo import ZoneInfo

import pytest
from croniter import croniter
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from forge_scheduler.schedule import UTC, CronExpressionError, CronSchedule


def utc(*a):
    return dt.datetime(*a, tzinfo=UTC)


def local_labels(s, slots):
    return [u.astimezone(s.zone).strftime("%Y-%m-%d %H:%M:%S %Z") for u in slots]


# --- parsing -------------------------------------------------------------------------------
def test_five_and_six_field_expressions():
    five = CronSchedule.parse("*/15 * * * *")
    six = CronSchedule.parse("*/20 * * * * *")  # seconds first
    assert not five.has_seconds and six.has_seconds
    assert five.between(utc(2026, 1, 1), utc(2026, 1, 1, 1)) == [utc(2026, 1, 1, 0, m) for m in (15, 30, 45)] + [utc(2026, 1, 1, 1)]
    assert six.between(utc(2026, 1, 1), utc(2026, 1, 1, 0, 1)) == [utc(2026, 1, 1, 0, 0, 20), utc(2026, 1, 1, 0, 0, 40),
                                                                   utc(2026, 1, 1, 0, 1)]
    # the sixth field is the second, the rest keep their 5-field meaning
    assert CronSchedule.parse("30 0 9 * * *").next_after(utc(2026, 1, 1)) == utc(2026, 1, 1, 9, 0, 30)


def test_aliases_and_weekday_names():
    assert CronSchedule.parse("@hourly").next_after(utc(2026, 1, 1, 0, 30)) == utc(2026, 1, 1, 1)
    # 2026-01-02 is a Friday, so the next weekday 09:00 in Berlin after Friday noon is Monday 08:00 UTC
    s = CronSchedule.parse("0 9 * * mon-fri", "Europe/Berlin")
    assert s.next_after(utc(2026, 1, 2, 12)) == utc(2026, 1, 5, 8)


@pytest.mark.parametrize("expr, needle", [
    ("61 * * * *", "61 * * * *"),
    ("* * *", "has 3 fields"),
    ("* * * * * * *", "has 7 fields"),
    ("0 0 30 2 *", "never fires"),
    ("@sometimes", "unknown cron alias"),
    ("", "non-empty"),
    ("a b c d e", "invalid cron expression"),
])
def test_invalid_expressions_say_why(expr, needle):
    with pytest.raises(CronExpressionError, match=".*") as err:
        CronSchedule.parse(expr)
    assert needle in str(err.value)


@pytest.mark.parametrize("tz", ["Europe/Atlantis", "", "utc+2", "../etc/passwd"])
def test_invalid_time_zones_are_named(tz):
    with pytest.raises(CronExpressionError) as err:
        CronSchedule.parse("* * * * *", tz)
    assert repr(tz) in str(err.value)


# --- daylight saving ------------------------------------------------------------------------
def test_spring_forward_gap_fires_once_when_the_gap_ends():
    # Berlin, 2026-03-29: 02:00 CET jumps to 03:00 CEST (01:00 UTC)
    s = CronSchedule.parse("*/30 * * * *", "Europe/Berlin")
    slots = s.between(utc(2026, 3, 28, 23, 59), utc(2026, 3, 29, 2, 0))
    assert local_labels(s, slots) == [
        "2026-03-29 01:00:00 CET", "2026-03-29 01:30:00 CET",
        # 02:00 and 02:30 do not exist; they and 03:00 are one instant, which fires once
        "2026-03-29 03:00:00 CEST", "2026-03-29 03:30:00 CEST", "2026-03-29 04:00:00 CEST"]
    daily = CronSchedule.parse("30 2 * * *", "Europe/Berlin")
    assert local_labels(daily, daily.between(utc(2026, 3, 27), utc(2026, 3, 30, 12))) == [
        "2026-03-27 02:30:00 CET", "2026-03-28 02:30:00 CET", "2026-03-29 03:00:00 CEST", "2026-03-30 02:30:00 CEST"]


def test_spring_forward_new_york():
    # 2026-03-08 02:00 EST -> 03:00 EDT; a 02:15 daily job runs at 03:00 EDT that day
    s = CronSchedule.parse("15 2 * * *", "America/New_York")
    assert local_labels(s, s.between(utc(2026, 3, 7), utc(2026, 3, 10))) == [
        "2026-03-07 02:15:00 EST", "2026-03-08 03:00:00 EDT", "2026-03-09 02:15:00 EDT"]


def test_fall_back_repeated_hour():
    # Berlin, 2026-10-25: 03:00 CEST goes back to 02:00 CET (01:00 UTC); 02:xx happens twice
    every = CronSchedule.parse("*/30 * * * *", "Europe/Berlin")
    assert local_labels(every, every.between(utc(2026, 10, 24, 23, 59), utc(2026, 10, 25, 2, 0))) == [
        "2026-10-25 02:00:00 CEST", "2026-10-25 02:30:00 CEST",
        # wildcard hour: keeps firing every 30 real minutes through the second pass
        "2026-10-25 02:00:00 CET", "2026-10-25 02:30:00 CET", "2026-10-25 03:00:00 CET"]
    daily = CronSchedule.parse("30 2 * * *", "Europe/Berlin")
    # a fixed hour fires once, at the first occurrence
    assert local_labels(daily, daily.between(utc(2026, 10, 23), utc(2026, 10, 27))) == [
        "2026-10-23 02:30:00 CEST", "2026-10-24 02:30:00 CEST", "2026-10-25 02:30:00 CEST", "2026-10-26 02:30:00 CET"]


def test_fall_back_starting_inside_the_repeated_hour():
    s = CronSchedule.parse("*/30 * * * *", "Europe/Berlin")
    first_pass_0215 = utc(2026, 10, 25, 0, 15)   # 02:15 CEST
    second_pass_0215 = utc(2026, 10, 25, 1, 15)  # 02:15 CET
    assert local_labels(s, s.between(first_pass_0215, utc(2026, 10, 25, 2))) == [
        "2026-10-25 02:30:00 CEST", "2026-10-25 02:00:00 CET", "2026-10-25 02:30:00 CET", "2026-10-25 03:00:00 CET"]
    assert local_labels(s, s.between(second_pass_0215, utc(2026, 10, 25, 2))) == [
        "2026-10-25 02:30:00 CET", "2026-10-25 03:00:00 CET"]


def test_every_second_through_fall_back_is_every_real_second():
    s = CronSchedule.parse("* * * * * *", "America/New_York")
    start = utc(2026, 11, 1, 5, 59, 50)  # 01:59:50 EDT, ten seconds before the clock goes back
    slots = s.between(start, start + dt.timedelta(seconds=20))
    assert slots == [start + dt.timedelta(seconds=i) for i in range(1, 21)]


def test_latest_returns_the_most_recent_slots():
    s = CronSchedule.parse("*/10 * * * *", "Europe/Berlin")
    assert s.latest(utc(2026, 1, 1), utc(2026, 1, 1, 1, 5), 3) == [utc(2026, 1, 1, 0, 40), utc(2026, 1, 1, 0, 50),
                                                                 utc(2026, 1, 1, 1, 0)]
    assert s.latest(utc(2026, 1, 1, 0, 45), utc(2026, 1, 1, 1, 5), 5) == [utc(2026, 1, 1, 0, 50), utc(2026, 1, 1, 1, 0)]
    assert s.latest(utc(2026, 1, 1), utc(2026, 1, 1, 1), 0) == []


# --- properties -------------------------------------------------------------------------------
ZONES = ["UTC", "Europe/Berlin", "America/New_York", "Australia/Lord_Howe", "Asia/Kolkata", "America/Santiago"]
EXPRS = ["* * * * *", "*/7 * * * *", "30 2 * * *", "0 */3 * * *", "15,45 1-3 * * *", "0 0 * * sun",
         "*/20 * * * * *", "0 30 2 * * *"]
# instants around real transitions (and elsewhere) of those zones
AROUND = [utc(2026, 3, 29, 0, 30), utc(2026, 10, 25, 0, 30), utc(2026, 3, 8, 6), utc(2026, 11, 1, 5, 30),
          utc(2026, 4, 4, 14, 30), utc(2026, 10, 3, 15, 30), utc(2026, 4, 5, 2), utc(2026, 9, 6, 3), utc(2026, 6, 1)]


@st.composite
def windows(draw):
    base = draw(st.sampled_from(AROUND))
    start = base + dt.timedelta(minutes=draw(st.integers(-240, 240)), seconds=draw(st.integers(0, 59)))
    return start, start + dt.timedelta(minutes=draw(st.integers(1, 360)))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(expr=st.sampled_from(EXPRS), zone=st.sampled_from(ZONES), window=windows())
def test_slots_are_increasing_and_match_local_time(expr, zone, window):
    s = CronSchedule.parse(expr, zone)
    start, end = window
    slots = s.between(start, end)
    assert all(a < b for a, b in zip(slots, slots[1:]))
    assert all(start < u <= end for u in slots)
    z = ZoneInfo(zone)
    for u in slots:
        local = u.astimezone(z).replace(tzinfo=None)
        # the local time matches the expression, or it is the end of a gap that swallowed matches
        matches = croniter.match(expr, local, second_at_beginning=s.has_seconds)
        gap_end = u.astimezone(z).utcoffset() != (u - dt.timedelta(seconds=1)).astimezone(z).utcoffset()
        assert matches or gap_end, f"{u} ({local}) does not match {expr}"


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(expr=st.sampled_from(EXPRS), zone=st.sampled_from(ZONES), window=windows(), n=st.integers(1, 6))
def test_latest_is_the_tail_of_between(expr, zone, window, n):
    s = CronSchedule.parse(expr, zone)
    start, end = window
    assert s.latest(start, end, n) == s.between(start, end)[-n:]


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(expr=st.sampled_from(EXPRS), zone=st.sampled_from(ZONES), window=windows(), cut=st.floats(0, 1))
def test_windows_split_anywhere_give_the_same_slots(expr, zone, window, cut):
    # deciding (a, m] then (m, b] - as successive leader ticks do - yields exactly (a, b]
    s = CronSchedule.parse(expr, zone)
    start, end = window
    middle = start + (end - start) * cut
    assert s.between(start, middle) + s.between(middle, end) == s.between(start, end)


@settings(max_examples=60, deadline=None)
@given(expr=st.sampled_from(EXPRS), window=windows())
def test_utc_schedule_equals_plain_croniter(expr, window):
    s = CronSchedule.parse(expr, "UTC")
    start, end = window
    it = croniter(expr, start.replace(tzinfo=None), second_at_beginning=s.has_seconds)
    expected = []
    while True:
        nxt = it.get_next(dt.datetime).replace(tzinfo=UTC)
        if nxt > end:
            break
        expected.append(nxt)
    assert s.between(start, end) == expected


def brute_force(s, start, end):
    """The DST rules of the module docstring applied second by second (or minute by minute)."""
    step = dt.timedelta(seconds=1 if s.has_seconds else 60)
    z = s.zone
    u = start.replace(second=0, microsecond=0) if not s.has_seconds else start.replace(microsecond=0)
    out = []
    while u <= end:
        local = u.astimezone(z)
        naive = local.replace(tzinfo=None)
        before = (u - step).astimezone(z)
        jump = local.utcoffset() - before.utcoffset()
        hit = croniter.match(s.expression, naive, second_at_beginning=s.has_seconds) and (local.fold == 0 or s.hour_wildcard)
        if jump > dt.timedelta(0):  # the clock just jumped forward: gap times fire now
            t = naive - jump
            while t < naive and not hit:
                hit = croniter.match(s.expression, t, second_at_beginning=s.has_seconds)
                t += step
        if hit and start < u:
            out.append(u)
        u += step
    return out


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(expr=st.sampled_from(["* * * * *", "*/7 * * * *", "30 2 * * *", "0,30 1-3 * * *", "*/20 * * * * *",
                             "0 30 2 * * *", "*/5 * 2 * * *"]),
       zone=st.sampled_from(ZONES), base=st.sampled_from(AROUND), shift=st.integers(-150, 150),
       length=st.integers(1, 180))
def test_slots_equal_a_brute_force_scan(expr, zone, base, shift, length):
    s = CronSchedule.parse(expr, zone)
    start = base + dt.timedelta(minutes=shift, seconds=7)
    end = start + dt.timedelta(minutes=length if not s.has_seconds else min(length, 25))
    assert s.between(start, end) == brute_force(s, start, end)
