"""forge-observe pieces without a node: OTLP export to an in-process receiver, truncation, config
errors, the W3C traceparent parser against OpenTelemetry's, partitions and retention, alerts."""

from __future__ import annotations

import asyncio
import datetime as dt
import http.server
import json
import threading
import time

import asyncpg
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from forge_kernel.config import load_config
from forge_kernel.errors import ConfigError
from forge_kernel.migrations import migrate
from forge_kernel.plugins import PluginLoader
from forge_kernel.telemetry import Telemetry, parse_traceparent
from forge_observe import hooks, query
from forge_observe.alerts import AlertEvaluator
from forge_observe.config import AlertRule
from forge_observe.otlp import OtlpExporter
from forge_observe.metrics import NodeMetrics
from forge_observe.recorder import TraceSink
from forge_observe.writer import attrs_json, drop_partitions, ensure_partitions, span_rows, truncate


class _Receiver(http.server.BaseHTTPRequestHandler):
    bodies: list[bytes] = []

    def do_POST(self) -> None:  # noqa: N802 - the stdlib's name
        body = self.rfile.read(int(self.headers["content-length"]))
        if self.headers.get("content-encoding") == "gzip":
            import gzip

            body = gzip.decompress(body)
        type(self).bodies.append(body)
        self.send_response(200)
        self.send_header("content-type", "application/x-protobuf")
        self.end_headers()

    def log_message(self, *args) -> None:
        pass


def _trace(tel: Telemetry):
    got = []
    tel.attach(got.append, sample_rate=1.0)
    root = tel.start_span("POST /rpc/x", "server", attrs={"big": "y" * 5000})
    child = tel.start_span("x", "internal")
    tel.end_span(child, "INTERNAL")
    tel.end_span(root)
    return got[0]


def test_otlp_export_reaches_a_receiver_decoded_with_opentelemetry_proto():
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

    _Receiver.bodies = []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Receiver)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    exporter = OtlpExporter(f"http://127.0.0.1:{server.server_address[1]}/v1/traces", "n1", attr_limit=100)
    exporter.start()
    trace = _trace(Telemetry())
    try:
        exporter.offer(trace)
        deadline = time.monotonic() + 20
        while not _Receiver.bodies and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        exporter.stop()
        server.shutdown()
    req = ExportTraceServiceRequest.FromString(_Receiver.bodies[0])
    spans = [s for rs in req.resource_spans for ss in rs.scope_spans for s in ss.spans]
    by_name = {s.name: s for s in spans}
    root, child = by_name["POST /rpc/x"], by_name["x"]
    assert root.trace_id.hex() == f"{trace.trace_id:032x}" and child.parent_span_id == root.span_id
    assert child.status.code == 2 and child.status.message == "INTERNAL"  # STATUS_CODE_ERROR
    big = next(a for a in root.attributes if a.key == "big").value.string_value
    assert len(big.encode()) <= 100 and "truncated" in big
    assert exporter.exported == 2


def test_unreachable_otlp_endpoint_drops_and_counts_without_blocking(caplog):
    dropped = []
    exporter = OtlpExporter("http://127.0.0.1:9/v1/traces", "n1", timeout=0.5, on_drop=dropped.append)
    exporter.start()
    tel = Telemetry()
    t0 = time.monotonic()
    for _ in range(3):
        exporter.offer(_trace(tel))
    assert time.monotonic() - t0 < 0.5  # offering never waits for the network
    deadline = time.monotonic() + 30
    while exporter.dropped < 6 and time.monotonic() < deadline:
        time.sleep(0.05)
    exporter.stop()
    assert exporter.dropped == 6 and sum(dropped) == 6 and exporter.exported == 0


@settings(max_examples=300, deadline=None)
@given(st.one_of(
    st.text(max_size=70),
    st.builds(lambda v, t, s, f, rest: f"{v}-{t}-{s}-{f}{rest}",
              st.sampled_from(["00", "01", "ff", "0g", "cc"]), st.from_regex(r"[0-9a-f]{32}", fullmatch=True)
              | st.just("0" * 32), st.from_regex(r"[0-9a-f]{16}", fullmatch=True) | st.just("0" * 16),
              st.from_regex(r"[0-9a-f]{2}", fullmatch=True), st.sampled_from(["", "-", "-x", " ", "-00"]))))
