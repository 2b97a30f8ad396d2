"""Reading what forge-observe stored: logs, traces, metric history and summaries, alerts.

Plain async functions over an asyncpg connection (or pool), returning attrs records: the CLI and
the dashboard are both built on them. Every filter is a bind parameter.
"""

from __future__ import annotations

import datetime as dt
import json
from typing import Any, Iterable, Sequence

import attrs

from forge_kernel.errors import InvalidArgument

from .metrics import quantile

LEVELS = ("TRACE", "DEBUG", "INFO", "SUCCESS", "WARNING", "ERROR", "CRITICAL")
#: a series's value at a window's start is its last row at most this long before it (full snapshots come
#: every FULL_SNAPSHOT_EVERY flushes)
LOOKBACK = dt.timedelta(minutes=30)
SERVER_ERROR_CODES = ("INTERNAL", "TIMEOUT", "CANCELLED", "UNAVAILABLE")


@attrs.frozen
class LogRecord:
    at: dt.datetime
    node_id: str
    level: str
    logger: str | None
    message: str
    trace_id: str | None = None
    span_id: str | None = None
    call_id: str | None = None
    job_id: int | None = None
    cron_run_id: int | None = None
    workflow_run_id: str | None = None
    extra: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return attrs.asdict(self)


@attrs.frozen
class SpanRecord:
    trace_id: str
    span_id: str
    parent_id: str | None
    name: str
    kind: str
    node_id: str
    start_at: dt.datetime
    duration_ms: float
    error: str | None
    attrs: dict[str, Any] | None

    def to_dict(self) -> dict[str, Any]:
        return attrs.asdict(self)


@attrs.frozen
class TraceSummary:
    trace_id: str
    root: str
    start_at: dt.datetime
    duration_ms: float
    spans: int
    errors: int
    nodes: list[str]


@attrs.frozen
class AlertRecord:
    id: int
    rule: str
    metric: str
    state: str
    value: float | None
    threshold: float
    message: str
    node_id: str
    fired_at: dt.datetime
    resolved_at: dt.datetime | None


def _since(since: dt.datetime | dt.timedelta | float | None, default: dt.timedelta | None = None) -> dt.datetime | None:
    if since is None:
        if default is None:
            return None
        since = default
    if isinstance(since, (int, float)) and not isinstance(since, bool):
        since = dt.timedelta(seconds=float(since))
    if isinstance(since, dt.timedelta):
        return dt.datetime.now(dt.timezone.utc) - since
    if isinstance(since, dt.datetime):
        if since.tzinfo is None:
            raise InvalidArgument("since must be a timezone-aware datetime, a timedelta or seconds")
        return since
    raise InvalidArgument(f"since must be a datetime, a timedelta or seconds, got {since!r}")


def _limit(limit: int) -> int:
    if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= 100_000:
        raise InvalidArgument(f"limit must be an integer between 1 and 100000, got {limit!r}")
    return limit


def _json(value: Any) -> Any:
    return json.loads(value) if isinstance(value, str) else value


async def logs(db: Any, *, level: str | None = None, text: str | None = None, node: str | None = None,
               trace: str | None = None, job: int | None = None, call: str | None = None,
               since: dt.datetime | dt.timedelta | float | None = None, after: dt.datetime | None = None,
               limit: int = 100) -> list[LogRecord]:
    """Log records, oldest first among the newest ``limit`` that match. ``level`` is the lowest level
    shown; ``text`` a case-insensitive substring; ``after`` only records later than it (``--follow``)."""
    if level is not None and level.upper() not in LEVELS:
        raise InvalidArgument(f"level must be one of {', '.join(LEVELS)}, got {level!r}")
    levels = list(LEVELS[LEVELS.index(level.upper()):]) if level else None
    rows = await db.fetch(
        """SELECT * FROM (
               SELECT at, node_id, level, logger, message, trace_id, span_id, call_id, job_id, cron_run_id,
                      workflow_run_id, extra
               FROM forge_obs_logs
               WHERE ($1::text[] IS NULL OR level = ANY($1::text[]))
                 AND ($2::text IS NULL OR message ILIKE '%' || replace(replace(replace($2, '\\', '\\\\'), '%', '\\%'), '_', '\\_') || '%')
                 AND ($3::text IS NULL OR node_id = $3) AND ($4::text IS NULL OR trace_id = $4)
                 AND ($5::bigint IS NULL OR job_id = $5) AND ($6::text IS NULL OR call_id = $6)
                 AND ($7::timestamptz IS NULL OR at >= $7) AND ($8::timestamptz IS NULL OR at > $8)
               ORDER BY at DESC LIMIT $9) newest
           ORDER BY at""",
        levels, text, node, trace, job, call, _since(since), after, _limit(limit))
    return [LogRecord(**{**dict(r), "extra": _json(r["extra"])}) for r in rows]


