"""The dashboard's pages: what each reads (a query from :mod:`queries`) and the data it shows.

A page is parsed from the request's path and query string into a :class:`Query`: one SQL
statement plus a ``shape`` turning its JSON value into the page's data. The same data feeds the
HTML template, the JSON twin under ``/_forge/api/`` and the live stream, and equal queries (same
page, same filters) are run once per tick however many viewers watch them.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import re
import time
from typing import Any, Awaitable, Callable, Mapping

import asyncpg
import attrs
from croniter import croniter

from forge_kernel.errors import InvalidArgument, NotFound

from .. import query as obsq
from ..service import FULL_SNAPSHOT_EVERY
from . import queries as q

LIVE_JOB_STATUSES = ["scheduled", "pending", "running", "dead"]
HISTORY_JOB_STATUSES = ["succeeded", "cancelled", "discarded"]
WORKFLOW_STATUSES = ["pending", "running", "waiting", "blocked", "succeeded", "failed", "cancelled"]
WORKFLOW_LIVE = ["pending", "running", "waiting", "blocked"]
PAGE_ROWS = 50
#: most points of a chart (the functions page's long windows)
CHART_POINTS = 60
_EPOCH = dt.datetime(2000, 1, 1, tzinfo=dt.timezone.utc)


@attrs.frozen
class Query:
    page: str
    key: str
    sql: str
    args: list[Any]
    shape: Callable[[Any], dict[str, Any]]
    filters: dict[str, Any] = attrs.field(factory=dict)
    live: bool = True
    #: how the page and its JSON twin read the value when one statement will not do (``LogSearch.run``);
    #: ``sql`` is then what the live snapshot runs
    fetch: Callable[[Any], Awaitable[Any]] | None = None

    @property
    def hints(self) -> frozenset[str] | None:
        """The kinds of change this page shows (its live stream refreshes on their hints); None: any."""
        return PAGE_HINTS.get(self.page)


#: the kinds of change (live.HINT_CHANNELS, forge-observe's ACTIVITY_KINDS) each page shows; a page
#: not listed refreshes on every hint. Nodes (heartbeats, status) have no hint: their page polls.
PAGE_HINTS: dict[str, frozenset[str]] = {
    "overview": frozenset({"jobs", "metrics"}), "functions": frozenset({"metrics"}), "jobs": frozenset({"jobs"}),
    "job": frozenset({"jobs", "logs", "spans"}), "queues": frozenset({"jobs", "metrics"}),
    "crons": frozenset({"crons", "jobs"}), "workflows": frozenset({"workflows"}),
    "workflow": frozenset({"workflows", "logs"}), "realtime": frozenset({"metrics"}), "logs": frozenset({"logs"}),
    "traces": frozenset({"spans"}), "nodes": frozenset(), "alerts": frozenset({"metrics"}),
}


@attrs.frozen
class Ctx:
    node: Any
    config: Any
    have: frozenset[str]

    @property
    def dead_after(self) -> float:
        return float(self.node.config.node.dead_after)

    @property
    def flush_interval(self) -> float:
        """Seconds between this cluster's metric flushes (``[observe] flush_interval``)."""
        return float(self.node.config["observe"].flush_interval)

    @property
    def metric_sample(self) -> float:
        """Seconds at the end of each minute a per-minute chart reads: one flush and a margin."""
        return min(60.0, self.flush_interval * 1.2 + 1.0)

    @property
    def metric_lookback(self) -> float:
        """How old a series's newest row can be: every series is written in full every
        ``FULL_SNAPSHOT_EVERY``-th flush."""
        return (FULL_SNAPSHOT_EVERY + 1) * self.flush_interval


def iso(value: Any) -> dt.datetime | None:
    if value is None or isinstance(value, dt.datetime):
        return value
    return dt.datetime.fromisoformat(value)


# --- parameters -----------------------------------------------------------------------------
def _text(params: Mapping[str, str], name: str, max_len: int = 200) -> str | None:
    value = (params.get(name) or "").strip()
    if not value:
        return None
    if len(value) > max_len:
        raise InvalidArgument(f"{name}: at most {max_len} characters, got {len(value)}")
    return value


