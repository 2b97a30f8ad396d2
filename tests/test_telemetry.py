"""The kernel's telemetry API (forge_kernel.telemetry): its contracts and what it costs."""

import time

from forge_kernel.telemetry import Telemetry, format_traceparent, parse_traceparent
from forge_kernel.testing import contracts


def test_span_contract():
    contracts.check_telemetry_traces()


def test_call_recording_contract():
    contracts.check_telemetry_calls()


def test_request_span_contract():
    contracts.check_telemetry_requests()


def test_head_decision_contract():
    contracts.check_telemetry_head_decision()


def test_event_ring_contract():
    contracts.check_telemetry_events()


def test_traceparent_round_trip():
    tp = format_traceparent(0x4BF92F3577B34DA6A3CE929D0E0E4736, 0x00F067AA0BA902B7, True)
    assert tp == "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    assert parse_traceparent(tp) == (0x4BF92F3577B34DA6A3CE929D0E0E4736, 0x00F067AA0BA902B7, 1)
    assert parse_traceparent("00-" + "0" * 32 + "-00f067aa0ba902b7-01") is None
    assert parse_traceparent(None) is None and parse_traceparent("x" * 10_000) is None


def test_an_observer_that_raises_never_breaks_the_work():
    tel = Telemetry()

    def broken(trace):
        raise RuntimeError("observer bug")

    tel.attach(broken, sample_rate=1.0)
    span = tel.start_span("work")
    tel.end_span(span)
    assert tel.dropped == 1


def test_recording_cost_is_reported():
    """Prints what recording costs per call on this machine (no timing assertion: see bench/rpc)."""
    tel = Telemetry()
    n = 20_000
    t0 = time.perf_counter()
    for _ in range(n):
        tel.emit("call", "f", "query", "OK", 0.001)
    off = (time.perf_counter() - t0) / n
    tel.attach(lambda t: None, sample_rate=0.01)
    t0 = time.perf_counter()
    for _ in range(n):
        tel.emit("call", "f", "query", "OK", 0.001)
    on = (time.perf_counter() - t0) / n
    t0 = time.perf_counter()
    for _ in range(n):
        root = tel.start_span("POST /rpc/f", "server")
        child = tel.start_span("f")
        tel.end_span(child)
        tel.end_span(root)
    spans = (time.perf_counter() - t0) / n
    print(f"emit detached {off * 1e6:.2f} us, emit attached {on * 1e6:.2f} us, "
          f"two spans + trace hand-off {spans * 1e6:.2f} us")
    assert len(tel.drain()) == min(n, 65536)


def test_successful_calls_are_batched_per_function_and_bounded(monkeypatch):
    """A successful call is one float in its function's batch (a ``calls`` event when drained); a
    full batch, a failed call or a name seen with another kind go to the ring as ``call`` events,
    so an observer that stops draining holds bounded memory and loses nothing it can count."""
    from forge_kernel import telemetry

    monkeypatch.setattr(telemetry, "MAX_CALL_BATCH", 3)
    tel = Telemetry()
    tel.attach(lambda t: None, sample_rate=0.0, ring_size=1024)
    start = telemetry.call_clock()
    for code in ["OK"] * 5 + ["INTERNAL"]:
        tel.call_ended(None, "f", "query", "r", start, code)
    tel.call_ended(None, "g", "query", "r", start, "OK")
    tel.call_ended(None, "f", "".join(["muta", "tion"]), "r", start, "OK")  # another kind, another str object
    events = tel.drain()
    assert [(k, f[:3]) for k, f in events] == [
        ("call", ("f", "query", "OK")), ("call", ("f", "query", "OK")), ("call", ("f", "query", "INTERNAL")),
        ("call", ("f", "mutation", "OK")), ("calls", ("f", "query", "OK")), ("calls", ("g", "query", "OK"))]
    assert [len(f[3]) for k, f in events if k == "calls"] == [3, 1]
    assert all(s >= 0 for k, f in events for s in (f[3] if k == "calls" else [f[3]]))
    tel.call_ended(None, "f", "".join(["que", "ry"]), "r", start, "OK")  # an equal kind: batched
    assert [(k, f[:3], len(f[3])) for k, f in tel.drain()] == [("calls", ("f", "query", "OK"), 1)]


