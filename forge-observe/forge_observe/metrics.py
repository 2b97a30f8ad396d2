"""In-process metrics of one node: a ``prometheus_client`` registry fed from telemetry events.

The hot paths only append tuples (``node.telemetry.emit``); :meth:`NodeMetrics.apply` turns a
drained batch into counter increments and histogram observations, off the request path.
:meth:`NodeMetrics.snapshot` reads every series back as rows for PostgreSQL.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import time
from typing import Any, Callable, Iterable, Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.gc_collector import GCCollector
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

#: seconds; function calls and live-query re-runs are mostly milliseconds
LATENCY = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
#: seconds; queue waits, job run times and cron lag reach minutes
SLOW = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0)

#: a kept-or-not outcome label for every function call; codes of the kernel's ForgeError plus these
OK = "OK"


class NodeMetrics:
    """One node's registry (never the global default one: tests run several nodes per process)."""

    def __init__(self, node: Any, process: bool = True) -> None:
        self.node = node
        self.registry = r = CollectorRegistry(auto_describe=False)
        self.calls = Counter("forge_function_calls", "Function calls by outcome code",
                             ["function", "kind", "code"], registry=r)
        self.call_seconds = Histogram("forge_function_duration_seconds", "Function call latency",
                                      ["function", "kind"], buckets=LATENCY, registry=r)
        self.jobs_dispatched = Counter("forge_jobs_dispatched", "Jobs stored by this node (a rolled-back "
                                       "mutation's jobs included)", ["job", "queue"], registry=r)
        self.jobs_started = Counter("forge_jobs_started", "Job attempts started on this node", ["job", "queue"],
                                    registry=r)
        self.job_wait = Histogram("forge_job_queue_wait_seconds", "From due to started", ["job", "queue"],
                                  buckets=SLOW, registry=r)
        self.jobs_finished = Counter("forge_jobs_finished", "Job attempts ended, by status (succeeded, failed "
                                     "= will retry, dead, cancelled, retry_later)", ["job", "status"], registry=r)
        self.job_seconds = Histogram("forge_job_run_seconds", "Job attempt run time", ["job"], buckets=SLOW,
                                     registry=r)
        self.cron_runs = Counter("forge_cron_runs", "Cron runs ended on this node, by status", ["cron", "status"],
                                 registry=r)
        self.cron_lag = Histogram("forge_cron_lag_seconds", "From the scheduled slot to the start of its run",
                                  ["cron"], buckets=SLOW, registry=r)
        self.cron_missed = Counter("forge_cron_missed_slots", "Slots missed while no leader ran", ["cron"],
                                   registry=r)
        self.workflow_runs = Counter("forge_workflow_runs", "Workflow runs by status", ["workflow", "status"],
                                     registry=r)
        self.workflow_steps = Counter("forge_workflow_steps", "Workflow steps by status",
                                      ["workflow", "step", "status"], registry=r)
        self.workflow_step_seconds = Histogram("forge_workflow_step_seconds", "Workflow step run time",
                                               ["workflow", "step"], buckets=SLOW, registry=r)
        self.compensations = Counter("forge_workflow_compensations", "Compensations run, by status",
                                     ["workflow", "step", "status"], registry=r)
        self.pushes = Counter("forge_realtime_pushes", "Live-query results sent", ["kind"], registry=r)
        self.reruns = Counter("forge_realtime_reruns", "Live-query re-runs", ["function"], registry=r)
        self.rerun_seconds = Histogram("forge_realtime_rerun_seconds", "Live-query re-run time", ["function"],
                                       buckets=LATENCY, registry=r)
        self.loop_lag = Gauge("forge_event_loop_lag_seconds", "Largest event-loop delay seen in the last "
                              "sampling period", registry=r)
        self.dropped = Counter("forge_observe_dropped", "Telemetry records lost (never the app's work), by kind "
                               "and reason", ["kind", "reason"], registry=r)
        self.written = Counter("forge_observe_written", "Telemetry records stored in PostgreSQL", ["kind"],
                               registry=r)
        self.reconnects = Counter("forge_observe_writer_reconnects", "Times the telemetry writer lost its "
                                  "database connection and opened a new one", registry=r)
        self.exported = Counter("forge_observe_exported_spans", "Spans sent to the OTLP endpoint", registry=r)
        self.traces = Counter("forge_observe_traces", "Local traces finished, by sampling decision", ["decision"],
                              registry=r)
        self.node_collector = NodeCollector(node)
        r.register(self.node_collector)
        if process:
            ProcessCollector(registry=r)
            GCCollector(registry=r)
        self._children: dict[tuple, Any] = {}
        self._events_dropped_seen = 0

    # --- events -> series ------------------------------------------------------------
    def _child(self, metric: Any, labels: tuple) -> Any:
        key = (id(metric), labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    def apply(self, events: Iterable[tuple]) -> int:
        """Aggregate drained telemetry events; unknown kinds are ignored (newer emitters)."""
        n = 0
        child = self._child
        for kind, f in events:
            n += 1
            try:
                if kind == "call":
                    name, fkind, code, seconds = f
                    child(self.calls, (name, fkind, code)).inc()
                    child(self.call_seconds, (name, fkind)).observe(seconds)
                elif kind == "job.dispatched":
                    child(self.jobs_dispatched, (f[0], f[1])).inc()
                elif kind == "job.started":
                    child(self.jobs_started, (f[0], f[1])).inc()
                    child(self.job_wait, (f[0], f[1])).observe(f[2])
                elif kind == "job.finished":
                    name, status, seconds = f
                    child(self.jobs_finished, (name, status)).inc()
                    if seconds is not None:
                        child(self.job_seconds, (name,)).observe(seconds)
                elif kind == "cron.run":
                    name, status, lag = f
                    child(self.cron_runs, (name, status)).inc()
                    if lag is not None:
                        child(self.cron_lag, (name,)).observe(lag)
                elif kind == "cron.missed":
                    child(self.cron_missed, (f[0],)).inc(f[1])
                elif kind == "rt.push":
                    child(self.pushes, (f[0],)).inc()
                elif kind == "rt.rerun":
                    child(self.reruns, (f[0],)).inc()
                    child(self.rerun_seconds, (f[0],)).observe(f[1])
                elif kind == "workflow.run":
                    child(self.workflow_runs, (f[0], f[1])).inc()
                elif kind == "workflow.step":
                    child(self.workflow_steps, (f[0], f[1], f[2])).inc()
                    if len(f) > 3 and f[3] is not None:
                        child(self.workflow_step_seconds, (f[0], f[1])).observe(f[3])
                elif kind == "workflow.compensation":
                    child(self.compensations, (f[0], f[1], f[2])).inc()
            except (ValueError, TypeError, IndexError):
                self.drop("events", "malformed")
        tel = getattr(self.node, "telemetry", None)
        if tel is not None and tel.dropped > self._events_dropped_seen:
            self.drop("events", "ring_full", tel.dropped - self._events_dropped_seen)
            self._events_dropped_seen = tel.dropped
        return n

    def drop(self, kind: str, reason: str, n: int = 1) -> None:
        if n > 0:
            self._child(self.dropped, (kind, reason)).inc(n)

    def dropped_total(self, kind: str | None = None) -> float:
        total = 0.0
        for metric in self.dropped.collect():
            for s in metric.samples:
                if s.name.endswith("_total") and (kind is None or s.labels.get("kind") == kind):
                    total += s.value
        return total

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
