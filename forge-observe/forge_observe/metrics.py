"""In-process metrics of one node: event series aggregated off the hot path, served by ``prometheus_client``.

The hot paths only append tuples (``node.telemetry.emit``, the executor's ``call`` events).
:meth:`NodeMetrics.apply` folds a drained batch into plain dicts (a count per label set, bucket
counts and a sum per histogram label set): a dict lookup and an add per event. ``prometheus_client``
is used for what it is good at: the exposition format (a collector builds the families when
``/metrics`` is scraped or a snapshot is taken) and the process, GC and the observer's own counters.
:meth:`NodeMetrics.snapshot` reads every series back as rows for PostgreSQL.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import time
from bisect import bisect_left
from typing import Any, Callable, Iterable, Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.gc_collector import GCCollector
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

#: seconds; function calls and live-query re-runs are mostly milliseconds
LATENCY = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
#: seconds; queue waits, job run times and cron lag reach minutes
SLOW = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0)

#: a kept-or-not outcome label for every function call; codes of the kernel's ForgeError plus these
OK = "OK"


class CounterSeries:
    """A counter per label set (``values[label values] = count``)."""

    __slots__ = ("name", "help", "labels", "values")

    def __init__(self, name: str, help: str, labels: Sequence[str]) -> None:
        self.name, self.help, self.labels = name, help, list(labels)
        self.values: dict[tuple, float] = {}

    def add(self, key: tuple, n: float = 1) -> None:
        self.values[key] = self.values.get(key, 0) + n

    def family(self) -> CounterMetricFamily:
        fam = CounterMetricFamily(self.name, self.help, labels=self.labels)
        for key, value in list(self.values.items()):
            fam.add_metric([str(v) for v in key], value)
        return fam


class HistogramSeries:
    """Bucket counts and a sum per label set: ``rows[label values] = [n per bucket..., n above, sum]``."""

    __slots__ = ("name", "help", "labels", "bounds", "rows", "_le")

    def __init__(self, name: str, help: str, labels: Sequence[str], bounds: Sequence[float]) -> None:
        self.name, self.help, self.labels, self.bounds = name, help, list(labels), tuple(bounds)
        self.rows: dict[tuple, list] = {}
        self._le = [floatToGoString(b) for b in self.bounds] + ["+Inf"]

    def row(self, key: tuple) -> list:
        row = self.rows.get(key)
        if row is None:
            row = self.rows[key] = [0] * (len(self.bounds) + 1) + [0.0]
        return row

    def observe(self, key: tuple, value: float) -> None:
        """Raises (TypeError, ValueError) before changing anything when ``value`` is not a number."""
        i = bisect_left(self.bounds, value)  # le is inclusive: the first bound >= value
        if value != value:  # NaN: no bucket holds it, and it would poison the sum
            raise ValueError("NaN")
        row = self.row(key)
        row[i] += 1
        row[-1] += value

    def family(self) -> HistogramMetricFamily:
        fam = HistogramMetricFamily(self.name, self.help, labels=self.labels)
        for key, row in list(self.rows.items()):
            total, buckets = 0, []
            for le, n in zip(self._le, row):
                total += n
                buckets.append((le, total))
            fam.add_metric([str(v) for v in key], buckets, sum_value=row[-1])
        return fam


class EventSeries(Collector):
    """Every series fed from telemetry events, exposed through ``prometheus_client``."""

    def __init__(self) -> None:
        c, h = CounterSeries, HistogramSeries
        self.calls = c("forge_function_calls", "Function calls by outcome code", ["function", "kind", "code"])
        self.call_seconds = h("forge_function_duration_seconds", "Function call latency", ["function", "kind"],
                              LATENCY)
        self.jobs_dispatched = c("forge_jobs_dispatched", "Jobs stored by this node (a rolled-back mutation's "
                                 "jobs included)", ["job", "queue"])
        self.jobs_started = c("forge_jobs_started", "Job attempts started on this node", ["job", "queue"])
        self.job_wait = h("forge_job_queue_wait_seconds", "From due to started", ["job", "queue"], SLOW)
        self.jobs_finished = c("forge_jobs_finished", "Job attempts ended, by status (succeeded, failed = will "
                               "retry, dead, cancelled, retry_later)", ["job", "status"])
        self.job_seconds = h("forge_job_run_seconds", "Job attempt run time", ["job"], SLOW)
        self.cron_runs = c("forge_cron_runs", "Cron runs ended on this node, by status", ["cron", "status"])
        self.cron_lag = h("forge_cron_lag_seconds", "From the scheduled slot to the start of its run", ["cron"],
                          SLOW)
        self.cron_missed = c("forge_cron_missed_slots", "Slots missed while no leader ran (dropped past "
                             "catch_up)", ["cron"])
        self.workflow_runs = c("forge_workflow_runs", "Workflow runs by status", ["workflow", "status"])
        self.workflow_steps = c("forge_workflow_steps", "Workflow steps by status", ["workflow", "step", "status"])
        self.workflow_step_seconds = h("forge_workflow_step_seconds", "Workflow step run time",
                                       ["workflow", "step"], SLOW)
        self.compensations = c("forge_workflow_compensations", "Compensations run, by status",
                               ["workflow", "step", "status"])
        self.pushes = c("forge_realtime_pushes", "Live-query results sent", ["kind"])
        self.reruns = c("forge_realtime_reruns", "Live-query re-runs", ["function"])
        self.rerun_seconds = h("forge_realtime_rerun_seconds", "Live-query re-run time", ["function"], LATENCY)
        self.all = [v for v in vars(self).values() if isinstance(v, (CounterSeries, HistogramSeries))]

    def collect(self) -> Iterable[Any]:
        for series in self.all:
            yield series.family()

    def apply(self, events: Iterable[tuple], malformed: Callable[[], None]) -> int:
        """Fold drained events into the series; unknown kinds are ignored (newer emitters). A
        malformed event changes nothing (its histogram value is checked before its counter moves)."""
        n = 0
        calls = self.calls.values
        call_rows, latency = self.call_seconds.rows, self.call_seconds.bounds
        for kind, f in events:
            n += 1
            try:
                if kind == "call":  # one per function call: the hottest, inlined
                    name, fkind, code, seconds = f
                    i = bisect_left(latency, seconds)
                    if seconds != seconds:
                        raise ValueError("NaN")
                    key = (name, fkind, code)
                    calls[key] = calls.get(key, 0) + 1
                    row = call_rows.get(key[:2])
                    if row is None:
                        row = self.call_seconds.row(key[:2])
                    row[i] += 1
                    row[-1] += seconds
                elif kind == "job.dispatched":
                    self.jobs_dispatched.add((f[0], f[1]))
                elif kind == "job.started":
                    self.job_wait.observe((f[0], f[1]), f[2])
                    self.jobs_started.add((f[0], f[1]))
                elif kind == "job.finished":
                    name, status, seconds = f
                    if seconds is not None:
                        self.job_seconds.observe((name,), seconds)
                    self.jobs_finished.add((name, status))
                elif kind == "cron.run":
                    name, status, lag = f
                    if lag is not None:
                        self.cron_lag.observe((name,), lag)
                    self.cron_runs.add((name, status))
                elif kind == "cron.missed":
                    if not f[1] >= 0:
                        raise ValueError("not a count")
                    self.cron_missed.add((f[0],), f[1])
                elif kind == "rt.push":
                    self.pushes.add((f[0],))
                elif kind == "rt.rerun":
                    self.rerun_seconds.observe((f[0],), f[1])
                    self.reruns.add((f[0],))
                elif kind == "workflow.run":
                    self.workflow_runs.add((f[0], f[1]))
                elif kind == "workflow.step":
                    if len(f) > 3 and f[3] is not None:
                        self.workflow_step_seconds.observe((f[0], f[1]), f[3])
                    self.workflow_steps.add((f[0], f[1], f[2]))
                elif kind == "workflow.compensation":
                    self.compensations.add((f[0], f[1], f[2]))
            except (ValueError, TypeError, IndexError):
                malformed()
        return n


class NodeMetrics:
    """One node's registry (never the global default one: tests run several nodes per process)."""

    def __init__(self, node: Any, process: bool = True) -> None:
        self.node = node
        self.registry = r = CollectorRegistry(auto_describe=False)
        self.events = EventSeries()
        r.register(self.events)
        self.loop_lag = Gauge("forge_event_loop_lag_seconds", "Largest event-loop delay seen in the last "
                              "sampling period", registry=r)
        self.dropped = Counter("forge_observe_dropped", "Telemetry records lost (never the app's work), by kind "
                               "and reason", ["kind", "reason"], registry=r)
        self.written = Counter("forge_observe_written", "Telemetry records stored in PostgreSQL", ["kind"],
                               registry=r)
        self.reconnects = Counter("forge_observe_writer_reconnects", "Times the telemetry writer lost its "
                                  "database connection and opened a new one", registry=r)
        self.exported = Counter("forge_observe_exported_spans", "Spans sent to the OTLP endpoint", registry=r)
        self.traces = Counter("forge_observe_traces", "Local traces finished, by sampling decision (discarded: "
                              "nothing to keep them for)", ["decision"], registry=r)
        self.node_collector = NodeCollector(node)
        r.register(self.node_collector)
        if process:
            ProcessCollector(registry=r)
            GCCollector(registry=r)
        self._events_dropped_seen = 0
        self._discarded_seen = 0

    def apply(self, events: Iterable[tuple]) -> int:
        """Aggregate drained telemetry events (off the hot path); also brings the ring's loss count
        and the kernel's count of discarded traces into their series."""
        n = self.events.apply(events, lambda: self.drop("events", "malformed"))
        tel = getattr(self.node, "telemetry", None)
        if tel is not None:
            if tel.dropped > self._events_dropped_seen:
                self.drop("events", "ring_full", tel.dropped - self._events_dropped_seen)
                self._events_dropped_seen = tel.dropped
            discarded = getattr(tel, "discarded", 0)
            if discarded > self._discarded_seen:
                self.traces.labels("discarded").inc(discarded - self._discarded_seen)
                self._discarded_seen = discarded
        return n

    def drop(self, kind: str, reason: str, n: int = 1) -> None:
        if n > 0:
            self.dropped.labels(kind, reason).inc(n)

    # --- series -> rows ----------------------------------------------------------------
    def snapshot(self, at: dt.datetime, node_id: str) -> list[tuple]:
        """Every series as a row of forge_obs_metrics: (at, node, name, labels json, value, sum, bounds, buckets)."""
        return series_rows(self.registry.collect(), at, node_id)