def test_traceparent_parser_agrees_with_opentelemetry(value):
    from opentelemetry import trace
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    ctx = TraceContextTextMapPropagator().extract({"traceparent": value})
    theirs = trace.get_current_span(ctx).get_span_context()
    ours = parse_traceparent(value)
    if not theirs.is_valid:
        assert ours is None, value
    else:
        assert ours == (theirs.trace_id, theirs.span_id, int(theirs.trace_flags)), value


@given(st.text(max_size=3000), st.integers(64, 2000))
def test_truncation_bounds_bytes_and_marks_the_cut(text, limit):
    out = truncate(text, limit)
    assert "\x00" not in out  # PostgreSQL's text holds no NUL: it is stored as U+FFFD
    text = text.replace("\x00", "\ufffd")
    if len(text.encode("utf-8", "replace")) <= limit:
        assert out == text
    else:
        assert len(out.encode()) <= limit and out.endswith("bytes]") and "…[truncated" in out


def _strict_json(text):
    import json

    def refuse(constant):
        raise ValueError(f"{constant} is not JSON that jsonb accepts")

    return json.loads(text, parse_constant=refuse)


_ATTR_VALUES = (st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=400)
                | st.lists(st.integers(), max_size=3) | st.builds(object))


@given(attrs=st.dictionaries(st.text(max_size=260) | st.integers(), _ATTR_VALUES, max_size=5),
       limit=st.integers(64, 1024))
def test_span_attributes_are_stored_as_json_jsonb_accepts(attrs, limit):
    """A kept span's attributes become JSON text jsonb accepts, whatever they hold: keys cut to 200
    characters, texts (and anything not a number, boolean or None, as text) cut to ``limit`` bytes
    with a marker, NaN and infinities as null (the json module wrote ``NaN``, which jsonb refuses:
    the whole COPY batch failed)."""
    stored = _strict_json(attrs_json(attrs, limit))
    expected = {}
    for k, v in attrs.items():
        if isinstance(v, float) and v != v or v in (float("inf"), float("-inf")):
            v = None
        elif not isinstance(v, (bool, int, float)) and v is not None:
            v = truncate(v if isinstance(v, str) else str(v), limit)
        expected[str(k)[:200].replace("\x00", "\ufffd")] = v  # jsonb holds no NUL (\u0000)
    assert stored == expected


def test_kept_trace_rows_carry_the_spans_fields():
    tel = Telemetry()
    got = []
    tel.attach(got.append, sample_rate=1.0)
    root = tel.start_request("POST /rpc/f", None)
    call = tel.call_started("f", "query", "req-1")
    call.record("sql", "client", call.start_ns, call.start_ns + 2_000_000, {"db.statement": "SELECT 1"})
    tel.end_span(call, "INTERNAL")
    tel.end_request(root, 200, "req-1")
    rows = span_rows(got[0], "n1", 1024)
    by_name = {r[3]: r for r in rows}
    assert set(by_name) == {"POST /rpc/f", "f", "sql"}
    assert all(r[0] == f"{root.trace_id:032x}" and r[5] == "n1" for r in rows)
    assert by_name["POST /rpc/f"][1:3] == (f"{root.span_id:016x}", None)
    assert by_name["f"][1:3] == (f"{call.span_id:016x}", f"{root.span_id:016x}")
    assert by_name["sql"][2] == f"{call.span_id:016x}" and by_name["sql"][7] == 2.0
    assert by_name["f"][8] == "INTERNAL" and by_name["POST /rpc/f"][8] is None
    assert _strict_json(by_name["POST /rpc/f"][9]) == {"request.id": "req-1", "http.status_code": 200}
    assert by_name["f"][6] == dt.datetime.fromtimestamp(call.start_ns / 1e9, dt.timezone.utc)


