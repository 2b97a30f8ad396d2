"""Every query the dashboard runs, in one place.

The dashboard reads the public tables of other FORGE packages with SQL and imports none of them
(packages never import each other); these tables are therefore part of their owners' public
contract, and a change to one of the columns used here must update this module:

* kernel: ``forge_nodes``, ``forge_migrations``;
* forge-worker: ``forge_jobs``, ``forge_job_history``, ``forge_worker_queue_pauses``; workflows:
  ``forge_workflow_runs``, ``forge_workflow_steps``, ``forge_workflow_events``;
* forge-scheduler: ``forge_leaders``, ``forge_cron_state``, ``forge_cron_runs``;
* forge-observe: ``forge_obs_metrics`` (realtime's gauges, function and job counters, the leader's
  cluster gauges), ``forge_obs_logs``, ``forge_obs_spans``, ``forge_obs_alerts``;
* its own: ``forge_dashboard_audit``.

Writes never happen here: actions go through the owners' ``forge_admin_actions``.

Each builder returns ``(sql, args)`` for one ``SELECT`` yielding one ``jsonb`` value, so that the
live snapshot can run every watched view of a node as the scalar subqueries of a single statement
(:func:`compose`). Values are bind parameters (``$1``...; no other ``$`` may appear in the text).
Nothing here counts a big table: counts are capped (``LIMIT`` inside) or come from the scheduler
leader's gauges, and searches walk a bounded stretch of ids or time.
"""

from __future__ import annotations

import re
from typing import Any, Sequence

SERVER_ERROR_CODES = ["INTERNAL", "TIMEOUT", "CANCELLED", "UNAVAILABLE"]
_PARAM = re.compile(r"\$(\d+)")


def compose(parts: Sequence[tuple[str, list[Any]]]) -> tuple[str, list[Any]]:
    """One statement whose columns ``v0, v1, ...`` are the given views' values."""
    cols, args = [], []
    for i, (sql, a) in enumerate(parts):
        offset = len(args)
        cols.append(f"({_PARAM.sub(lambda m: f'${int(m.group(1)) + offset}', sql)}) AS v{i}")
        args.extend(a)
    return "SELECT " + ", ".join(cols), args


def _agg(sql: str, order: str = "") -> str:
    return f"(SELECT coalesce(jsonb_agg(t{(' ORDER BY ' + order) if order else ''}), '[]'::jsonb) FROM ({sql}) t)"


def capped_count(table_sql: str, cap_param: str) -> str:
    return f"(SELECT count(*) FROM (SELECT 1 FROM {table_sql} LIMIT {cap_param}) c)"


# --- shared pieces --------------------------------------------------------------------------
NODES = """SELECT id, host, pid, roles, capabilities, version, ports,
                  CASE WHEN status IN ('running', 'starting', 'draining')
                        AND last_heartbeat < now() - make_interval(secs => {dead}) THEN 'unresponsive'
                       ELSE status END AS status,
                  started_at, last_heartbeat, stopped_at,
                  info ? 'drain_requested' AS drain_requested, info -> 'crashes' AS crashes
           FROM forge_nodes
           WHERE status NOT IN ('stopped', 'dead') OR coalesce(stopped_at, last_heartbeat) > now() - interval '1 hour'"""

LEADER = "(SELECT to_jsonb(l) FROM (SELECT node_id, term, since, renewed_at FROM forge_leaders WHERE name = 'scheduler') l)"

#: the newest value of each series of some gauges (the leader writes cluster gauges with every flush)
def latest_gauges(names_param: str, within: str = "interval '3 minutes'") -> str:
    return _agg(f"""SELECT DISTINCT ON (node_id, name, labels::text) node_id, name, labels, value, at
                    FROM forge_obs_metrics WHERE name = ANY({names_param}::text[]) AND at > now() - {within}
                    ORDER BY node_id, name, labels::text, at DESC""")


