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
import operator
import time
from bisect import bisect_left, bisect_right
from collections import Counter as Tally
from itertools import compress, groupby, repeat
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


def _labels(key: Any) -> list[str]:
    return [str(v) for v in key] if isinstance(key, tuple) else [str(key)]


class CounterSeries:
    """A counter per label set (``values[label values] = count``; a single label's value is the key)."""

    __slots__ = ("name", "help", "labels", "values")

    def __init__(self, name: str, help: str, labels: Sequence[str]) -> None:
        self.name, self.help, self.labels = name, help, list(labels)
        self.values: dict[Any, float] = {}

    def prepare(self, keys: list | None, amounts: list, key: Any = None) -> dict:
        """The increments of a batch (``keys`` None: every amount is ``key``'s). Checked: a negative
        or non-numeric amount raises. (Counts of one per event come from EventSeries' tally.)"""
        if not all(map(operator.ge, amounts, repeat(0))):
            raise ValueError("a counter only goes up")
        if keys is None:
            return {key: sum(amounts)}
        delta: dict = {}
        for k, n in zip(keys, amounts):
            delta[k] = delta.get(k, 0) + n
        return delta

    def commit(self, delta: dict) -> None:
        values = self.values
        for k, n in delta.items():
            values[k] = values.get(k, 0) + n

    def family(self) -> CounterMetricFamily:
        fam = CounterMetricFamily(self.name, self.help, labels=self.labels)
        for key, value in list(self.values.items()):
            fam.add_metric(_labels(key), value)
        return fam


class HistogramSeries:
    """Bucket counts and a sum per label set: ``rows[label values] = [n per bucket..., n above, sum]``."""

    __slots__ = ("name", "help", "labels", "bounds", "rows", "_le", "durations", "_sort_bounds")

    def __init__(self, name: str, help: str, labels: Sequence[str], bounds: Sequence[float],
                 durations: bool = False) -> None:
        self.name, self.help, self.labels, self.bounds = name, help, list(labels), tuple(bounds)
        self.rows: dict[Any, list] = {}
        self._le = [floatToGoString(b) for b in self.bounds] + ["+Inf"]
        #: values are timedeltas (bucketed against the bounds as timedeltas, the sum kept in seconds)
        self.durations = durations
        self._sort_bounds = tuple(dt.timedelta(seconds=b) for b in self.bounds) if durations else self.bounds

    def prepare(self, keys: list | None, values: list, key: Any = None) -> dict:
        """A batch's bucket counts and sum per label set (``keys`` None: every value is ``key``'s).
        Checked: a value that is not a number, or NaN, raises. When a label set's smallest and
        largest values fall in one bucket (the usual batch: a job type's run times, or its queue
        waits in a steady queue), that bucket gets them all: two passes in C, no sort. Otherwise its
        values are sorted (in C) and every bound is bisected into them: per value the work is the
        sort's few comparisons, not a bucket search, a tuple and a count."""
        if keys is None:  # the usual batch: one job, one queue
            groups: Any = ((key, values),)
        elif (distinct := set(keys)) and len(distinct) == 1:
            groups = ((keys[0], values),)
        elif len(distinct) <= 8:
            groups = ((k, list(compress(values, map(operator.eq, keys, repeat(k))))) for k in distinct)
        else:
            grouped: dict = {}
            for k, v in zip(keys, values):
                grouped.setdefault(k, []).append(v)
            groups = grouped.items()
        bounds = self._sort_bounds
        delta = {}
        for k, vals in groups:
            if self.durations:  # a value that is no timedelta raises here
                total = sum(vals, _NO_TIME).total_seconds()
            else:
                total = sum(vals)  # in event order (as prometheus_client adds them); a str raises here
                if total != total:  # NaN: no bucket holds it, and it would poison the sum
                    raise ValueError("NaN")
            # le is inclusive: a value's bucket is the first whose bound is >= it (the last: above
            # every bound); a value that is no number raises in min/max or bisect
            first = bisect_left(bounds, min(vals))
            if first == bisect_left(bounds, max(vals)):
                counts = [0] * (len(bounds) + 1)
                counts[first] = len(vals)
            else:
                ordered = sorted(vals)
                below = [bisect_right(ordered, b) for b in bounds]
                counts = list(map(operator.sub, below, [0] + below[:-1]))
                counts.append(len(ordered) - below[-1])
            delta[k] = (counts, total)
        return delta

    def commit(self, delta: dict) -> None:
        rows, width = self.rows, len(self.bounds) + 1
        for k, (counts, total) in delta.items():
            row = rows.get(k)
            if row is None:
                row = rows[k] = [0] * width + [0.0]
            for i, n in enumerate(counts):
                if n:
                    row[i] += n
            row[-1] += total

    def family(self) -> HistogramMetricFamily:
        fam = HistogramMetricFamily(self.name, self.help, labels=self.labels)
        for key, row in list(self.rows.items()):
            total, buckets = 0, []
            for le, n in zip(self._le, row):
                total += n
                buckets.append((le, total))
            fam.add_metric(_labels(key), buckets, sum_value=row[-1])
        return fam