def test_tail_sampling_decisions_reach_the_traces_series():
    """The tail sampler counts its decisions without prometheus_client on the trace's path; the
    observer folds them into ``forge_observe_traces`` when it aggregates (and before a scrape)."""

    class Writer:
        def add(self, kind, record):
            pass

    tel = Telemetry()
    sink = TraceSink(Writer(), slow_threshold=1.0)
    tel.attach(sink, sample_rate=1.0)
    for _ in range(3):
        tel.end_span(tel.start_span("work"))
    tel.attach(sink, sample_rate=0.0)
    tel.end_span(tel.start_span("work"), "NOT_FOUND")  # a client error alone: handed over, then discarded
    metrics = NodeMetrics(type("Node", (), {"id": "n1", "telemetry": tel})(), process=False)
    metrics.count_traces(sink.take_decisions())
    assert sink.take_decisions() == {}
    value = metrics.registry.get_sample_value
    assert value("forge_observe_traces_total", {"decision": "sampled"}) == 3
    assert value("forge_observe_traces_total", {"decision": "discarded"}) == 1


def _config(data):
    loader = PluginLoader(env={"FORGE_DISABLE_PLUGIN_AUTOLOAD": "1"}).load(extra=[("observe", hooks)])
    return load_config(loader.config_sections(), data=data, env={})


@pytest.mark.parametrize("observe, key", [
    ({"sample_rate": 1.5}, "[observe] sample_rate"),
    ({"otlp_endpoint": "ftp://x"}, "[observe] otlp_endpoint"),
    ({"metrics_allow": ["nonsense"]}, "[observe] metrics_allow"),
    ({"retention": {"logs": 0}}, "logs"),
    ({"alerts": [{"name": "a", "metric": "cpu", "threshold": 1}]}, "metric"),
    ({"samplerate": 0.5}, "samplerate"),
])
def test_bad_observe_config_names_the_key(observe, key):
    with pytest.raises(ConfigError) as err:
        _config({"observe": observe})
    assert key in str(err.value)


async def _observe_db(url: str) -> asyncpg.Connection:
    from forge_kernel import kernel_plugin

    conn = await asyncpg.connect(url)
    await migrate(conn, kernel_plugin.forge_migrations() + hooks.forge_migrations())
    return conn


async def test_partitions_are_made_ahead_and_dropped_past_retention(forge_db_url):
    conn = await _observe_db(forge_db_url)
    try:
        today = dt.date(2026, 12, 1)
        assert await ensure_partitions(conn, today - dt.timedelta(days=10), today) == 33
        await conn.execute("INSERT INTO forge_obs_logs (at, node_id, level, message) VALUES ($1, 'n', 'INFO', 'old')",
                           dt.datetime(2026, 11, 21, 12, tzinfo=dt.timezone.utc))
        dropped = await drop_partitions(conn, {"logs": 7, "spans": 3, "metrics": 30}, today)
        # kept for 7 days: the partitions of 24 November to 1 December stay
        assert "forge_obs_logs_p20261121" in dropped and "forge_obs_logs_p20261123" in dropped
        assert "forge_obs_logs_p20261124" not in dropped and len([d for d in dropped if "spans" in d]) == 7
        assert not [d for d in dropped if "metrics" in d]
        assert await conn.fetchval("SELECT count(*) FROM forge_obs_logs") == 0
        left = await conn.fetchval("SELECT count(*) FROM pg_inherits WHERE inhparent = 'forge_obs_logs'::regclass")
        assert left == 8
        with pytest.raises(asyncpg.RaiseError):
            await conn.fetch("SELECT forge_obs_drop_partitions('forge_nodes', now()::date)")
    finally:
        await conn.close()


class _Node:
    def __init__(self):
        self.id = "leader"
        self.config = type("C", (), {"node": type("N", (), {"dead_after": 15.0})()})()
        self.executor = None