def series_rows(families: Iterable[Any], at: dt.datetime, node_id: str) -> list[tuple]:
    rows: list[tuple] = []
    for fam in families:
        if fam.type == "histogram":
            hist: dict[str, dict[str, Any]] = {}
            for s in fam.samples:
                labels = {k: v for k, v in s.labels.items() if k != "le"}
                key = json.dumps(labels, sort_keys=True)
                h = hist.setdefault(key, {"buckets": [], "count": 0.0, "sum": None})
                if s.name.endswith("_bucket"):
                    h["buckets"].append((float(s.labels["le"]), s.value))
                elif s.name.endswith("_count"):
                    h["count"] = s.value
                elif s.name.endswith("_sum"):
                    h["sum"] = s.value
            for key, h in hist.items():
                b = sorted(h["buckets"])
                rows.append((at, node_id, fam.name, key, float(h["count"]), h["sum"],
                             [x if math.isfinite(x) else None for x, _ in b] if b else None,
                             [c for _, c in b] if b else None))
            continue
        for s in fam.samples:
            if s.name.endswith("_created"):
                continue
            if fam.type == "counter" and not s.name.endswith("_total"):
                continue
            rows.append((at, node_id, s.name, json.dumps(s.labels, sort_keys=True), float(s.value), None, None, None))
    return rows