def _get(*indices: int) -> Callable[[list], list]:
    """A batch's values at ``indices`` of each event's fields (one tuple per event for several)."""
    getter = operator.itemgetter(*indices)
    return lambda fields: list(map(getter, fields))


def _optional(index: int) -> Callable[[list], list]:
    """A batch's values at ``index``, None for events with fewer fields."""
    return lambda fields: [f[index] if len(f) > index else None for f in fields]


def _count(index: int) -> Callable[[list], list]:
    """A batch's counts at ``index``, 1 for events with fewer fields (one event per occurrence)."""
    return lambda fields: [f[index] if len(f) > index else 1 for f in fields]


def _wait(due: int, started: int) -> Callable[[list], list]:
    """The time from ``due`` to ``started`` (two datetimes per event) as timedeltas, at least 0, worked
    out in C. Left as timedeltas: a histogram of durations (``HistogramSeries(durations=True)``)
    buckets and sums them as they are, converting only the sum to seconds (timedelta.total_seconds
    per event was a sixth of forge-observe's instructions per job in bench/jobs/instructions.py)."""
    due_at, started_at = operator.itemgetter(due), operator.itemgetter(started)
    return lambda fields: _waits(map(started_at, fields), map(due_at, fields))


def _waits(started: Iterable, due: Iterable) -> list:
    """``started - due`` pairwise as timedeltas (at least 0), in C; at least one pair."""
    deltas = list(map(operator.sub, started, due))
    if min(deltas) < _NO_TIME:  # started before due (clocks of two nodes): no wait
        deltas = list(map(max, deltas, repeat(_NO_TIME)))
    return deltas


_NO_TIME = dt.timedelta(0)
_KIND, _FIELDS = operator.itemgetter(0), operator.itemgetter(1)