async def test_alert_fires_once_and_resolves(forge_db_url):
    conn = await _observe_db(forge_db_url)
    try:
        now = dt.datetime.now(dt.timezone.utc)
        await ensure_partitions(conn, now.date() - dt.timedelta(days=1), now.date() + dt.timedelta(days=1))

        async def finished(at, ok, bad):
            await conn.executemany(
                "INSERT INTO forge_obs_metrics (at, node_id, name, labels, value) VALUES ($1, 'n1', "
                "'forge_jobs_finished_total', $2::jsonb, $3)",
                [(at, '{"job": "j", "status": "succeeded"}', ok), (at, '{"job": "j", "status": "dead"}', bad)])

        await finished(now - dt.timedelta(seconds=200), 100, 0)
        await finished(now - dt.timedelta(seconds=30), 150, 10)  # 10 of 60 in the window failed
        rule = AlertRule(name="jobs-failing", metric="job_failure_rate", threshold=0.05, window=60)
        evaluator = AlertEvaluator(_Node(), [rule])
        assert await evaluator.run(conn) == [("jobs-failing", "firing")]
        assert await evaluator.run(conn) == []  # still firing: no second row
        (alert,) = await query.alerts(conn)
        assert alert.state == "firing" and abs(alert.value - 10 / 60) < 1e-9 and "job_failure_rate" in alert.message
        await finished(dt.datetime.now(dt.timezone.utc), 160, 10)
        await asyncio.sleep(0.01)
        # over the last 20 s: 10 more succeeded, none failed
        quiet = AlertEvaluator(_Node(), [AlertRule(name="jobs-failing", metric="job_failure_rate", threshold=0.05,
                                                   window=20)])
        assert await quiet.run(conn) == [("jobs-failing", "resolved")]
        (alert,) = await query.alerts(conn)
        assert alert.state == "resolved" and alert.resolved_at is not None
    finally:
        await conn.close()


_T0 = dt.datetime(2026, 12, 6, tzinfo=dt.timezone.utc)
_seconds = st.one_of(st.floats(0, 120, allow_nan=False), st.sampled_from([0.0, 0.0005, 0.001, 0.25, 60.0]))


@settings(max_examples=60, deadline=None)
@given(calls=st.lists(st.tuples(st.sampled_from(["f", "g"]), st.sampled_from(["OK", "INTERNAL"]), _seconds),
                      max_size=40),
       # successful calls drained in batches (a "calls" event per function, empty ones too)
       batches=st.lists(st.tuples(st.sampled_from(["f", "g", "h"]), st.lists(_seconds, max_size=30)), max_size=4),
       # up to 12 job names (a batch with more than 8 label sets is grouped another way), waits
       # below zero (started before due: counted as 0) and outcomes that split a batch's label sets
       waits=st.lists(st.tuples(st.sampled_from([f"j{i}" for i in range(12)]),
                                st.one_of(_seconds, st.floats(-5, 0, allow_nan=False)), _seconds,
                                st.sampled_from(["succeeded", "failed"])), max_size=14),
       # succeeded attempts drained in batches (a "jobs" event per job type: its due and start times
       # and seconds), in the default queue and another one
       job_batches=st.lists(st.tuples(st.sampled_from(["j0", "j1", "j12"]), st.sampled_from(["default", "mail"]),
                                      st.lists(st.tuples(st.one_of(_seconds, st.floats(-5, 0, allow_nan=False)),
                                                         _seconds), max_size=20)), max_size=4),
       pushes=st.lists(st.tuples(st.sampled_from(["data", "unchanged"]), st.none() | st.integers(0, 5000)),
                       max_size=10),
       junk=st.lists(st.sampled_from([("call", ("f",)), ("job.finished", ("j", "default", "succeeded", "soon", _T0,
                                                                          1.0)),
                                      ("call", ("f", "query", "OK", float("nan"))), ("later.kind", (1,)),
                                      ("calls", ("f", "query", "OK", [0.1, float("nan")])),
                                      ("calls", ("f", "query", "OK", "0.1")), ("calls", ("f", "query", [0.1])),
                                      ("jobs", ("j", "default", "succeeded", [_T0], [], [1.0])),
                                      ("jobs", ("j", "default", "succeeded", [_T0], ["soon"], [1.0])),
                                      ("jobs", ("j", "default", "succeeded", [_T0], [_T0], [float("nan")])),
                                      ("jobs", ("j", "default", "succeeded", _T0, _T0, 1.0))]),
                     max_size=4))