def per_minute(names_param: str, minutes_param: str, sample_param: str, step_param: str = "1") -> str:
    """Growth of counters per minute over the last N minutes, per metric name and one label
    (``status`` of jobs; ``code`` of function calls), all nodes summed. A counter that went down
    restarted: its new value is the growth.

    Reads only each minute's last ``sample_param`` seconds (one flush interval plus a margin: a
    busy series's newest value in that minute) through the ``(name, at)`` index, not every flush
    of the hour (measured at 6 nodes x 40 series x 10 s flushes: 18k rows instead of 130k, the
    sort of which cost more than a second on a loaded 2-core machine; bench/dashboard). A series
    with no row in a minute's sample (it did not change then) has its growth counted in the next
    minute it is sampled in (a point may move by a minute; growth before a series's first sampled
    row is not shown). ``step_param`` minutes per point (a long window's chart: one point per
    step, each the sum over its step)."""
    return _agg(f"""
        WITH b AS (
            SELECT m, least(m + make_interval(mins => {step_param}), now()) AS hi
            FROM generate_series(date_bin(make_interval(mins => {step_param}), now(), timestamptz '2000-01-01 00:00+00')
                                     - make_interval(mins => {minutes_param}),
                                 date_bin(make_interval(mins => {step_param}), now(), timestamptz '2000-01-01 00:00+00'),
                                 make_interval(mins => {step_param})) m
        ), s AS (
            SELECT r.name, r.node_id, r.labels, b.m, r.at, r.value AS v
            FROM b CROSS JOIN LATERAL (
                SELECT name, node_id, labels, at, value FROM forge_obs_metrics
                WHERE name = ANY({names_param}::text[]) AND at > b.hi - make_interval(secs => {sample_param}) AND at <= b.hi
                OFFSET 0) r  -- OFFSET 0: one index range scan per minute, never a join over the whole hour
        ), d AS (
            SELECT name, coalesce(labels ->> 'status', labels ->> 'code', labels ->> 'kind', '') AS label, m,
                   CASE WHEN lag(v) OVER w IS NULL THEN 0 WHEN v >= lag(v) OVER w THEN v - lag(v) OVER w ELSE v END AS inc
            FROM s WINDOW w AS (PARTITION BY name, node_id, labels::text ORDER BY at)  -- text compares faster than jsonb
        )
        SELECT name, label, m, sum(inc) AS n FROM d WHERE m > now() - make_interval(mins => {minutes_param})
        GROUP BY name, label, m""", "t.m")


# --- pages --------------------------------------------------------------------------------
def overview(dead_after: float, cap: int, have: set[str], sample: float) -> tuple[str, list[Any]]:
    parts = [f"'nodes', {_agg(NODES.format(dead='$1'), 't.id')}"]
    if "forge_jobs" in have:
        for status in ("pending", "scheduled", "running", "dead"):
            where = "forge_jobs WHERE status = '" + status + "'"
            parts.append(f"'{status}', {capped_count(where, '$2')}")
        parts.append("'max_job_id', (SELECT max(id) FROM forge_jobs)")
    if "forge_leaders" in have:
        parts.append(f"'leader', {LEADER}")
    parts.append(f"'gauges', {latest_gauges('$3')}")
    parts.append(f"'minutes', {per_minute('$4', '60', '$5')}")
    parts.append("'alerts_firing', (SELECT count(*) FROM forge_obs_alerts WHERE state = 'firing')")
    sql = "SELECT jsonb_build_object('now', now(), " + ", ".join(parts) + ")"
    return sql, [dead_after, cap + 1, ["forge_jobs", "forge_jobs_oldest_pending_seconds", "forge_cluster_nodes"],
                 ["forge_function_calls_total", "forge_jobs_finished_total"], sample]