class EventSeries(Collector):
    """Every series fed from telemetry events, exposed through ``prometheus_client``.

    A drained batch is grouped by event kind and folded kind by kind with C-level iteration
    (``Counter``, ``map``, ``sorted``; see :class:`_KindSpec`): no Python bytecode runs per event,
    which matters because it runs in the node's process like the work it measures. A batch with a
    malformed event is folded again event by event, the bad ones counted."""

    def __init__(self) -> None:
        c, h = CounterSeries, HistogramSeries
        self.calls = c("forge_function_calls", "Function calls by outcome code", ["function", "kind", "code"])
        self.call_seconds = h("forge_function_duration_seconds", "Function call latency", ["function", "kind"],
                              LATENCY)
        self.jobs_dispatched = c("forge_jobs_dispatched", "Jobs stored by this node (a rolled-back mutation's "
                                 "jobs included)", ["job", "queue"])
        self.jobs_started = c("forge_jobs_started", "Job attempts run on this node (counted as each ends: the "
                              "cluster's running ones are forge_jobs{status=\"running\"})", ["job", "queue"])
        self.job_wait = h("forge_job_queue_wait_seconds", "From due to started", ["job", "queue"], SLOW,
                          durations=True)
        self.jobs_finished = c("forge_jobs_finished", "Job attempts ended, by status (succeeded, failed = will "
                               "retry, dead, cancelled, retry_later, lost = lease lost, released = node "
                               "stopping)", ["job", "status"])
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
        #: event kind -> how its events feed which series: [(series, the field indices of its labels, a
        #: batch's values or amounts (None: one per event), values may be None)] (the fields of each
        #: kind: the table in forge_kernel.telemetry)
        self.specs: dict[str, _KindSpec] = {kind: _KindSpec(spec) for kind, spec in {
            "call": [(self.calls, (0, 1, 2), None, False), (self.call_seconds, (0, 1), _get(3), False)],
            "job.finished": [(self.jobs_started, (0, 1), None, False),
                             (self.jobs_finished, (0, 2), None, False),
                             (self.job_wait, (0, 1), _wait(3, 4), False),
                             (self.job_seconds, (0,), _get(5), False)],
            "job.dispatched": [(self.jobs_dispatched, (0, 1), None, False)],
            "cron.run": [(self.cron_runs, (0, 1), None, False), (self.cron_lag, (0,), _get(2), True)],
            "cron.missed": [(self.cron_missed, (0,), _get(1), False)],
            "rt.push": [(self.pushes, (0,), _count(1), False)],
            "rt.rerun": [(self.reruns, (0,), None, False), (self.rerun_seconds, (0,), _get(1), False)],
            "workflow.run": [(self.workflow_runs, (0, 1), None, False)],
            "workflow.step": [(self.workflow_steps, (0, 1, 2), None, False),
                              (self.workflow_step_seconds, (0, 1), _optional(3), True)],
            "workflow.compensation": [(self.compensations, (0, 1, 2), None, False)],
        }.items()}
        self.specs["calls"] = _BatchSpec(self.calls, self.call_seconds)  # type: ignore[assignment]
        self.specs["jobs"] = _JobBatchSpec(self.jobs_started, self.jobs_finished, self.job_wait,  # type: ignore[assignment]
                                           self.job_seconds)

    def collect(self) -> Iterable[Any]:
        for series in self.all:
            yield series.family()

    def apply(self, events: Sequence[tuple], malformed: Callable[[], None]) -> int:
        """Fold drained ``(kind, fields)`` events into the series; unknown kinds are ignored (newer
        emitters). A malformed event changes nothing: ``malformed()`` is called for it."""
        # runs of one kind (a job drain is one run; a mix is folded run by run: sorting cost more)
        for kind, group in groupby(events, _KIND):
            try:
                spec = self.specs.get(kind)
            except TypeError:  # an unhashable kind
                spec = None
            if spec is None:
                continue
            fields = list(map(_FIELDS, group))
            try:
                spec.fold(fields)
            except (TypeError, ValueError, IndexError):
                for f in fields:
                    try:
                        spec.fold([f])
                    except (TypeError, ValueError, IndexError):
                        malformed()
        return len(events)