def test_event_aggregation_matches_prometheus_client(calls, batches, waits, job_batches, pushes, junk):
    """The event series (plain dicts folded off the hot path) expose exactly what prometheus_client's
    own Counter and Histogram would for the same observations; malformed events are counted, not kept."""
    from prometheus_client import CollectorRegistry, Counter, Histogram

    from forge_observe.metrics import LATENCY, SLOW, NodeMetrics

    import types

    ours = NodeMetrics(node=types.SimpleNamespace(id="n1"), process=False)
    model = CollectorRegistry()
    m_calls = Counter("forge_function_calls", "", ["function", "kind", "code"], registry=model)
    m_seconds = Histogram("forge_function_duration_seconds", "", ["function", "kind"], buckets=LATENCY,
                          registry=model)
    m_wait = Histogram("forge_job_queue_wait_seconds", "", ["job", "queue"], buckets=SLOW, registry=model)
    events = []
    for name, code, seconds in calls:
        events.append(("call", (name, "query", code, seconds)))
        m_calls.labels(name, "query", code).inc()
        m_seconds.labels(name, "query").observe(seconds)
    for name, seconds in batches:
        events.append(("calls", (name, "query", "OK", list(seconds))))
        for value in seconds:
            m_calls.labels(name, "query", "OK").inc()
            m_seconds.labels(name, "query").observe(value)
    m_started = Counter("forge_jobs_started", "", ["job", "queue"], registry=model)
    m_finished = Counter("forge_jobs_finished", "", ["job", "status"], registry=model)
    m_run = Histogram("forge_job_run_seconds", "", ["job"], buckets=SLOW, registry=model)
    for job, seconds, run, outcome in waits:
        started = _T0 + dt.timedelta(seconds=seconds)  # the job's row holds times (to the microsecond)
        events.append(("job.finished", (job, "default", outcome, _T0, started, run)))
        m_wait.labels(job, "default").observe(max(0.0, (started - _T0).total_seconds()))
        m_started.labels(job, "default").inc()
        m_finished.labels(job, outcome).inc()
        m_run.labels(job).observe(run)
    for job, queue, attempts in job_batches:
        started = [_T0 + dt.timedelta(seconds=w) for w, _ in attempts]
        events.append(("jobs", (job, queue, "succeeded", [_T0] * len(attempts), started, [r for _, r in attempts])))
        for at, (_, run) in zip(started, attempts):
            m_wait.labels(job, queue).observe(max(0.0, (at - _T0).total_seconds()))
            m_started.labels(job, queue).inc()
            m_finished.labels(job, "succeeded").inc()
            m_run.labels(job).observe(run)
    m_pushes = Counter("forge_realtime_pushes", "", ["kind"], registry=model)
    for kind, count in pushes:  # one event per fan-out with its count (a bare kind counts one)
        events.append(("rt.push", (kind,) if count is None else (kind, count)))
        m_pushes.labels(kind).inc(1 if count is None else count)
    half = len(events) // 2  # two drains, as the aggregation loop makes them
    assert ours.apply(events[:half] + junk) + ours.apply(events[half:]) == len(events) + len(junk)

    def samples(registry, names):
        return sorted((s.name, tuple(sorted(s.labels.items())), round(s.value, 9))
                      for fam in registry.collect() if fam.name in names for s in fam.samples
                      if not s.name.endswith("_created"))

    names = {"forge_function_calls", "forge_function_duration_seconds", "forge_job_queue_wait_seconds",
             "forge_jobs_started", "forge_jobs_finished", "forge_job_run_seconds", "forge_realtime_pushes"}
    assert samples(ours.registry, names) == samples(model, names)
    malformed = sum(1 for kind, f in junk if kind != "later.kind")
    assert sum(s.value for fam in ours.registry.collect() if fam.name == "forge_observe_dropped"
               for s in fam.samples if s.name.endswith("_total")) == malformed


@given(spacing=st.floats(0.1, 5.0), poll_factor=st.floats(1.0, 10.0),
       hints=st.lists(st.floats(0.0, 100.0), max_size=80))
@settings(max_examples=200, deadline=None)
def test_live_pacer_spaces_refreshes_and_answers_hints(spacing, poll_factor, hints):
    """The dashboard's live refreshes, simulated on a clock: never two within ``spacing`` (at most one
    snapshot statement per second per node, whatever the hints), a refresh within ``spacing`` of every
    hint, and never a gap longer than ``poll``."""
    from forge_observe.dashboard.live import Pacer

    poll = spacing * poll_factor
    pacer = Pacer(spacing, poll)
    hints = sorted(hints)
    refreshes: list[float] = []
    t, i = 0.0, 0
    while t < 120.0:
        due = max(pacer.due(), t)
        if i < len(hints) and hints[i] <= due:
            t = hints[i]
            pacer.hint()
            i += 1
            continue
        t = due
        pacer.refreshed(t)
        refreshes.append(t)
    eps = 1e-9
    assert all(b - a >= spacing - eps for a, b in zip(refreshes, refreshes[1:]))
    assert all(b - a <= poll + eps for a, b in zip(refreshes, refreshes[1:]))
    for h in hints:
        assert any(h - eps <= r <= h + spacing + eps for r in refreshes), (h, refreshes)