def test_succeeded_job_attempts_are_batched_per_job_type_and_bounded(monkeypatch):
    """A succeeded attempt is a due time, a start time and seconds in its job type's batch (a
    ``jobs`` event when drained); any other attempt, or one of a full batch or of another queue, is a
    ``job.finished`` event, so an observer that stops draining holds bounded memory and loses nothing it can count."""
    import datetime as dt

    from forge_kernel import telemetry

    monkeypatch.setattr(telemetry, "MAX_JOB_BATCH", 3)
    t0 = dt.datetime(2026, 12, 7, tzinfo=dt.timezone.utc)
    tel = Telemetry()
    tel.job_ended("j", "default", "succeeded", t0, t0, 0.5)  # nothing observes: nothing kept
    assert tel.ok_jobs == {} and tel.drain() == []
    tel.attach(lambda t: None, sample_rate=0.0, ring_size=1024)
    for i in range(5):
        tel.job_ended("j", "".join(["def", "ault"]), "succeeded", t0, t0 + dt.timedelta(seconds=i), float(i))
    tel.job_ended("j", "mail", "succeeded", t0, t0, 9.0)
    tel.job_ended("k", "default", "succeeded", t0, t0, 1.0)
    tel.job_ended("k", "default", "dead", t0, t0, 2.0)  # not a success: an event
    events = tel.drain()
    assert [(k, f[:3]) for k, f in events] == [
        ("job.finished", ("j", "default", "succeeded")), ("job.finished", ("j", "default", "succeeded")),
        ("job.finished", ("j", "mail", "succeeded")), ("job.finished", ("k", "default", "dead")),
        ("jobs", ("j", "default", "succeeded")), ("jobs", ("k", "default", "succeeded"))]
    assert [f[3:] for k, f in events if k == "job.finished"] == [
        (t0, t0 + dt.timedelta(seconds=3), 3.0), (t0, t0 + dt.timedelta(seconds=4), 4.0), (t0, t0, 9.0),
        (t0, t0, 2.0)]
    (_, (_, _, _, due, started, seconds)), _ = [e for e in events if e[0] == "jobs"]
    assert due == [t0] * 3 and started == [t0 + dt.timedelta(seconds=i) for i in range(3)]
    assert seconds == [0.0, 1.0, 2.0]
    assert tel.ok_jobs == {} and tel.drain() == []
    tel.job_ended("j", "default", "succeeded", t0, t0, 0.5)
    tel.detach()
    assert tel.ok_jobs == {}


def test_an_unsampled_request_that_ends_well_draws_no_ids(monkeypatch):
    """Most requests (unsampled, fast, answered below 500, nothing asking for their ids) never draw a
    trace or span id nor read the wall clock: their root is a few fields and two clock readings."""
    from forge_kernel import telemetry

    draws = []
    real = telemetry._getrandbits
    monkeypatch.setattr(telemetry, "_getrandbits", lambda k: draws.append(k) or real(k))
    monkeypatch.setattr(telemetry, "_time_ns", lambda: draws.append("wall clock") or time.time_ns())
    tel = Telemetry()
    tel.attach(lambda t: None, sample_rate=0.0, keep_over=60.0)
    for status in (200, 404):
        tel.end_request(tel.start_request("POST /rpc/f", None), status, "req-1")
    assert draws == [] and tel.discarded == 2


def test_a_promoted_request_root_has_wall_clock_times_and_an_unsampled_trace_id():
    """An unsampled root made into a plain span late (it failed, a log line or a dispatch asked for
    its ids) gets wall-clock start and end times around the request, and a trace id whose low bits
    say "not sampled" to any node deciding from its traceparent (a dispatched job's run)."""
    got = []
    tel = Telemetry()
    tel.attach(got.append, sample_rate=0.5)
    asked = 0
    while asked < 50:
        before = time.time_ns()
        root = tel.start_request("POST /rpc/f", None)
        if root.sampled:
            tel.end_request(root, 200, "r")
            continue
        asked += 1
        if asked % 2:  # asked for its traceparent while open (a dispatch), then it ends well
            tp = root.traceparent()
            assert tel.head_sampled_remote(tp) is False
            tel.end_request(root, 200, "r")
        else:  # it fails: promoted as it ends
            tel.end_request(root, 503, "r")
            assert got[-1].root is root
        after = time.time_ns()
        slack = 1_000_000  # the wall clock may be stepped while a test runs (NTP): no exact bound on it
        assert before - slack <= root.start_ns <= root.end_ns <= after + slack
        assert (root.trace_id & ((1 << 64) - 1)) >= 1 << 63 and root.span_id
