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