async def test_live_hub_refreshes_only_for_the_kinds_its_pages_show():
    """A hint wakes the hub only if a watched page shows that kind of change: a jobs page ignores
    span writes, and the worker's wake-up channel counts as a jobs change."""
    from forge_observe.dashboard.live import Hub, hinted_kinds
    from forge_observe.dashboard.views import Query

    assert hinted_kinds("forge_observe_activity", "logs,metrics@n1") == {"logs", "metrics"}
    assert hinted_kinds("forge_observe_activity", "old-style payload") is None  # unknown: any
    assert hinted_kinds("forge_jobs", "n1") == {"jobs"}
    hub = Hub(None, 1.0, 60.0)
    hub.poke()
    assert not hub.pacer.hinted  # nothing watched
    hub.subscribe(Query("jobs", "jobs?x", "SELECT 1", [], dict), lambda q, raw: "")
    hub.pacer.refreshed(0.0)  # the new view's first refresh
    hub._notified(None, 0, "forge_observe_activity", "spans,metrics@n1")
    assert not hub.pacer.hinted and hub.pacer.due() == 60.0
    hub._notified(None, 0, "forge_jobs", "n1")
    assert hub.pacer.hinted and hub.pacer.due() == 1.0 and hub.hints == 2


@settings(max_examples=80, deadline=None)
@given(bucket=st.integers(0, 14), spread=st.booleans(), durations=st.booleans(), data=st.data())
def test_histogram_batches_are_bucketed_as_one_by_one(bucket, spread, durations, data):
    """A batch's bucket counts and sum are what observing its values one by one gives - for a batch
    whose values all fall in one bucket (counted without a sort: the usual batch), values exactly on
    its bounds included, and for one spread over several buckets."""
    from forge_observe.metrics import SLOW, HistogramSeries

    lo = SLOW[bucket - 1] if bucket else 0.0
    hi = SLOW[bucket] if bucket < len(SLOW) else 2 * SLOW[-1]
    inside = st.sampled_from([hi, lo]) if bucket and bucket < len(SLOW) else st.just(hi)
    inside = inside.filter(lambda v: v > lo or not bucket) | st.floats(lo, hi, exclude_min=bucket > 0)
    values = data.draw(st.lists(inside | st.sampled_from(SLOW) if spread else inside, min_size=1, max_size=40))
    series = HistogramSeries("h", "", ["k"], SLOW, durations=durations)
    if durations:  # queue waits: timedeltas, to the microsecond as a row's times give them
        values = [dt.timedelta(microseconds=round(v * 1e6)) for v in values]
    (counts, total), = series.prepare(None, values, "k").values()
    seconds = [v.total_seconds() for v in values] if durations else values
    expected = [sum(1 for v in seconds if (i == 0 or v > SLOW[i - 1]) and (i == len(SLOW) or v <= SLOW[i]))
                for i in range(len(SLOW) + 1)]
    assert counts == expected and sum(counts) == len(values)
    assert total == pytest.approx(sum(seconds))


def test_queue_waits_are_bucketed_as_times_and_summed_exactly():
    """Queue waits (due -> started, two datetimes) are folded as timedeltas: a wait exactly on a bucket
    bound falls in that bucket (le is inclusive), one started before it was due counts as 0, and the
    sum is exact to the microsecond (0.1 s + 0.2 s is 0.3 s, not 0.30000000000000004)."""
    import types

    from forge_observe.metrics import SLOW, NodeMetrics

    ours = NodeMetrics(node=types.SimpleNamespace(id="n1"), process=False)
    waits = [0.1, 0.2, 0.001, -3.0]
    ours.apply([("job.finished", ("j", "default", "succeeded", _T0, _T0 + dt.timedelta(seconds=w), 0.5))
                for w in waits])
    row = ours.events.job_wait.rows["j", "default"]
    assert row[-1] == 0.301
    assert row[:-1] == [2, 0, 0, 0, 1, 1] + [0] * (len(SLOW) - 5)  # 0 and 0.001 <= 0.001; 0.1; 0.2 <= 0.5