def _int(params: Mapping[str, str], name: str, lo: int = 1, hi: int = 2**63 - 1) -> int | None:
    value = _text(params, name, 30)
    if value is None:
        return None
    if not re.fullmatch(r"\d+", value) or not lo <= int(value) <= hi:
        raise InvalidArgument(f"{name}: a whole number from {lo} to {hi}, got {value!r}")
    return int(value)


_SPAN = re.compile(r"^(\d+(?:\.\d+)?)\s*(s|m|h|d)?$")


def minutes(params: Mapping[str, str], name: str, default: float, hi: float = 7 * 1440) -> float:
    """A time window: ``90`` (minutes), ``30s``, ``15m``, ``6h``, ``2d``."""
    value = _text(params, name, 20)
    if value is None:
        return default
    m = _SPAN.match(value)
    if not m:
        raise InvalidArgument(f"{name}: a duration such as 15m, 6h or 2d, got {value!r}")
    n = float(m.group(1)) * {"s": 1 / 60, "m": 1, None: 1, "h": 60, "d": 1440}[m.group(2)]
    if not 0 < n <= hi:
        raise InvalidArgument(f"{name}: between 1 second and {hi / 1440:g} days, got {value!r}")
    return n


def _time(params: Mapping[str, str], name: str) -> dt.datetime | None:
    value = _text(params, name, 40)
    if value is None:
        return None
    try:
        t = dt.datetime.fromisoformat(value)
    except ValueError:
        raise InvalidArgument(f"{name}: an ISO date and time such as 2026-12-01T10:00, got {value!r}") from None
    return t if t.tzinfo else t.replace(tzinfo=dt.timezone.utc)


def _key(page: str, filters: Mapping[str, Any]) -> str:
    return page + "?" + json.dumps(filters, sort_keys=True, default=str)


def _need(ctx: Ctx, table: str, package: str) -> None:
    if table not in ctx.have:
        raise NotFound(f"this page needs {package}, which is not installed on this node's cluster")


# --- the pages --------------------------------------------------------------------------------
def overview(ctx: Ctx, params: Mapping[str, str]) -> Query:
    sql, args = q.overview(ctx.dead_after, ctx.config.bulk_limit, set(ctx.have), ctx.metric_sample)
    cap = ctx.config.bulk_limit

    def shape(raw: dict[str, Any]) -> dict[str, Any]:
        counts = {s: {"n": raw.get(s), "capped": (raw.get(s) or 0) > cap} for s in LIVE_JOB_STATUSES if s in raw}
        for c in counts.values():
            c["n"] = min(c["n"] or 0, cap)
        gauge = _gauge_jobs(raw.get("gauges") or [])
        minutes_ = _minute_series(raw.get("minutes") or [], 60, raw["now"])
        nodes = raw.get("nodes") or []
        return {"now": raw["now"], "nodes": nodes, "leader": raw.get("leader"), "jobs": counts,
                "jobs_counted_by_leader": gauge, "charts": minutes_, "alerts_firing": raw.get("alerts_firing", 0),
                "has_jobs": "forge_jobs" in ctx.have,
                "totals": {"nodes_running": sum(1 for n in nodes if n["status"] == "running"),
                           "calls": sum(minutes_["calls"]), "errors": sum(minutes_["errors"]),
                           "jobs_ok": sum(minutes_["jobs_ok"]), "jobs_failed": sum(minutes_["jobs_failed"])}}
    return Query("overview", "overview", sql, args, shape)