async def trace(db: Any, trace_id: str) -> list[SpanRecord]:
    """Every stored span of one trace (all nodes), in start order."""
    tid = (trace_id or "").strip().lower()
    if len(tid) != 32 or any(c not in "0123456789abcdef" for c in tid):
        raise InvalidArgument(f"a trace id is 32 lower-case hex digits, got {trace_id!r}")
    rows = await db.fetch(
        """SELECT trace_id, span_id, parent_id, name, kind, node_id, start_at, duration_ms, error, attrs
           FROM forge_obs_spans WHERE trace_id = $1 ORDER BY start_at, span_id""", tid)
    return [SpanRecord(**{**dict(r), "attrs": _json(r["attrs"])}) for r in rows]


def span_tree(spans: Sequence[SpanRecord]) -> list[tuple[int, SpanRecord]]:
    """(depth, span) in depth-first order; spans whose parent is not stored are roots."""
    ids = {s.span_id for s in spans}
    children: dict[str | None, list[SpanRecord]] = {}
    for s in spans:
        children.setdefault(s.parent_id if s.parent_id in ids else None, []).append(s)
    out: list[tuple[int, SpanRecord]] = []

    def walk(parent: str | None, depth: int) -> None:
        for s in sorted(children.get(parent, ()), key=lambda x: x.start_at):
            out.append((depth, s))
            walk(s.span_id, depth + 1)

    walk(None, 0)
    return out


async def recent_traces(db: Any, *, since: dt.datetime | dt.timedelta | float | None = None,
                        errors_only: bool = False, name: str | None = None, limit: int = 50) -> list[TraceSummary]:
    """Traces that started after ``since`` (default: the last hour), newest first."""
    rows = await db.fetch(
        """SELECT trace_id, (array_agg(name ORDER BY start_at))[1] AS root, min(start_at) AS start_at,
                  extract(epoch FROM max(start_at + duration_ms * interval '1 millisecond') - min(start_at)) * 1000
                      AS duration_ms,
                  count(*) AS spans, count(error) AS errors, array_agg(DISTINCT node_id) AS nodes
           FROM forge_obs_spans WHERE start_at >= $1
           GROUP BY trace_id
           HAVING (NOT $2 OR count(error) > 0) AND ($3::text IS NULL OR bool_or(name = $3))
           ORDER BY min(start_at) DESC LIMIT $4""",
        _since(since, dt.timedelta(hours=1)), errors_only, name, _limit(limit))
    return [TraceSummary(r["trace_id"], r["root"], r["start_at"], float(r["duration_ms"]), r["spans"], r["errors"],
                         list(r["nodes"])) for r in rows]


@attrs.frozen
class Series:
    """One stored series (a node's counter, gauge or histogram) at a point in time."""

    node_id: str
    name: str
    labels: dict[str, str]
    at: dt.datetime
    value: float
    sum: float | None = None
    bounds: list[float | None] | None = None
    buckets: list[float] | None = None