def functions(since_minutes: int, lookback: float, sample: float, step: int, chart_minutes: int) -> tuple[str, list[Any]]:
    """The newest row of each call/latency series now and at the window's start, and calls per
    minute. ``lookback`` (seconds) is how far back a series's newest row can be: every series is
    written in full every 30th flush, so 31 flush intervals.

    Now: the rows of the last ``lookback`` (every series of a running node), and for each node
    that stopped or went quiet in the window, its rows up to its last heartbeat (its own newest
    ones): never the whole window's rows, which a long window has millions of. At the window's
    start: the rows of the ``lookback`` before it. A series with no row since the start is
    unchanged through the window, so rows before it are never needed for "now"."""
    names = ["forge_function_calls_total", "forge_function_duration_seconds"]
    cols = "node_id, name, labels, at, value, sum, bounds, buckets"
    start = "now() - make_interval(mins => $2)"
    back = "make_interval(secs => $4)"
    end = _agg(f"""SELECT DISTINCT ON (node_id, name, labels::text) {cols} FROM (
                       SELECT {cols} FROM forge_obs_metrics
                       WHERE name = ANY($1::text[]) AND at > greatest({start}, now() - {back}) AND at <= now()
                       UNION ALL
                       SELECT m.* FROM forge_nodes n CROSS JOIN LATERAL (
                           SELECT {cols} FROM forge_obs_metrics
                           WHERE name = ANY($1::text[]) AND node_id = n.id
                             AND at > greatest({start}, coalesce(n.stopped_at, n.last_heartbeat) - 2 * {back})
                             AND at <= least(coalesce(n.stopped_at, n.last_heartbeat) + {back}, now() - {back})
                           OFFSET 0) m  -- one index range scan per node
                       WHERE coalesce(n.stopped_at, n.last_heartbeat) > {start}) r
                   ORDER BY node_id, name, labels::text, at DESC""")
    begin = _agg(f"""SELECT DISTINCT ON (node_id, name, labels::text) {cols} FROM forge_obs_metrics
                     WHERE name = ANY($1::text[]) AND at > {start} - {back} AND at <= {start}
                     ORDER BY node_id, name, labels::text, at DESC""")
    sql = (f"SELECT jsonb_build_object('now', now(), 'end', {end}, 'begin', {begin}, "
           f"'minutes', {per_minute('$3', '$7', '$5', '$6')})")
    return sql, [names, since_minutes, ["forge_function_calls_total"], lookback, sample, step, chart_minutes]


JOB_COLS = """id, name, queue, status, priority, attempt, max_attempts, run_at, created_at, started_at, finished_at,
              node_id, left(last_error, 300) AS last_error, {extra}, left(args::text, 300) AS args"""
LIVE_EXTRA = "progress, progress_message, cancel_requested"
HIST_EXTRA = "NULL::real AS progress, NULL::text AS progress_message, false AS cancel_requested"


def job_filter_sql(table: str, first: int) -> tuple[str, int]:
    """The WHERE clause of a jobs search over ``table`` (bind parameters from ``$first``):
    statuses, name, queue, node, created between, arguments containing a JSON object, and the
    stretch of ids below the cursor that one page walks."""
    p = [f"${first + i}" for i in range(9)]
    where = (f"status = ANY({p[0]}::text[]) AND ({p[1]}::text IS NULL OR name = {p[1]}) "
             f"AND ({p[2]}::text IS NULL OR queue = {p[2]}) AND ({p[3]}::text IS NULL OR node_id = {p[3]}) "
             f"AND ({p[4]}::timestamptz IS NULL OR created_at >= {p[4]}) "
             f"AND ({p[5]}::timestamptz IS NULL OR created_at <= {p[5]}) "
             f"AND ({p[6]}::jsonb IS NULL OR args @> {p[6]}::jsonb) "
             f"AND id <= {p[7]}::bigint AND id > {p[7]}::bigint - {p[8]}::bigint")
    return where, first + 9


def jobs(table: str, filt: list[Any], cursor: int | None, window: int, limit: int) -> tuple[str, list[Any]]:
    extra = LIVE_EXTRA if table == "forge_jobs" else HIST_EXTRA
    where, nxt = job_filter_sql(table, 1)
    top = f"coalesce(${nxt}::bigint, (SELECT max(id) FROM {table}), 0)"
    where = where.replace("$8::bigint", "b.top")
    sql = f"""WITH b AS (SELECT {top} AS top)
              SELECT jsonb_build_object('now', now(), 'top', (SELECT top FROM b),
                  'floor', (SELECT top FROM b) - ${nxt + 1}::bigint,
                  'min_id', (SELECT min(id) FROM {table}),
                  'rows', {_agg(f"SELECT {JOB_COLS.format(extra=extra)} FROM {table}, b WHERE {where} ORDER BY id DESC LIMIT ${nxt + 2}", 't.id DESC')})"""
    # $8 (the cursor inside the filter) is replaced by b.top: keep the numbering dense
    args = filt[:7] + [None, window, cursor, window, limit]
    return _renumber_without(sql, args, 8)