def _gauge_jobs(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The scheduler leader's count of live jobs per status and queue (``forge_jobs`` gauge)."""
    by_status: dict[str, float] = {}
    by_queue: dict[str, dict[str, float]] = {}
    oldest: dict[str, float] = {}
    at = None
    for r in rows:
        labels = r["labels"] or {}
        if r["name"] == "forge_jobs":
            by_status[labels.get("status", "")] = by_status.get(labels.get("status", ""), 0) + r["value"]
            by_queue.setdefault(labels.get("queue", ""), {})[labels.get("status", "")] = r["value"]
            at = max(at or r["at"], r["at"])
        elif r["name"] == "forge_jobs_oldest_pending_seconds":
            oldest[labels.get("queue", "")] = r["value"]
    return {"at": at, "by_status": by_status, "by_queue": by_queue, "oldest_pending": oldest}


def _minute_series(rows: list[dict[str, Any]], n: int, now: str, step: int = 1) -> dict[str, list[float]]:
    """Per-minute sums for the last ``n`` points of ``step`` minutes each (a point of several
    minutes is their average per minute): calls, server errors, jobs finished ok/failed, pushes."""
    width = dt.timedelta(minutes=step)
    end = _EPOCH + (iso(now) - _EPOCH) // width * width  # the SQL's date_bin from the same origin
    index = {end - i * width: n - 1 - i for i in range(n)}
    out = {k: [0.0] * n for k in ("calls", "errors", "jobs_ok", "jobs_failed", "pushes", "reruns")}
    for r in rows:
        i = index.get(iso(r["m"]))
        if i is None:
            continue
        name, label, v = r["name"], r["label"], float(r["n"] or 0) / step
        if name == "forge_function_calls_total":
            out["calls"][i] += v
            if label in q.SERVER_ERROR_CODES:
                out["errors"][i] += v
        elif name == "forge_jobs_finished_total":
            if label == "succeeded":
                out["jobs_ok"][i] += v
            elif label in ("failed", "dead"):
                out["jobs_failed"][i] += v
        elif name == "forge_realtime_pushes_total":
            out["pushes"][i] += v
        elif name == "forge_realtime_reruns_total":
            out["reruns"][i] += v
    return out


def functions(ctx: Ctx, params: Mapping[str, str]) -> Query:
    window = minutes(params, "since", 60.0)
    # at most CHART_POINTS points: a long window's chart has one per few minutes
    step = max(1, math.ceil(round(window) / CHART_POINTS))
    points = max(1, math.ceil(round(window) / step))
    sql, args = q.functions(int(max(1, round(window))), ctx.metric_lookback, ctx.metric_sample, step, points * step)

    def shape(raw: dict[str, Any]) -> dict[str, Any]:
        start = iso(raw["now"]) - dt.timedelta(minutes=window)
        series = lambda rows: [obsq.Series(r["node_id"], r["name"], r["labels"] or {}, iso(r["at"]), r["value"], r["sum"],
                                           r["bounds"], r["buckets"]) for r in rows]
        d = obsq.deltas(["forge_function_calls_total", "forge_function_duration_seconds"], series(raw["end"]),
                        series(raw["begin"]), start)
        by_fn: dict[tuple[str, str], dict[str, Any]] = {}
        for x in d["forge_function_calls_total"]:
            key = (x.labels.get("function", ""), x.labels.get("kind", ""))
            e = by_fn.setdefault(key, {"calls": 0.0, "codes": {}, "hist": []})
            e["calls"] += x.value
            code = x.labels.get("code", "OK")
            e["codes"][code] = e["codes"].get(code, 0) + x.value
        for x in d["forge_function_duration_seconds"]:
            key = (x.labels.get("function", ""), x.labels.get("kind", ""))
            by_fn.setdefault(key, {"calls": 0.0, "codes": {}, "hist": []})["hist"].append(x)
        rows = []
        for (fn, kind), e in sorted(by_fn.items()):
            if not e["calls"]:
                continue
            q50, q95, q99 = (obsq.merged_quantile(p, e["hist"]) for p in (0.5, 0.95, 0.99))
            errors = sum(v for c, v in e["codes"].items() if c in q.SERVER_ERROR_CODES)
            rows.append({"function": fn, "kind": kind, "calls": int(e["calls"]), "server_errors": int(errors),
                         "error_rate": errors / e["calls"] if e["calls"] else 0.0,
                         "codes": {c: int(v) for c, v in sorted(e["codes"].items()) if v},
                         "p50_ms": None if q50 is None else q50 * 1000, "p95_ms": None if q95 is None else q95 * 1000,
                         "p99_ms": None if q99 is None else q99 * 1000})
        return {"now": raw["now"], "window_minutes": window, "functions": rows,
                "charts": _minute_series(raw["minutes"] or [], points, raw["now"], step)}
    return Query("functions", _key("functions", {"since": window}), sql, args, shape, {"since": params.get("since") or ""})


def job_filter(params: Mapping[str, str]) -> dict[str, Any]:
    status = _text(params, "status", 20) or "live"
    if status not in ["live", *LIVE_JOB_STATUSES, *HISTORY_JOB_STATUSES]:
        raise InvalidArgument(f"status: one of live, {', '.join(LIVE_JOB_STATUSES + HISTORY_JOB_STATUSES)}; "
                              f"got {status!r}")
    args_text = _text(params, "args", 2000)
    args = None
    if args_text is not None:
        try:
            args = json.loads(args_text)
        except ValueError as exc:
            raise InvalidArgument(f"args: a JSON object the job's arguments contain, e.g. {{\"user\": 5}} ({exc})") from None
        if not isinstance(args, dict):
            raise InvalidArgument("args: a JSON object the job's arguments contain, e.g. {\"user\": 5}")
    return {"status": status, "name": _text(params, "name"), "queue": _text(params, "queue"),
            "node": _text(params, "node"), "since": _time(params, "since"), "until": _time(params, "until"),
            "args": args}


def job_table(f: Mapping[str, Any]) -> tuple[str, list[str]]:
    status = f["status"]
    if status in HISTORY_JOB_STATUSES:
        return "forge_job_history", [status]
    return "forge_jobs", LIVE_JOB_STATUSES if status == "live" else [status]


def job_filter_args(f: Mapping[str, Any]) -> list[Any]:
    table, statuses = job_table(f)
    return [statuses, f["name"], f["queue"], f["node"], f["since"], f["until"],
            json.dumps(f["args"]) if f["args"] is not None else None]


def jobs(ctx: Ctx, params: Mapping[str, str]) -> Query:
    _need(ctx, "forge_jobs", "forge-worker")
    f = job_filter(params)
    cursor = _int(params, "before")
    table, _ = job_table(f)
    window = ctx.config.search_window
    sql, args = q.jobs(table, job_filter_args(f), cursor, window, PAGE_ROWS)

    def shape(raw: dict[str, Any]) -> dict[str, Any]:
        rows = raw["rows"]
        floor = max(raw["floor"] or 0, 0)
        more = None
        if len(rows) >= PAGE_ROWS:
            more = rows[-1]["id"] - 1
        elif raw["min_id"] is not None and floor >= raw["min_id"]:
            more = floor  # this stretch is done: the next one starts below it
        return {"now": raw["now"], "table": table, "rows": rows, "top": raw["top"], "floor": floor,
                "searched": {"from_id": floor + 1, "to_id": raw["top"], "window": window},
                "next_before": more}
    shown = {k: (v.isoformat() if isinstance(v, dt.datetime) else (json.dumps(v) if isinstance(v, dict) else v))
             for k, v in f.items()}
    return Query("jobs", _key("jobs", {**shown, "before": cursor}), sql, args, shape, {**shown, "before": cursor})


def job(ctx: Ctx, params: Mapping[str, str], job_id: int) -> Query:
    _need(ctx, "forge_jobs", "forge-worker")
    sql, args = q.job(job_id, set(ctx.have))

    def shape(raw: dict[str, Any]) -> dict[str, Any]:
        if raw["job"] is None:
            raise NotFound(f"job {job_id} is neither live nor in the history (finished jobs leave it after "
                           f"[worker] history_retention)")
        j = raw["job"]
        for k in ("options", "run_as"):
            if isinstance(j.get(k), str):
                j[k] = json.loads(j[k])
        return {"now": raw["now"], "job": j, "logs": raw["logs"], "runs": raw["runs"]}
    return Query("job", _key("job", {"id": job_id}), sql, args, shape, {"id": job_id})


def queues(ctx: Ctx, params: Mapping[str, str]) -> Query:
    _need(ctx, "forge_jobs", "forge-worker")
    cap = ctx.config.bulk_limit
    sql, args = q.queues(cap)
    known = _registry_queues(ctx.node.registry)

    def shape(raw: dict[str, Any]) -> dict[str, Any]:
        gauge = _gauge_jobs(raw["gauges"])
        paused = {r["queue"]: r for r in raw["paused"]}
        sample = {r["queue"]: r["n"] for r in raw["sample"]}
        exact = (raw["sample_size"] or 0) <= cap
        names = sorted(set(known) | set(paused) | set(sample) | set(gauge["by_queue"]))
        rows = [{"queue": n, "paused": n in paused, "paused_at": paused.get(n, {}).get("paused_at"),
                 "paused_by": paused.get(n, {}).get("paused_by"),
                 "pending": sample.get(n, 0), "pending_exact": exact,
                 "counted": gauge["by_queue"].get(n, {}), "oldest_pending_s": gauge["oldest_pending"].get(n)}
                for n in names]
        return {"now": raw["now"], "queues": rows, "counted_at": gauge["at"], "sample_cap": cap, "exact": exact}
    return Query("queues", "queues", sql, args, shape)


def _registry_queues(registry: Any) -> list[str]:
    out = {"default"}
    if registry is not None:
        for d in registry.of_kind("job", "cron"):
            out.add(d.options.get("queue") or "default")
    return sorted(out)


def _next_slot(schedule: str, timezone: str, after: dt.datetime) -> dt.datetime | None:
    """The next slot after ``after`` by croniter (the scheduler's own rules differ only on days
    when clocks change)."""
    import zoneinfo

    expr = {"@hourly": "0 * * * *", "@daily": "0 0 * * *", "@midnight": "0 0 * * *", "@weekly": "0 0 * * 0",
            "@monthly": "0 0 1 * *", "@yearly": "0 0 1 1 *", "@annually": "0 0 1 1 *"}.get(schedule, schedule)
    fields = expr.split()
    try:
        tz = zoneinfo.ZoneInfo(timezone)
        if len(fields) == 6:  # seconds first, as the scheduler reads it; croniter wants them last
            expr = " ".join(fields[1:] + fields[:1])
        return croniter(expr, after.astimezone(tz)).get_next(dt.datetime).astimezone(dt.timezone.utc)
    except Exception:  # a schedule only the scheduler's newer code understands: show none
        return None


def crons(ctx: Ctx, params: Mapping[str, str]) -> Query:
    _need(ctx, "forge_cron_state", "forge-scheduler")
    name = _text(params, "cron")
    sql, args = q.crons(name, 50)
    defined = set()
    if ctx.node.registry is not None:
        defined = {d.name for d in ctx.node.registry.of_kind("cron")}

    def shape(raw: dict[str, Any]) -> dict[str, Any]:
        now = iso(raw["now"])
        rows = raw["crons"]
        for c in rows:
            c["next_slot"] = None
            if not c["paused"] and c["defined"] is not False:
                nxt = _next_slot(c["schedule"], c["timezone"], max(iso(c["decided_until"]), now))
                c["next_slot"] = nxt.isoformat() if nxt else None
        return {"now": raw["now"], "leader": raw["leader"], "crons": rows, "runs": raw["runs"], "cron": name,
                "pending_triggers": raw["pending_triggers"], "app_crons": sorted(defined)}
    return Query("crons", _key("crons", {"cron": name}), sql, args, shape, {"cron": name})


def workflows(ctx: Ctx, params: Mapping[str, str]) -> Query:
    _need(ctx, "forge_workflow_runs", "durable workflows (forge-worker with workflows)")
    status = _text(params, "status", 20) or "live"
    if status not in ["live", "all", *WORKFLOW_STATUSES]:
        raise InvalidArgument(f"status: one of live, all, {', '.join(WORKFLOW_STATUSES)}; got {status!r}")
    statuses = WORKFLOW_LIVE if status == "live" else WORKFLOW_STATUSES if status == "all" else [status]
    name = _text(params, "name")
    sql, args = q.workflows(statuses, name, PAGE_ROWS)

    def shape(raw: dict[str, Any]) -> dict[str, Any]:
        for r in raw["runs"]:
            r["waiting_on"] = waiting_on(r)
        return {"now": raw["now"], "runs": raw["runs"]}
    return Query("workflows", _key("workflows", {"status": status, "name": name}), sql, args, shape,
                 {"status": status, "name": name})


def waiting_on(run: Mapping[str, Any]) -> str | None:
    """What a run that has not ended waits on, in a few words, from its ``wait`` record."""
    status, wait = run.get("status"), run.get("wait") or {}
    if isinstance(wait, str):
        wait = json.loads(wait)
    if status in ("succeeded", "failed", "cancelled"):
        return None
    if status == "running":
        return f"running on {run.get('node_id')}"
    if status == "blocked":
        return f"blocked at step {wait.get('key')}: the code no longer matches the recorded steps"
    kind = wait.get("kind")
    if kind == "sleep":
        return f"sleeping until {wait.get('until')}"
    if kind == "retry":
        return f"retrying step {wait.get('step')!r} (attempt {wait.get('attempt')} of {wait.get('of')})"
    if kind == "event":
        return "waiting for event " + " or ".join(repr(e) for e in wait.get("events", []))
    if kind == "child":
        return f"waiting for child run {wait.get('run')}"
    if kind == "parallel":
        return "parallel branches: " + "; ".join(filter(None, (waiting_on({"status": "waiting", "wait": w})
                                                                for w in wait.get("waits", []))))
    return "due" if status == "pending" else status


def workflow(ctx: Ctx, params: Mapping[str, str], run_id: str) -> Query:
    _need(ctx, "forge_workflow_runs", "durable workflows")
    if not re.fullmatch(r"[0-9a-fA-F-]{32,36}", run_id):
        raise InvalidArgument(f"a workflow run id is a UUID, got {run_id!r}")
    sql, args = q.workflow(run_id)

    def shape(raw: dict[str, Any]) -> dict[str, Any]:
        if raw["run"] is None:
            raise NotFound(f"no workflow run {run_id}")
        raw["run"]["waiting_on"] = waiting_on(raw["run"])
        return {"now": raw["now"], "run": raw["run"], "steps": raw["steps"], "events": raw["events"], "logs": raw["logs"]}
    return Query("workflow", _key("workflow", {"id": run_id}), sql, args, shape, {"id": run_id})


def realtime(ctx: Ctx, params: Mapping[str, str]) -> Query:
    sql, args = q.realtime(ctx.metric_sample)

    def shape(raw: dict[str, Any]) -> dict[str, Any]:
        per_node: dict[str, dict[str, float]] = {}
        by_function: dict[str, dict[str, float]] = {}
        for r in raw["gauges"]:
            short = r["name"].removeprefix("forge_realtime_")
            node = per_node.setdefault(r["node_id"], {})
            node[short] = node.get(short, 0) + r["value"]
            fn = (r["labels"] or {}).get("function")
            if fn:
                by_function.setdefault(fn, {})[short] = by_function.setdefault(fn, {}).get(short, 0) + r["value"]
        totals = {k: sum(n.get(k, 0) for n in per_node.values()) for k in ("connections", "subscriptions", "live_queries")}
        return {"now": raw["now"], "nodes": per_node, "functions": by_function, "totals": totals,
                "charts": _minute_series(raw["minutes"], 60, raw["now"])}
    return Query("realtime", "realtime", sql, args, shape)


LOG_ROWS = 200
#: seconds of newest lines a logs page's live stream reads (app.js merges them into the page)
LOG_LIVE_TAIL = 120.0
#: seconds a log search's first stretch spans, and what each statement aims to take
LOG_FIRST_STRETCH = 300.0
LOG_STATEMENT_AIM = 0.15


@attrs.frozen
class LogSearch:
    """A log search newest first, a stretch of time per statement, within ``budget`` seconds.

    Only the trace and job filters have indexes; text, level and node read every line of the window
    (a trigram index would cost every log write). So the window is read in stretches, newest first,
    each sized from the last one's time to take about ``LOG_STATEMENT_AIM`` (every statement stays
    far under ``statement_timeout`` whatever the density of lines), until the page is full, the
    window is done or the budget is spent. The answer says how far back it searched and where to
    continue (``continue_until``)."""

    build: Callable[..., tuple[str, list[Any]]]
    window: float  # seconds
    until: dt.datetime | None
    indexed: bool
    limit: int
    budget: float

    async def run(self, pool: Any) -> dict[str, Any]:
        now = await pool.fetchval("SELECT now()")
        floor = now - dt.timedelta(seconds=self.window)
        top = min(self.until, now) if self.until else now
        if self.indexed:  # one statement over the whole window, through the trace or job index
            sql, args = self.build(self.limit, floor, top)
            raw = await pool.fetchval(sql, *args)
            return {**raw, "searched": {"back_to": floor, "up_to": top, "complete": True, "statements": 1},
                    "continue_until": raw["rows"][-1]["at"] if len(raw["rows"]) >= self.limit else None}
        rows: list[dict[str, Any]] = []
        hi, width, statements, started = top, LOG_FIRST_STRETCH, 0, time.monotonic()
        while hi > floor and len(rows) < self.limit:
            lo = max(floor, hi - dt.timedelta(seconds=width))
            sql, args = self.build(self.limit - len(rows), lo, hi)
            t0 = time.monotonic()
            try:
                raw = await pool.fetchval(sql, *args)
            except asyncpg.QueryCanceledError:
                if not statements:
                    raise
                break  # (a burst of lines the last stretch did not predict) what was found stands
            took = time.monotonic() - t0
            statements += 1
            rows.extend(raw["rows"])
            hi = lo
            if time.monotonic() - started >= self.budget:
                break
            width = max(1.0, min(width * 4, width * LOG_STATEMENT_AIM / max(took, 0.001)))
        complete = hi <= floor
        more = rows[-1]["at"] if len(rows) >= self.limit else (None if complete else hi.isoformat())
        return {"now": now.isoformat(), "rows": rows,
                "searched": {"back_to": hi, "up_to": top, "complete": complete, "statements": statements},
                "continue_until": more}


def logs(ctx: Ctx, params: Mapping[str, str]) -> Query:
    level = (_text(params, "level", 10) or "").upper() or None
    if level is not None and level not in q.LEVELS:
        raise InvalidArgument(f"level: one of {', '.join(q.LEVELS)}; got {level!r}")
    levels = q.LEVELS[q.LEVELS.index(level):] if level else None
    trace = _text(params, "trace", 40)
    if trace is not None and not re.fullmatch(r"[0-9a-f]{32}", trace):
        raise InvalidArgument(f"trace: 32 lower-case hex digits, got {trace!r}")
    job_id = _int(params, "job")
    window = minutes(params, "since", 15.0)
    until = _time(params, "until")
    f = {"level": level, "text": _text(params, "text"), "node": _text(params, "node"), "trace": trace,
         "job": job_id, "since": params.get("since") or "15m", "until": until.isoformat() if until else None}

    def build(limit: int, lo: Any = None, hi: Any = None, tail: float = window) -> tuple[str, list[Any]]:
        return q.logs(levels, f["text"], f["node"], trace, job_id, tail, limit, lo, hi)

    # the live stream reads only the newest lines (app.js merges them into the page); none when paging back
    sql, args = build(LOG_ROWS, tail=min(window, LOG_LIVE_TAIL / 60))
    search = LogSearch(build, window * 60.0, until, trace is not None or job_id is not None, LOG_ROWS,
                       ctx.config.search_budget)

    def shape(raw: dict[str, Any]) -> dict[str, Any]:
        return {"now": raw["now"], "rows": raw["rows"], "searched": raw.get("searched"),
                "continue_until": raw.get("continue_until")}
    return Query("logs", _key("logs", f), sql, args, shape, f, live=until is None, fetch=search.run)


def traces(ctx: Ctx, params: Mapping[str, str]) -> Query:
    window = minutes(params, "since", 15.0, hi=1440)
    errors = (params.get("errors") or "") in ("1", "true", "on")
    name = _text(params, "name")
    f = {"since": params.get("since") or "15m", "name": name, "errors": errors}
    sql, args = q.traces(window, name, errors, PAGE_ROWS)
    return Query("traces", _key("traces", f), sql, args, lambda raw: {"now": raw["now"], "rows": raw["rows"]}, f)


def trace(ctx: Ctx, params: Mapping[str, str], trace_id: str) -> Query:
    tid = trace_id.strip().lower()
    if not re.fullmatch(r"[0-9a-f]{32}", tid):
        raise InvalidArgument(f"a trace id is 32 lower-case hex digits, got {trace_id!r}")
    sql, args = q.trace(tid)

    def shape(raw: dict[str, Any]) -> dict[str, Any]:
        spans = [obsq.SpanRecord(s["trace_id"], s["span_id"], s["parent_id"], s["name"], s["kind"], s["node_id"],
                                 iso(s["start_at"]), s["duration_ms"], s["error"], s["attrs"]) for s in raw["spans"]]
        if not spans:
            raise NotFound(f"no stored span of trace {tid} (traces are kept when sampled, failed or slow, "
                           f"for [observe] retention.spans days)")
        t0 = min(s.start_at for s in spans)
        end = max(s.start_at + dt.timedelta(milliseconds=s.duration_ms) for s in spans)
        total = max((end - t0).total_seconds() * 1000, 0.001)
        rows = [{"depth": d, "span_id": s.span_id, "parent_id": s.parent_id, "name": s.name, "kind": s.kind,
                 "node_id": s.node_id, "start_at": s.start_at.isoformat(), "duration_ms": s.duration_ms,
                 "error": s.error, "attrs": s.attrs,
                 "offset_pct": (s.start_at - t0).total_seconds() * 1000 / total * 100,
                 "width_pct": max(s.duration_ms / total * 100, 0.3)}
                for d, s in obsq.span_tree(spans)]
        return {"now": raw["now"], "trace_id": tid, "spans": rows, "duration_ms": total,
                "nodes": sorted({s.node_id for s in spans}), "logs": raw["logs"]}
    return Query("trace", _key("trace", {"id": tid}), sql, args, shape, {"id": tid}, live=False)


def nodes(ctx: Ctx, params: Mapping[str, str]) -> Query:
    sql, args = q.nodes(ctx.dead_after)
    return Query("nodes", "nodes", sql, args, lambda raw: {"now": raw["now"], "nodes": raw["nodes"],
                                                           "leader": raw["leader"], "this_node": ctx.node.id})


def alerts(ctx: Ctx, params: Mapping[str, str]) -> Query:
    sql, args = q.alerts(200)
    return Query("alerts", "alerts", sql, args, lambda raw: {"now": raw["now"], "rows": raw["rows"]})


def audit(ctx: Ctx, params: Mapping[str, str]) -> Query:
    f = {"action": _text(params, "action", 60), "who": _text(params, "who")}
    sql, args = q.audit(f["action"], f["who"], 100)
    return Query("audit", _key("audit", f), sql, args, lambda raw: {"now": raw["now"], "rows": raw["rows"]}, f)


#: name -> (title, builder, table it needs (None: always there))
PAGES: dict[str, tuple[str, Callable[..., Query], str | None]] = {
    "overview": ("Overview", overview, None),
    "functions": ("Functions", functions, None),
    "jobs": ("Jobs", jobs, "forge_jobs"),
    "queues": ("Queues", queues, "forge_jobs"),
    "crons": ("Crons", crons, "forge_cron_state"),
    "workflows": ("Workflows", workflows, "forge_workflow_runs"),
    "realtime": ("Realtime", realtime, None),
    "logs": ("Logs", logs, None),
    "traces": ("Traces", traces, None),
    "nodes": ("Nodes", nodes, None),
    "migrations": ("Migrations", None, None),  # type: ignore[dict-item]  (read with the kernel's status, not live)
    "alerts": ("Alerts", alerts, None),
    "audit": ("Audit", audit, None),
}
DETAILS: dict[str, Callable[..., Query]] = {"jobs": job, "workflows": workflow, "traces": trace}