def _series(r: Any) -> Series:
    return Series(r["node_id"], r["name"], _json(r["labels"]), r["at"], r["value"], r["sum"],
                  list(r["bounds"]) if r["bounds"] is not None else None,
                  list(r["buckets"]) if r["buckets"] is not None else None)


async def metric_history(db: Any, name: str, *, since: dt.datetime | dt.timedelta | float | None = None,
                         node: str | None = None, labels: dict[str, str] | None = None,
                         limit: int = 10_000) -> list[Series]:
    """Stored rows of one metric (``forge_function_calls_total``, ``forge_job_run_seconds``...), oldest first."""
    rows = await db.fetch(
        """SELECT node_id, name, labels, at, value, sum, bounds, buckets FROM forge_obs_metrics
           WHERE name = $1 AND at >= $2 AND ($3::text IS NULL OR node_id = $3) AND ($4::jsonb IS NULL OR labels @> $4::jsonb)
           ORDER BY at LIMIT $5""",
        name, _since(since, dt.timedelta(hours=1)), node, json.dumps(labels) if labels else None, _limit(limit))
    return [_series(r) for r in rows]


@attrs.frozen
class Delta:
    """How much a series grew over a window (counter resets handled): count/value, sum, buckets."""

    labels: dict[str, str]
    value: float
    sum: float | None
    bounds: list[float | None] | None
    buckets: list[float] | None


async def window_deltas(db: Any, names: Iterable[str], start: dt.datetime) -> dict[str, list[Delta]]:
    """For each metric name, the growth of each series (per node and labels) since ``start``."""
    names = list(names)
    sql = """SELECT DISTINCT ON (node_id, name, labels) node_id, name, labels, at, value, sum, bounds, buckets
             FROM forge_obs_metrics WHERE name = ANY($1::text[]) AND at > $2 AND at <= $3
             ORDER BY node_id, name, labels, at DESC"""
    now = dt.datetime.now(dt.timezone.utc)
    return deltas(names, map(_series, await db.fetch(sql, names, start - LOOKBACK, now)),
                  map(_series, await db.fetch(sql, names, start - LOOKBACK, start)), start)


def deltas(names: Iterable[str], end_rows: Iterable[Series], begin_rows: Iterable[Series],
           start: dt.datetime) -> dict[str, list[Delta]]:
    """The growth of each series from its newest row at ``start`` (``begin_rows``) to its newest now
    (``end_rows``), per metric name (the dashboard fetches both sets in one statement)."""
    end = {(s.node_id, s.name, json.dumps(s.labels, sort_keys=True)): s for s in end_rows}
    begin = {(s.node_id, s.name, json.dumps(s.labels, sort_keys=True)): s for s in begin_rows}
    out: dict[str, list[Delta]] = {n: [] for n in names}
    for key, e in end.items():
        b = begin.get(key)
        if b is not None and e.at <= start:
            continue  # no row since the window started: unchanged through it
        reset = b is None or e.value < b.value
        value = e.value if reset else e.value - b.value
        total = None
        if e.sum is not None:
            total = e.sum if reset or b.sum is None else e.sum - b.sum
        buckets = None
        if e.buckets is not None:
            if reset or b.buckets is None or len(b.buckets) != len(e.buckets):
                buckets = list(e.buckets)
            else:
                buckets = [x - y for x, y in zip(e.buckets, b.buckets)]
        out.setdefault(e.name, []).append(Delta(e.labels, value, total, e.bounds, buckets))
    return out


def merged_quantile(q: float, deltas: Iterable[Delta]) -> float | None:
    """The ``q`` quantile of several histograms' growth (same buckets), summed."""
    bounds, total = None, None
    for d in deltas:
        if d.buckets is None:
            continue
        if total is None:
            bounds, total = d.bounds, list(d.buckets)
        elif len(d.buckets) == len(total):
            total = [a + b for a, b in zip(total, d.buckets)]
    return quantile(q, bounds or [], total or [])


@attrs.frozen
class FunctionSummary:
    function: str
    kind: str
    calls: int
    errors: int
    p50_ms: float | None
    p95_ms: float | None