def quantile(q: float, bounds: Sequence[float | None], cumulative: Sequence[float]) -> float | None:
    """The ``q`` quantile of a histogram from cumulative bucket counts (Prometheus'
    ``histogram_quantile`` interpolation); ``None`` bound means +Inf. None when empty."""
    if not cumulative or cumulative[-1] <= 0:
        return None
    rank = q * cumulative[-1]
    prev_bound, prev_count = 0.0, 0.0
    for bound, count in zip(bounds, cumulative):
        if count >= rank:
            if bound is None:  # in the +Inf bucket: the highest finite bound is the best answer
                return prev_bound
            if count == prev_count:
                return bound
            return prev_bound + (bound - prev_bound) * (rank - prev_count) / (count - prev_count)
        prev_bound, prev_count = (bound if bound is not None else prev_bound), count
    return prev_bound


class NodeCollector(Collector):
    """Gauges read when scraped: the node, its pools, what its packages registered
    (``node.telemetry.gauge``), and the cluster gauges while this node is the leader."""

    def __init__(self, node: Any) -> None:
        self.node = node
        #: name -> (help, labels, [(label values, value)], collected at (monotonic)), set by the leader's task
        self.cluster: dict[str, tuple[str, tuple[str, ...], list[tuple[tuple[str, ...], float]], float]] = {}
        #: cluster values older than this many seconds are not exported (leadership moved on)
        self.cluster_ttl = 30.0
        self.loop_lag: Callable[[], float] | None = None

    def collect(self) -> Iterable[Any]:
        node = self.node
        info = GaugeMetricFamily("forge_node_info", "This node (value 1)", labels=["node", "version", "roles"])
        info.add_metric([str(node.id), str(getattr(node, "version", "")), ",".join(getattr(node, "roles", []))], 1)
        yield info
        pools = GaugeMetricFamily("forge_db_pool_connections", "Database pool connections by state",
                                  labels=["pool", "state"])
        for name, pool in (("main", getattr(node, "pool", None)), ("query", getattr(node, "query_pool", None))):
            if pool is None:
                continue
            try:
                size, idle = pool.get_size(), pool.get_idle_size()
            except Exception:  # closed while we look
                continue
            pools.add_metric([name, "in_use"], size - idle)
            pools.add_metric([name, "idle"], idle)
            # callers waiting for a connection: asyncpg keeps them on its holder queue (no public API)
            waiters = getattr(getattr(pool, "_queue", None), "_getters", None)
            pools.add_metric([name, "waiting"], len(waiters) if waiters is not None else 0)
        yield pools
        tel = getattr(node, "telemetry", None)
        for name, (help_, labels, read) in list((tel.gauges if tel is not None else {}).items()):
            fam = GaugeMetricFamily(name, help_, labels=list(labels))
            try:
                value = read()
                if labels:
                    for lv, v in value:
                        fam.add_metric([str(x) for x in lv], float(v))
                else:
                    fam.add_metric([], float(value))
            except Exception:
                continue
            yield fam
        now = time.monotonic()
        for name, (help_, labels, values, at) in list(self.cluster.items()):
            if now - at > self.cluster_ttl:
                continue
            fam = GaugeMetricFamily(name, help_ + " (cluster-wide, from the leader)", labels=list(labels))
            for lv, v in values:
                fam.add_metric([str(x) for x in lv], float(v))
            yield fam