async def test_a_nul_character_or_nan_in_one_record_loses_no_other_record(forge_db_url):
    """PostgreSQL's text holds no NUL character and its jsonb neither ``\\u0000`` nor NaN: one log line
    or span with one of them made a whole COPY batch fail three times and dropped every record in
    it (up to 5,000). They are stored with U+FFFD in the NUL's place and NaN as null."""
    from loguru import logger

    from forge_observe.recorder import LogSink
    from forge_observe.writer import Writer

    conn = await _observe_db(forge_db_url)
    writer = Writer(lambda: asyncpg.connect(forge_db_url), "nul-node", NodeMetrics(None, process=False))
    try:
        today = dt.datetime.now(dt.timezone.utc).date()
        await ensure_partitions(conn, today - dt.timedelta(days=1), today + dt.timedelta(days=1))
        sink = logger.add(LogSink(writer, "nul-node", 4096), format="{message}",
                          filter=lambda r: r["extra"].get("nul_test"))
        try:
            logger.bind(nul_test=1, marker="in\x00extra", ratio=float("nan")).info("before\x00after")
            logger.bind(nul_test=1).info("a plain line")
        finally:
            logger.remove(sink)
        tel = Telemetry()
        got = []
        tel.attach(got.append, sample_rate=1.0)
        root = tel.start_span("nul\x00span", "server", attrs={"k\x00": "v\x00", "n": float("nan"), "ok": 1})
        tel.end_span(root, "bad\x00error")
        writer.add("spans", got[0])
        assert await writer.write_pending() == 3
        logs = await conn.fetch("SELECT message, extra FROM forge_obs_logs WHERE node_id = 'nul-node' ORDER BY at")
        assert [r["message"] for r in logs] == ["before\ufffdafter", "a plain line"]
        extra = json.loads(logs[0]["extra"])
        assert extra["marker"] == "in\ufffdextra" and extra["ratio"] is None
        span = await conn.fetchrow("SELECT name, error, attrs FROM forge_obs_spans WHERE node_id = 'nul-node'")
        assert (span["name"], span["error"]) == ("nul\ufffdspan", "bad\ufffderror")
        assert json.loads(span["attrs"]) == {"k\ufffd": "v\ufffd", "n": None, "ok": 1}
        assert metrics_dropped(writer) == 0
    finally:
        await writer.close(timeout=5)
        await conn.close()


def metrics_dropped(writer) -> float:
    return sum(s.value for m in writer.metrics.dropped.collect() for s in m.samples if s.name.endswith("_total"))


@given(st.text(max_size=50))
def test_json_text_jsonb_takes_keeps_every_text_but_nul(text):
    """``jsonb_text`` replaces only real ``\\u0000`` escapes: a text holding a backslash before
    ``u0000`` (escaped as ``\\\\u0000``) comes back as it was."""
    from forge_observe.writer import jsonb_text

    out = jsonb_text(json.dumps({"t": text}).encode())
    assert "\\u0000" not in out.replace("\\\\", "") and json.loads(out) == {"t": text.replace("\x00", "\ufffd")}


def test_batched_job_successes_hint_the_jobs_pages_and_count():
    """Succeeded attempts reach the observer as a ``jobs`` batch (Telemetry.job_ended), not as
    ``job.finished`` events: the aggregation still counts them and hints the dashboard's jobs pages."""
    import types

    from forge_kernel.telemetry import Telemetry
    from forge_observe.config import ObserveConfig
    from forge_observe.service import Observer

    tel = Telemetry()
    node = types.SimpleNamespace(id="n1", config={"observe": ObserveConfig()}, telemetry=tel)
    obs = Observer(node)
    hints: list[set] = []
    obs.writer = types.SimpleNamespace(hint=hints.append)
    tel.attach(lambda t: None, sample_rate=0.0)
    for i in range(3):
        tel.job_ended("j", "default", "succeeded", _T0, _T0 + dt.timedelta(seconds=i), 0.25)
    assert obs.aggregate() == 1 and hints == [{"jobs"}]
    ev = obs.metrics.events
    assert ev.jobs_started.values == {("j", "default"): 3} and ev.jobs_finished.values == {("j", "succeeded"): 3}
    assert ev.job_wait.rows["j", "default"][-1] == 3.0 and ev.job_seconds.rows["j"][-1] == 0.75