def _renumber_without(sql: str, args: list[Any], gone: int) -> tuple[str, list[Any]]:
    """Drop parameter ``$gone`` (no longer in the text) and shift the ones above it down."""
    def shift(m: re.Match) -> str:
        n = int(m.group(1))
        return f"${n - 1}" if n > gone else f"${n}"
    return _PARAM.sub(shift, sql), args[:gone - 1] + args[gone:]


def bulk_targets(table: str, filt: list[Any], top: int, window: int, limit: int) -> tuple[str, list[Any]]:
    """Ids matching a jobs filter (the same stretch the page showed), newest first, at most ``limit``."""
    where, nxt = job_filter_sql(table, 1)
    return (f"SELECT coalesce(array_agg(id ORDER BY id DESC), '{{}}') FROM "
            f"(SELECT id FROM {table} WHERE {where} ORDER BY id DESC LIMIT ${nxt}) t",
            filt[:7] + [top, window, limit])


def job(job_id: int, have: set[str]) -> tuple[str, list[Any]]:
    live = f"SELECT {JOB_COLS.format(extra=LIVE_EXTRA)}, 'live' AS source, options, run_as, unique_key, caller, lease_until, timeout FROM forge_jobs WHERE id = $1"
    hist = (f"SELECT {JOB_COLS.format(extra=HIST_EXTRA)}, 'history' AS source, options, NULL::jsonb AS run_as, unique_key, caller, "
            f"NULL::timestamptz AS lease_until, NULL::float8 AS timeout FROM forge_job_history WHERE id = $1 ORDER BY finished_at DESC LIMIT 1")
    trace_ids = """ARRAY(SELECT DISTINCT tid FROM (
                        SELECT split_part(options ->> 'traceparent', '-', 2) AS tid FROM forge_jobs WHERE id = $1
                        UNION ALL SELECT split_part(options ->> 'traceparent', '-', 2) FROM forge_job_history WHERE id = $1
                        UNION ALL SELECT trace_id FROM forge_obs_logs WHERE job_id = $1 AND trace_id IS NOT NULL) x
                    WHERE tid <> '')"""
    sql = f"""SELECT jsonb_build_object('now', now(),
                'job', coalesce((SELECT to_jsonb(j) FROM ({live}) j), (SELECT to_jsonb(h) FROM ({hist}) h)),
                'logs', {_agg("SELECT at, level, message, trace_id, span_id, node_id FROM forge_obs_logs WHERE job_id = $1 ORDER BY at DESC LIMIT 200", 't.at')},
                'runs', {_agg(f"SELECT trace_id, span_id, name, node_id, start_at, duration_ms, error, attrs FROM forge_obs_spans WHERE trace_id = ANY({trace_ids}) AND kind = 'consumer' AND attrs ->> 'job.id' = $1::text", 't.start_at')})"""
    return sql, [job_id]


def queues(cap: int) -> tuple[str, list[Any]]:
    sql = f"""SELECT jsonb_build_object('now', now(),
                'paused', {_agg("SELECT queue, paused_at, paused_by FROM forge_worker_queue_pauses", 't.queue')},
                'sample', {_agg("SELECT queue, count(*) AS n FROM (SELECT queue FROM forge_jobs WHERE status = 'pending' ORDER BY priority DESC, id LIMIT $1) p GROUP BY queue", 't.queue')},
                'sample_size', {capped_count("forge_jobs WHERE status = 'pending'", '$1')},
                'gauges', {latest_gauges('$2')})"""
    return sql, [cap + 1, ["forge_jobs", "forge_jobs_oldest_pending_seconds"]]