class _KindSpec:
    """How a batch of events of one kind is folded into its series.

    Per event the work is in C: one tuple of its label values (every label any of the kind's
    series uses), compared with the first event's (or counted in a ``Counter`` when the batch has
    several label sets), and the value columns. The counts of one per event come straight from
    that tally's few distinct label sets; histograms get their values with one label set for the
    whole batch in the usual case (one job name, queue and outcome)."""

    def __init__(self, spec: list[tuple[Any, tuple[int, ...], Callable | None, bool]]) -> None:
        union = sorted({i for _, labels, _, _ in spec for i in labels})
        self.labels = operator.itemgetter(*union)  # one index: the value itself, else a tuple
        self.series = []
        for series, labels, value, optional in spec:
            where = tuple(union.index(i) for i in labels)
            # a series' key from the tally's key: the same shape _get(*labels) gives (value or tuple)
            project = None if len(union) == 1 else operator.itemgetter(*where)
            self.series.append((series, project, value, optional))

    def fold(self, fields: list) -> None:
        # every series' share is computed (and checked) before any is changed
        keys_all = list(map(self.labels, fields))
        first = keys_all[0]
        if keys_all.count(first) == len(keys_all):
            # the usual batch: one label set (equality is cheaper than hashing each event's fresh strings)
            hash(first)  # an unhashable label fails here as in a Counter
            tally: dict = {first: len(keys_all)}
            only = first
        else:
            tally = Tally(keys_all)
            only = None
        deltas = []
        for series, project, value, optional in self.series:
            if value is None:  # one per event
                if project is None:
                    delta = dict(tally)
                else:
                    delta = {}
                    for k, n in tally.items():
                        k = project(k)
                        delta[k] = delta.get(k, 0) + n
                deltas.append((series, delta))
                continue
            values = value(fields)
            key, keys = None, None
            if only is not None:
                key = only if project is None else project(only)
            else:
                keys = keys_all if project is None else list(map(project, keys_all))
            if optional and any(map(operator.is_, values, repeat(None))):
                kept = list(map(operator.is_not, values, repeat(None)))
                values = list(compress(values, kept))
                if keys is not None:
                    keys = list(compress(keys, kept))
                if not values:
                    continue
            deltas.append((series, series.prepare(keys, values, key)))
        for series, delta in deltas:
            series.commit(delta)


class _BatchSpec:
    """How ``calls`` events are folded: each is one function's successful calls since the last drain
    (function, kind, code, [seconds, ...]), so a counter gets the batch's length and a histogram its
    values under one label set - the histogram's sort and bisection, nothing per call in Python."""

    def __init__(self, counter: CounterSeries, histogram: HistogramSeries) -> None:
        self.counter, self.histogram = counter, histogram

    def fold(self, fields: list) -> None:
        # every batch's share is computed (and checked) before any series is changed
        deltas = []
        for name, kind, code, seconds in fields:
            if not isinstance(seconds, list):
                raise TypeError("a calls event holds a list of seconds")
            if not seconds:
                continue
            deltas.append((self.counter, self.counter.prepare(None, [len(seconds)], (name, kind, code))))
            deltas.append((self.histogram, self.histogram.prepare(None, seconds, (name, kind))))
        for series, delta in deltas:
            series.commit(delta)


class _JobBatchSpec:
    """How ``jobs`` events are folded: each is one job type's succeeded attempts in one queue since
    the last drain (name, queue, ``succeeded``, [due], [started], [seconds]) - the same series as
    its attempts' ``job.finished`` events would feed, with the batch's length as the counts and its
    columns as the histograms' values: nothing per attempt in Python."""

    def __init__(self, started: CounterSeries, finished: CounterSeries, wait: HistogramSeries,
                 seconds: HistogramSeries) -> None:
        self.started, self.finished, self.wait, self.seconds = started, finished, wait, seconds

    def fold(self, fields: list) -> None:
        # every batch's share is computed (and checked) before any series is changed
        deltas = []
        for name, queue, outcome, due, started, seconds in fields:
            n = len(seconds)
            if not (isinstance(due, list) and isinstance(started, list) and isinstance(seconds, list)):
                raise TypeError("a jobs event holds lists of due times, start times and seconds")
            if len(due) != n or len(started) != n:
                raise ValueError("a jobs event's lists differ in length")
            if not n:
                continue
            hash((name, queue, outcome))  # an unhashable label fails here, before anything is counted
            deltas.append((self.started, {(name, queue): n}))
            deltas.append((self.finished, {(name, outcome): n}))
            deltas.append((self.wait, self.wait.prepare(None, _waits(started, due), (name, queue))))
            deltas.append((self.seconds, self.seconds.prepare(None, seconds, name)))
        for series, delta in deltas:
            series.commit(delta)


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
        n = self.events.apply(events, self._malformed)
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

    def count_traces(self, decisions: dict[str, int]) -> None:
        """Add the tail sampler's decisions (``TraceSink.take_decisions``) to ``forge_observe_traces``."""
        for why, n in decisions.items():
            self.traces.labels(why).inc(n)

    def _malformed(self) -> None:
        self.drop("events", "malformed")

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