@attrs.frozen
class JobSummary:
    job: str
    succeeded: int
    failed: int
    dead: int
    other: int
    run_p95_ms: float | None
    wait_p95_ms: float | None


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1000.0


async def function_summary(db: Any, since: dt.datetime | dt.timedelta | float = 3600.0) -> list[FunctionSummary]:
    """Calls, server errors and latency per function over the window, all nodes together."""
    deltas = await window_deltas(db, ["forge_function_calls_total", "forge_function_duration_seconds"], _since(since))
    by_fn: dict[tuple[str, str], dict[str, Any]] = {}
    for d in deltas["forge_function_calls_total"]:
        key = (d.labels.get("function", ""), d.labels.get("kind", ""))
        entry = by_fn.setdefault(key, {"calls": 0.0, "errors": 0.0, "hist": []})
        entry["calls"] += d.value
        if d.labels.get("code") in SERVER_ERROR_CODES:
            entry["errors"] += d.value
    for d in deltas["forge_function_duration_seconds"]:
        key = (d.labels.get("function", ""), d.labels.get("kind", ""))
        by_fn.setdefault(key, {"calls": 0.0, "errors": 0.0, "hist": []})["hist"].append(d)
    return [FunctionSummary(fn, kind, int(e["calls"]), int(e["errors"]), _ms(merged_quantile(0.5, e["hist"])),
                            _ms(merged_quantile(0.95, e["hist"])))
            for (fn, kind), e in sorted(by_fn.items()) if e["calls"] > 0]


async def job_summary(db: Any, since: dt.datetime | dt.timedelta | float = 3600.0) -> list[JobSummary]:
    """Attempts by outcome, run time and queue wait per job over the window, all nodes together."""
    deltas = await window_deltas(db, ["forge_jobs_finished_total", "forge_job_run_seconds",
                                      "forge_job_queue_wait_seconds"], _since(since))
    by_job: dict[str, dict[str, Any]] = {}
    for d in deltas["forge_jobs_finished_total"]:
        e = by_job.setdefault(d.labels.get("job", ""), {"succeeded": 0.0, "failed": 0.0, "dead": 0.0, "other": 0.0,
                                                         "run": [], "wait": []})
        status = d.labels.get("status", "")
        e[status if status in ("succeeded", "failed", "dead") else "other"] += d.value
    for name, key in (("forge_job_run_seconds", "run"), ("forge_job_queue_wait_seconds", "wait")):
        for d in deltas[name]:
            by_job.setdefault(d.labels.get("job", ""), {"succeeded": 0.0, "failed": 0.0, "dead": 0.0, "other": 0.0,
                                                         "run": [], "wait": []})[key].append(d)
    return [JobSummary(job, int(e["succeeded"]), int(e["failed"]), int(e["dead"]), int(e["other"]),
                       _ms(merged_quantile(0.95, e["run"])), _ms(merged_quantile(0.95, e["wait"])))
            for job, e in sorted(by_job.items())
            if e["succeeded"] + e["failed"] + e["dead"] + e["other"] > 0 or any(d.value for d in e["wait"])]


async def alerts(db: Any, *, state: str | None = None, since: dt.datetime | dt.timedelta | float | None = None,
                 limit: int = 100) -> list[AlertRecord]:
    """Alert rows, newest first; ``state`` firing or resolved."""
    if state is not None and state not in ("firing", "resolved"):
        raise InvalidArgument(f"state must be 'firing' or 'resolved', got {state!r}")
    rows = await db.fetch(
        """SELECT id, rule, metric, state, value, threshold, message, node_id, fired_at, resolved_at
           FROM forge_obs_alerts WHERE ($1::text IS NULL OR state = $1) AND ($2::timestamptz IS NULL OR fired_at >= $2)
           ORDER BY fired_at DESC, id DESC LIMIT $3""", state, _since(since), _limit(limit))
    return [AlertRecord(**dict(r)) for r in rows]