def crons(name: str | None, limit: int) -> tuple[str, list[Any]]:
    sql = f"""SELECT jsonb_build_object('now', now(), 'leader', {LEADER},
                'crons', {_agg('''SELECT s.cron, s.schedule, s.timezone, s.paused, s.paused_at, s.decided_until, s.dropped_total,
                                         CASE WHEN s.defined_term = ld.term AND ld.node_id IS NOT NULL THEN s.defined END AS defined,
                                         l.status AS last_status, l.slot AS last_slot, l.finished_at AS last_finished,
                                         l.duration_ms AS last_ms
                                  FROM forge_cron_state s LEFT JOIN forge_leaders ld ON ld.name = 'scheduler'
                                  LEFT JOIN LATERAL (SELECT status, slot, finished_at, duration_ms FROM forge_cron_runs r
                                                     WHERE r.cron = s.cron ORDER BY id DESC LIMIT 1) l ON true''', 't.cron')},
                'runs', {_agg("SELECT id, cron, slot, kind, status, job_id, leader, enqueued_at, started_at, finished_at, duration_ms, attempts, node_id, left(error, 300) AS error FROM forge_cron_runs WHERE $1::text IS NULL OR cron = $1 ORDER BY id DESC LIMIT $2", 't.id DESC')},
                'pending_triggers', {_agg("SELECT cron, requested_at, requested_by FROM forge_cron_triggers ORDER BY id LIMIT 100")})"""
    return sql, [name, limit]


def workflows(status: list[str], name: str | None, limit: int) -> tuple[str, list[Any]]:
    sql = f"""SELECT jsonb_build_object('now', now(),
                'runs', {_agg('''SELECT id, name, version, status, compensating, cancel_requested, wait, run_at, node_id, recoveries,
                                        correlation_key, left(error, 300) AS error, created_at, started_at, finished_at, updated_at, steps_done
                                 FROM forge_workflow_runs WHERE status = ANY($1::text[]) AND ($2::text IS NULL OR name = $2)
                                 ORDER BY created_at DESC LIMIT $3''', 't.created_at DESC')})"""
    return sql, [status, name, limit]


def workflow(run_id: str) -> tuple[str, list[Any]]:
    sql = f"""SELECT jsonb_build_object('now', now(),
                'run', (SELECT to_jsonb(r) FROM (SELECT id, name, version, status, compensating, cancel_requested, args, result,
                          error, wait, run_at, node_id, lease_until, claims, recoveries, idempotency_key, correlation_key,
                          parent_id, caller, created_at, started_at, finished_at, updated_at
                        FROM forge_workflow_runs WHERE id = $1::uuid) r),
                'steps', {_agg("SELECT key, seq, name, kind, status, left(result::text, 300) AS result, left(error, 300) AS error, attempts, node_id, started_at, finished_at FROM forge_workflow_steps WHERE run_id = $1::uuid ORDER BY seq", 't.seq')},
                'events', {_agg("SELECT id, name, left(payload::text, 300) AS payload, sent_at, consumed_key, consumed_at FROM forge_workflow_events WHERE run_id = $1::uuid ORDER BY id DESC LIMIT 100", 't.id')},
                'logs', {_agg("SELECT at, level, message, trace_id, node_id FROM forge_obs_logs WHERE workflow_run_id = $1::text AND at > now() - interval '7 days' ORDER BY at DESC LIMIT 100", 't.at')})"""
    return sql, [run_id]


REALTIME_GAUGES = ["forge_realtime_connections", "forge_realtime_subscriptions", "forge_realtime_live_queries"]
REALTIME_COUNTERS = ["forge_realtime_pushes_total", "forge_realtime_reruns_total"]


def realtime(sample: float) -> tuple[str, list[Any]]:
    sql = f"""SELECT jsonb_build_object('now', now(), 'gauges', {latest_gauges('$1')},
                'minutes', {per_minute('$2', '60', '$3')})"""
    return sql, [REALTIME_GAUGES + REALTIME_COUNTERS, REALTIME_COUNTERS, sample]


LEVELS = ["TRACE", "DEBUG", "INFO", "SUCCESS", "WARNING", "ERROR", "CRITICAL"]


_LOGS = r"""
    SELECT at, node_id, level, logger, message, trace_id, span_id, call_id, job_id, cron_run_id, workflow_run_id
    FROM forge_obs_logs
    WHERE at >= coalesce($6::timestamptz, now() - make_interval(secs => $8)) AND ($9::timestamptz IS NULL OR at < $9)
      AND ($1::text[] IS NULL OR level = ANY($1::text[]))
      AND ($2::text IS NULL OR message ILIKE '%' || replace(replace(replace($2, '\', '\\'), '%', '\%'), '_', '\_') || '%')
      AND ($3::text IS NULL OR node_id = $3) AND ($4::text IS NULL OR trace_id = $4)
      AND ($5::bigint IS NULL OR job_id = $5)
    ORDER BY at DESC LIMIT $7"""


def logs(levels: list[str] | None, text: str | None, node: str | None, trace: str | None, job_id: int | None,
         since_minutes: float, limit: int, lo: Any = None, hi: Any = None) -> tuple[str, list[Any]]:
    """Log lines newest first: in the last ``since_minutes``, or from ``lo`` (a time) when given; older
    than ``hi`` when given. Only the trace and job filters have indexes: the others read every line
    of the stretch, so a long window is searched a stretch at a time (``views.LogSearch``)."""
    sql = f"SELECT jsonb_build_object('now', now(), 'rows', {_agg(_LOGS, 't.at DESC')})"
    return sql, [levels, text, node, trace, job_id, lo, limit, since_minutes * 60.0, hi]


def traces(since_minutes: float, name: str | None, errors: bool, limit: int) -> tuple[str, list[Any]]:
    """Traces by their local roots (spans without a parent, and server spans continuing a caller's
    trace) that started in the window, newest first."""
    sql = f"""SELECT jsonb_build_object('now', now(), 'rows', {_agg('''
                SELECT r.*, c.spans, c.errors
                FROM (SELECT * FROM (SELECT DISTINCT ON (trace_id) trace_id, name, kind, node_id, start_at, duration_ms, error
                      FROM (SELECT trace_id, name, kind, node_id, start_at, duration_ms, error FROM forge_obs_spans
                            WHERE start_at >= now() - make_interval(secs => $1) AND (parent_id IS NULL OR kind = 'server')
                              AND ($2::text IS NULL OR name ILIKE '%' || $2 || '%') AND (NOT $3 OR error IS NOT NULL)
                            ORDER BY start_at DESC LIMIT $4 * 4) newest
                      ORDER BY trace_id, start_at) r0
                      ORDER BY start_at DESC LIMIT $4) r
                CROSS JOIN LATERAL (SELECT count(*) AS spans, count(s.error) AS errors FROM forge_obs_spans s
                                    WHERE s.trace_id = r.trace_id) c''', 't.start_at DESC')})"""
    return sql, [since_minutes * 60.0, name, errors, limit]


def trace(trace_id: str) -> tuple[str, list[Any]]:
    sql = f"""SELECT jsonb_build_object('now', now(),
                'spans', {_agg("SELECT trace_id, span_id, parent_id, name, kind, node_id, start_at, duration_ms, error, attrs FROM forge_obs_spans WHERE trace_id = $1 ORDER BY start_at, span_id LIMIT 5000", 't.start_at, t.span_id')},
                'logs', {_agg("SELECT at, level, message, span_id, node_id FROM forge_obs_logs WHERE trace_id = $1 ORDER BY at LIMIT 500", 't.at')})"""
    return sql, [trace_id]


def nodes(dead_after: float) -> tuple[str, list[Any]]:
    return f"SELECT jsonb_build_object('now', now(), 'nodes', {_agg(NODES.format(dead='$1'), 't.id')}, 'leader', {LEADER})", [dead_after]


def alerts(limit: int) -> tuple[str, list[Any]]:
    return (f"""SELECT jsonb_build_object('now', now(), 'rows', {_agg('''SELECT id, rule, metric, state, value, threshold, message, node_id, fired_at, resolved_at
                 FROM forge_obs_alerts ORDER BY fired_at DESC, id DESC LIMIT $1''', 't.fired_at DESC, t.id DESC')})""", [limit])


def audit(action: str | None, who: str | None, limit: int) -> tuple[str, list[Any]]:
    return (f"""SELECT jsonb_build_object('now', now(), 'rows', {_agg('''SELECT id, at, who, kind, role, node_id, client, action, targets[1:20] AS targets,
                   cardinality(targets) AS target_count, filter, params, affected, before, after, outcome, error
                 FROM forge_dashboard_audit WHERE ($1::text IS NULL OR action = $1) AND ($2::text IS NULL OR who = $2)
                 ORDER BY id DESC LIMIT $3''', 't.id DESC')})""", [action, who, limit])
