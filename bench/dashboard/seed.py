"""Seed a database for the dashboard benchmark: the real migrations, then bulk rows made in SQL.

Everything is generated inside PostgreSQL (``generate_series``), in time order as a live system
appends it (so BRIN ranges stay as tight as they are in production), in chunks run by two
sessions at once. Secondary indexes of the big tables are dropped before the fill and rebuilt
after it with their exact migration definitions (``pg_get_indexdef``): the same indexes, built
in one pass instead of row by row.

The shape of the data (``Sizes``):

* jobs: ``jobs`` ids over the last day (``[worker] history_retention`` defaults to one day):
  the newest 9 % are the live backlog (pending, every 20th scheduled, the 100 oldest running),
  1 % of the older ones dead letters (live table), the rest in ``forge_job_history``
  (succeeded; 3 % cancelled, 1 % discarded). 20 names with a skewed mix, one queue per name,
  6 nodes, arguments ``{"user_id": j % 100000, "tenant": "t<j % 50>", "order": "ord-<j>"}``.
  One job in 21 carries the traceparent of a stored consumer trace with its ``job.id``.
* spans: ``traces`` traces of 5 spans (a server or consumer root, a function, three SQL
  statements) spread evenly over the last 7 days (``retention.spans``); 2 % failed.
* logs: ``logs`` lines over the same 7 days (``retention.logs``), 3/5 with a trace id, job lines
  with their ``job_id``; levels INFO 80 %, DEBUG 10 %, WARNING 7 %, ERROR 3 %.
* metrics: the last day of 6 nodes flushing ~55 series every 10 s, the leader's job gauges.
* workflows (runs, 4 steps each, events), crons and their runs over 7 days, nodes, alerts, audit.

Time is measured from ``end`` (the seeding's ``now()``); :func:`top_up` appends what a running
cluster would have written since, so the time-windowed pages see the same density when the
measurement runs later.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, Awaitable, Callable

import asyncpg
import attrs

from forge_kernel import migrations as migmod
from forge_kernel.plugins import PluginLoader


@attrs.frozen
class Sizes:
    jobs: int = 10_000_000
    traces: int = 10_000_000  # x 5 spans
    logs: int = 10_000_000
    workflows: int = 500_000
    live_backlog: int = 900_000
    metric_hours: int = 24

    @property
    def spans(self) -> int:
        return self.traces * 5


JOB_NAMES = ["send_email", "resize_image", "sync_crm", "charge_card", "generate_report", "index_document",
             "send_push", "refresh_cache", "export_csv", "import_feed", "notify_slack", "compute_invoice",
             "transcode_video", "score_lead", "backup_tenant", "geocode_address", "purge_uploads",
             "rebuild_search", "settle_payout", "audit_login"]
QUEUES = ["mail", "media", "crm", "billing", "reports", "search", "default", "maintenance"]
FUNCTIONS = ["get_order", "list_orders", "create_order", "update_profile", "search_products", "get_cart",
             "add_to_cart", "checkout", "login", "dashboard_stats"]
NODES = [f"node-{i}" for i in range(6)]

# helper functions used by every generator (a schema of the bench database's own)
HELPERS = f"""
CREATE SCHEMA IF NOT EXISTS forge_bench;
CREATE TABLE IF NOT EXISTS forge_bench.seed (k text PRIMARY KEY, v jsonb NOT NULL);
CREATE OR REPLACE FUNCTION forge_bench.h(x bigint, m integer) RETURNS integer
  LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$ SELECT ((hashint8(x)::bigint + 2147483648) % m)::integer $$;
CREATE OR REPLACE FUNCTION forge_bench.job_k(j bigint) RETURNS integer
  LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$ SELECT floor(20 * power(forge_bench.h(j, 1000) / 1000.0, 2))::integer $$;
CREATE OR REPLACE FUNCTION forge_bench.job_name(j bigint) RETURNS text
  LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$ SELECT (ARRAY{JOB_NAMES!r}::text[])[forge_bench.job_k(j) + 1] $$;
CREATE OR REPLACE FUNCTION forge_bench.job_queue(j bigint) RETURNS text
  LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$ SELECT (ARRAY{QUEUES!r}::text[])[forge_bench.job_k(j) % 8 + 1] $$;
CREATE OR REPLACE FUNCTION forge_bench.fn(t bigint) RETURNS text
  LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$ SELECT (ARRAY{FUNCTIONS!r}::text[])[forge_bench.h(t, 10) + 1] $$;
CREATE OR REPLACE FUNCTION forge_bench.tid(t bigint) RETURNS text
  LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$ SELECT md5('t' || t) $$;
CREATE OR REPLACE FUNCTION forge_bench.sid(t bigint, s integer) RETURNS text
  LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$ SELECT left(md5('s' || t || '.' || s), 16) $$;
"""

# trace t is a job's consumer trace when (T - t) % 3 = 0 and the job 7 (T - t) ids below the newest exists
_JOBS = """
INSERT INTO {table} ({cols})
SELECT j, forge_bench.job_name(j), forge_bench.job_queue(j),
       jsonb_build_object('user_id', j % 100000, 'tenant', 't' || (j % 50), 'order', 'ord-' || j),
       CASE WHEN forge_bench.h(j, 10) = 0 THEN 10 ELSE 0 END, st,
       CASE WHEN st = 'dead' THEN 5 WHEN st IN ('pending', 'scheduled') THEN 0 ELSE 1 END, 5,
       CASE WHEN j % 13 = 0 THEN 'u-' || j END, 'user:' || (j % 1000),
       CASE WHEN (P.n - j) % 21 = 0 AND (P.n - j) / 7 < P.t
            THEN jsonb_build_object('traceparent', '00-' || forge_bench.tid(P.t - (P.n - j) / 7) || '-'
                                    || forge_bench.sid(P.t - (P.n - j) / 7, 0) || '-01')
            ELSE '{{}}'::jsonb END,
       CASE WHEN st IN ('pending', 'scheduled') THEN NULL ELSE 'node-' || (j % 6) END,
       CASE WHEN st = 'dead' THEN 'TimeoutError: ' || forge_bench.job_name(j) || ' took longer than 30 s (attempt 5 of 5)'
            WHEN st = 'discarded' THEN 'ValueError: bad input for ' || forge_bench.job_name(j) END,
       ct, CASE WHEN st = 'scheduled' THEN P.end_at + interval '1 hour' * (1 + j % 48) ELSE ct END,
       CASE WHEN st IN ('pending', 'scheduled') THEN NULL ELSE ct + interval '40 ms' END,
       {finished}
FROM (SELECT $3::bigint AS n, $4::bigint AS t, $5::timestamptz AS end_at) P,
     generate_series($1::bigint, $2::bigint) j,
     LATERAL (SELECT P.end_at - interval '1 day' * ((P.n - j)::float8 / P.n) AS ct,
                     CASE WHEN j > P.n - $6::bigint THEN
                               CASE WHEN j <= P.n - $6::bigint + 100 THEN 'running'
                                    WHEN j % 20 = 0 THEN 'scheduled' ELSE 'pending' END
                          WHEN j % 100 = 7 THEN 'dead'
                          WHEN j % 100 IN (11, 12, 13) THEN 'cancelled'
                          WHEN j % 100 = 17 THEN 'discarded'
                          ELSE 'succeeded' END AS st) s
WHERE {where}
"""
_COMMON = "id, name, queue, args, priority, status, attempt, max_attempts, unique_key, caller, options, node_id, last_error, created_at, run_at, started_at"
JOBS_LIVE = _JOBS.format(table="forge_jobs", cols=_COMMON + ", lease_until, finished_at",
                         finished="CASE WHEN st = 'running' THEN now() + interval '5 minutes' END, "
                                  "CASE WHEN st = 'dead' THEN ct + interval '31 s' END",
                         where="st IN ('pending', 'scheduled', 'running', 'dead')")
JOBS_HISTORY = _JOBS.format(table="forge_job_history", cols=_COMMON + ", finished_at",
                            finished="ct + interval '40 ms' + interval '1 ms' * forge_bench.h(j, 500)",
                            where="st IN ('succeeded', 'cancelled', 'discarded')")

# five spans per trace t, at T0 + t * step (T0 = end - 7 days, step = 7 days / T)
SPANS = """
INSERT INTO forge_obs_spans (trace_id, span_id, parent_id, name, kind, node_id, start_at, duration_ms, error, attrs)
SELECT b.tid, CASE s WHEN 0 THEN b.sid0 WHEN 1 THEN b.sid1 ELSE forge_bench.sid(t, s) END,
       CASE s WHEN 0 THEN NULL WHEN 1 THEN b.sid0 ELSE b.sid1 END,
       CASE s WHEN 0 THEN CASE WHEN b.consumer THEN b.jname ELSE 'POST /rpc/' || b.fn END
              WHEN 1 THEN CASE WHEN b.consumer THEN 'job ' || b.jname ELSE b.fn END
              ELSE 'SELECT' END,
       CASE s WHEN 0 THEN CASE WHEN b.consumer THEN 'consumer' ELSE 'server' END WHEN 1 THEN 'internal' ELSE 'client' END,
       b.node, b.at0 + interval '1 ms' * s, CASE s WHEN 0 THEN b.dur WHEN 1 THEN b.dur - 1 ELSE b.dur / 5 END,
       CASE WHEN t % 50 = 0 AND s IN (0, 4) THEN 'INTERNAL: relation lock timeout' END,
       CASE s WHEN 0 THEN b.root_attrs WHEN 1 THEN b.fn_attrs ELSE b.sql_attrs END
FROM (SELECT $3::bigint AS tn, $4::bigint AS jn, $5::timestamptz AS end_at) P,
     generate_series($1::bigint, $2::bigint) t,
     LATERAL (SELECT t <= P.tn AND (P.tn - t) % 3 = 0 AND (P.tn - t) * 7 < P.jn AS job) a,
     LATERAL (SELECT CASE WHEN a.job THEN P.jn - 7 * (P.tn - t) ELSE t END AS jid, a.job OR t % 10 < 3 AS consumer,
                     forge_bench.fn(t) AS fn) c,
     LATERAL (SELECT forge_bench.tid(t) AS tid, forge_bench.sid(t, 0) AS sid0, forge_bench.sid(t, 1) AS sid1,
                     forge_bench.job_name(c.jid) AS jname, c.consumer, c.fn, 'node-' || (t % 6) AS node,
                     P.end_at - interval '7 days' * ((P.tn - t)::float8 / P.tn) AS at0,
                     2.0 + forge_bench.h(t, 300) AS dur,
                     CASE WHEN c.consumer THEN jsonb_build_object('job.id', c.jid, 'job.name', forge_bench.job_name(c.jid),
                                                                  'job.attempt', 1)
                          ELSE jsonb_build_object('http.route', '/rpc/' || c.fn, 'http.status_code',
                                                  CASE WHEN t % 50 = 0 THEN 500 ELSE 200 END) END AS root_attrs,
                     jsonb_build_object('function', c.fn) AS fn_attrs,
                     '{"db.system": "postgresql", "db.statement": "SELECT * FROM orders WHERE id = $1"}'::jsonb AS sql_attrs
              OFFSET 0) b,
     generate_series(0, 4) s
"""

LOGS = """
INSERT INTO forge_obs_logs (at, node_id, level, logger, message, trace_id, span_id, call_id, job_id, cron_run_id,
                            workflow_run_id, extra)
SELECT at0, 'node-' || (i % 6), lvl,
       CASE WHEN jid IS NOT NULL THEN 'app.jobs' ELSE 'app.' || forge_bench.fn(i) END,
       CASE lvl WHEN 'ERROR' THEN 'payment provider answered 502 for order ord-' || i || ' (user ' || (i % 100000) || ')'
                WHEN 'WARNING' THEN 'slow query on orders: ' || (100 + i % 900) || ' ms'
                WHEN 'DEBUG' THEN 'cache miss for cart:' || (i % 100000)
                ELSE CASE WHEN jid IS NOT NULL THEN 'job ' || forge_bench.job_name(jid) || ' processed order ord-' || jid
                          ELSE forge_bench.fn(i) || ' served user ' || (i % 100000) || ' in ' || (i % 97) || ' ms' END END,
       CASE WHEN i % 5 < 3 THEN forge_bench.tid(i) END, CASE WHEN i % 5 < 3 THEN forge_bench.sid(i, 1) END,
       NULL, jid, NULL, CASE WHEN i % 97 = 0 THEN md5('w' || (i % $6::bigint))::uuid::text END, NULL
FROM (SELECT $3::bigint AS tn, $4::bigint AS jn, $5::timestamptz AS end_at) P,
     generate_series($1::bigint, $2::bigint) i,
     LATERAL (SELECT P.end_at - interval '7 days' * ((P.tn - i)::float8 / P.tn) AS at0,
                     CASE WHEN i % 5 < 3 AND (P.tn - i) % 3 = 0 AND (P.tn - i) * 7 < P.jn THEN P.jn - 7 * (P.tn - i) END AS jid,
                     CASE WHEN forge_bench.h(i, 100) < 3 THEN 'ERROR' WHEN forge_bench.h(i, 100) < 10 THEN 'WARNING'
                          WHEN forge_bench.h(i, 100) < 20 THEN 'DEBUG' ELSE 'INFO' END AS lvl) x
"""

# one row per series per flush (10 s) from $1 to $2: per node 20 call counters, 10 latency
# histograms, 20 job counters, 3 realtime gauges, 2 realtime counters; the leader's job gauges
_BOUNDS = "ARRAY[0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10]::float8[]"
METRICS = f"""
INSERT INTO forge_obs_metrics (at, node_id, name, labels, value, sum, bounds, buckets)
SELECT f.at, n.node, s.name, s.labels, s.rate * extract(epoch FROM f.at - $3::timestamptz), s.sum_rate * extract(epoch FROM f.at - $3::timestamptz),
       s.bounds, CASE WHEN s.bounds IS NOT NULL THEN
                   ARRAY(SELECT round(s.rate * extract(epoch FROM f.at - $3::timestamptz) * least(1.0, b / 0.05)) FROM unnest(s.bounds) b) END
FROM generate_series($1::timestamptz, $2::timestamptz, interval '10 s') f(at),
     unnest($4::text[]) n(node),
     (SELECT 'forge_function_calls_total' AS name, jsonb_build_object('function', fn, 'kind', 'query', 'code', code) AS labels,
             CASE code WHEN 'OK' THEN 3.0 ELSE 0.02 END AS rate, NULL::float8 AS sum_rate, NULL::float8[] AS bounds
      FROM unnest($5::text[]) fn, unnest(ARRAY['OK', 'INTERNAL']) code
      UNION ALL
      SELECT 'forge_function_duration_seconds', jsonb_build_object('function', fn, 'kind', 'query'), 3.02, 0.06, {_BOUNDS}
      FROM unnest($5::text[]) fn
      UNION ALL
      SELECT 'forge_jobs_finished_total', jsonb_build_object('job', jn, 'status', st), CASE st WHEN 'succeeded' THEN 2.0 ELSE 0.03 END, NULL, NULL
      FROM unnest($6::text[]) jn, unnest(ARRAY['succeeded', 'failed']) st
      UNION ALL
      SELECT g, '{{}}'::jsonb, 0, NULL, NULL FROM unnest(ARRAY['forge_realtime_connections', 'forge_realtime_subscriptions',
                                                            'forge_realtime_live_queries']) g
      UNION ALL
      SELECT c, '{{}}'::jsonb, 5.0, NULL, NULL FROM unnest(ARRAY['forge_realtime_pushes_total', 'forge_realtime_reruns_total']) c) s
"""
METRICS_LEADER = """
INSERT INTO forge_obs_metrics (at, node_id, name, labels, value)
SELECT f.at, 'node-0', 'forge_jobs', jsonb_build_object('queue', q, 'status', st),
       CASE st WHEN 'pending' THEN 100000 WHEN 'scheduled' THEN 6000 WHEN 'running' THEN 12 ELSE 11000 END
FROM generate_series($1::timestamptz, $2::timestamptz, interval '10 s') f(at), unnest($3::text[]) q,
     unnest(ARRAY['pending', 'scheduled', 'running', 'dead']) st
UNION ALL
SELECT f.at, 'node-0', 'forge_jobs_oldest_pending_seconds', jsonb_build_object('queue', q), 7900
FROM generate_series($1::timestamptz, $2::timestamptz, interval '10 s') f(at), unnest($3::text[]) q
"""

WORKFLOWS = """
INSERT INTO forge_workflow_runs (id, name, version, args, status, run_at, claims, node_id, wait, steps_done,
                                 correlation_key, caller, result, error, created_at, started_at, finished_at, updated_at)
SELECT md5('w' || w)::uuid, 'flow_' || forge_bench.job_name(w), 'v3', jsonb_build_object('order', 'ord-' || w),
       st, CASE WHEN st IN ('pending', 'waiting') THEN now() + interval '1 minute' * (w % 600) END, 1,
       CASE WHEN st = 'running' THEN 'node-' || (w % 6) END,
       CASE WHEN st = 'waiting' THEN jsonb_build_object('kind', 'event', 'events', jsonb_build_array('payment_confirmed'))
            WHEN st = 'blocked' THEN jsonb_build_object('key', '3') END,
       4, 'order:' || w, 'user:' || (w % 1000),
       CASE WHEN st = 'succeeded' THEN '{"ok": true}'::jsonb END,
       CASE WHEN st = 'failed' THEN 'PaymentDeclined: card expired' END,
       ct, ct + interval '5 ms', CASE WHEN st IN ('succeeded', 'failed', 'cancelled') THEN ct + interval '2 s' END, ct + interval '2 s'
FROM generate_series(1, $1::bigint) w,
     LATERAL (SELECT $2::timestamptz - interval '7 days' * (($1::bigint - w)::float8 / $1::bigint) AS ct,
                     CASE WHEN w > $1::bigint - 2000 THEN (ARRAY['pending', 'running', 'waiting', 'waiting', 'blocked'])[w % 5 + 1]
                          WHEN w % 50 = 0 THEN 'failed' WHEN w % 100 = 1 THEN 'cancelled' ELSE 'succeeded' END AS st) x;
INSERT INTO forge_workflow_steps (run_id, key, name, kind, status, result, attempts, claim, node_id, started_at, finished_at)
SELECT r.id, k::text, (ARRAY['reserve', 'charge', 'ship', 'notify'])[k], 'step', 'succeeded', '{"ok": true}'::jsonb, 1, 1,
       'node-' || (k % 6), r.created_at + interval '10 ms' * k, r.created_at + interval '10 ms' * k + interval '5 ms'
FROM forge_workflow_runs r, generate_series(1, 4) k ORDER BY r.created_at, k;
INSERT INTO forge_workflow_events (run_id, name, payload, sent_at, consumed_key, consumed_at)
SELECT id, 'payment_confirmed', '{"amount": 42}'::jsonb, created_at + interval '1 s', '2', created_at + interval '1 s'
FROM forge_workflow_runs WHERE steps_done = 4 AND hashtext(id::text) % 5 = 0 ORDER BY created_at;
"""

CRONS = """
INSERT INTO forge_cron_state (cron, schedule, timezone, decided_until, defined, defined_term)
SELECT 'cron_' || c, CASE WHEN c <= 5 THEN '* * * * *' ELSE '0 * * * *' END, 'UTC', date_trunc('minute', now()), true, 1
FROM generate_series(1, 20) c;
INSERT INTO forge_leaders (name, node_id, term, since, renewed_at) VALUES ('scheduler', 'node-0', 1, now() - interval '7 days', now())
ON CONFLICT (name) DO NOTHING;
INSERT INTO forge_cron_runs (cron, slot, kind, status, job_id, leader, leader_term, enqueued_at, started_at, finished_at,
                             duration_ms, attempts, node_id, error)
SELECT 'cron_' || c, slot, 'scheduled', CASE WHEN hashint8(extract(epoch FROM slot)::bigint + c) % 40 = 0 THEN 'failed' ELSE 'succeeded' END,
       NULL, 'node-0', 1, slot, slot + interval '20 ms', slot + interval '120 ms', 100, 1, 'node-' || (c % 6),
       CASE WHEN hashint8(extract(epoch FROM slot)::bigint + c) % 40 = 0 THEN 'RuntimeError: upstream down' END
FROM generate_series(1, 20) c,
     generate_series(date_trunc('hour', now() - interval '7 days'), now() - interval '1 minute',
                     CASE WHEN c <= 5 THEN interval '1 minute' ELSE interval '1 hour' END) slot
ORDER BY slot, c;
"""

NODES_ETC = """
INSERT INTO forge_nodes (id, host, pid, roles, version, status, started_at, last_heartbeat, stopped_at)
SELECT 'node-' || n, 'host-' || n, 1000 + n, ARRAY['gateway', 'worker', 'scheduler', 'realtime'], '0.1.0', 'running',
       now() - interval '2 days', now(), NULL FROM generate_series(0, 5) n
UNION ALL
SELECT 'old-' || n, 'host-' || (n % 6), 2000 + n, ARRAY['gateway', 'worker'], '0.0.9', 'stopped',
       now() - interval '30 days' + interval '1 hour' * n, now() - interval '29 days' + interval '1 hour' * n,
       now() - interval '29 days' + interval '1 hour' * n FROM generate_series(1, 200) n;
INSERT INTO forge_obs_alerts (rule, metric, state, value, threshold, message, node_id, fired_at, resolved_at)
SELECT 'rule_' || (a % 10), 'forge_function_error_rate', 'resolved', 0.2, 0.05, 'error rate above 5 %', 'node-0',
       now() - interval '1 minute' * a, now() - interval '1 minute' * a + interval '5 minutes'
FROM generate_series(10, 20000) a;
INSERT INTO forge_dashboard_audit (at, who, kind, role, node_id, client, action, targets, affected, outcome)
SELECT now() - interval '1 minute' * a, 'ops-' || (a % 5), 'api_key', 'admin', 'node-' || (a % 6), '10.0.0.' || (a % 200),
       (ARRAY['retry_job', 'cancel_job', 'pause_queue', 'trigger_cron'])[a % 4 + 1], ARRAY[a::text], 1, 'ok'
FROM generate_series(1, 20000) a ORDER BY a DESC;
"""

BIG_TABLES = ["forge_jobs", "forge_job_history", "forge_obs_spans", "forge_obs_logs", "forge_obs_metrics",
              "forge_workflow_runs", "forge_workflow_steps", "forge_workflow_events", "forge_cron_runs"]


def say(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


async def migrate(url: str) -> int:
    """The schema, made by the real migrations of every installed FORGE package."""
    conn = await asyncpg.connect(url)
    try:
        applied = await migmod.migrate(conn, PluginLoader().load().migrations())
    finally:
        await conn.close()
    return len(applied)


def ranges(lo: int, hi: int, chunk: int) -> list[tuple[int, int]]:
    return [(a, min(a + chunk - 1, hi)) for a in range(lo, hi + 1, chunk)]


def newest_days_first(n: int, chunk: int, days: int = 7) -> list[tuple[int, int]]:
    """``[1, n]`` cut into ``days`` stretches, newest (highest) stretch first, each in ascending
    chunks: a seeding cut short by its time budget still holds the most recent days, each
    written in time order."""
    out = []
    for d in range(days):
        hi, lo = n - d * n // days, n - (d + 1) * n // days + 1
        out += ranges(lo, hi, chunk)
    return out


async def _chunks(url: str, sql: str, parts: list[tuple[int, int]], extra: list[Any], label: str,
                  deadline: float | None = None) -> int:
    """Run ``sql`` over each ``(a, b)`` of ``parts`` in order on one session; stops taking new
    parts after ``deadline`` (monotonic). Returns the number of indexes written."""
    t0 = time.monotonic()
    total = sum(b - a + 1 for a, b in parts)
    written = 0
    conn = await asyncpg.connect(url)
    try:
        await conn.execute("SET synchronous_commit = off; SET jit = off")
        for a, b in parts:
            if deadline is not None and time.monotonic() > deadline:
                say(f"  {label}: time budget spent, stopping at {written:,} of {total:,}")
                break
            await conn.execute(sql, a, b, *extra)
            written += b - a + 1
            say(f"  {label}: {written:,} of {total:,} ({time.monotonic() - t0:.0f} s)")
    finally:
        await conn.close()
    return written


async def _drop_indexes(conn: asyncpg.Connection, tables: list[str]) -> list[str]:
    rows = await conn.fetch(
        """SELECT i.indexrelid::regclass::text AS name, pg_get_indexdef(i.indexrelid) AS def
           FROM pg_index i JOIN pg_class c ON c.oid = i.indrelid
           WHERE c.relname = ANY($1::text[]) AND NOT i.indisprimary
             AND NOT EXISTS (SELECT 1 FROM pg_inherits h WHERE h.inhrelid = i.indexrelid)""", tables)
    for r in rows:
        await conn.execute(f"DROP INDEX {r['name']}")
    # a partitioned table's index reads "ON ONLY parent" (no partition's index): build them all again
    return [r["def"].replace(" ON ONLY ", " ON ") for r in rows]


async def _timed(label: str, coro: Awaitable[Any]) -> Any:
    t0 = time.monotonic()
    out = await coro
    say(f"{label}: {time.monotonic() - t0:.0f} s")
    return out


async def _metrics(conn: asyncpg.Connection, lo: Any, hi: Any, counters_from: Any) -> None:
    await conn.execute(METRICS, lo, hi, counters_from, NODES, FUNCTIONS, JOB_NAMES)
    await conn.execute(METRICS_LEADER, lo, hi, QUEUES)


async def seed(url: str, sizes: Sizes, span_budget_s: float = 900.0) -> dict[str, Any]:
    """Fill an empty, migrated database; returns what was written. Two sessions: one writes the
    spans (in time order, stopping after ``span_budget_s``), the other everything else (each
    table in time order too: one writer per table keeps BRIN ranges as tight as in production)."""
    import datetime as dt
    import json

    conn = await asyncpg.connect(url)
    await conn.execute(HELPERS)
    end_at = await conn.fetchval("SELECT now()")
    await conn.execute("SELECT forge_obs_ensure_partitions(ARRAY['forge_obs_logs', 'forge_obs_spans', 'forge_obs_metrics'], "
                       "(now() - interval '8 days')::date, (now() + interval '2 days')::date)")
    defs = await _drop_indexes(conn, BIG_TABLES)
    say(f"dropped {len(defs)} secondary indexes for the fill (rebuilt after, same definitions)")
    J, T, L = sizes.jobs, sizes.traces, sizes.logs

    async def spans_lane() -> int:
        # two sessions, each on its own days (partitions): every partition still filled in time order
        days = newest_days_first(T, 200_000)
        per_day = len(days) // 7 or 1
        lanes = [[p for i, p in enumerate(days) if (i // per_day) % 2 == k] for k in (0, 1)]
        deadline = time.monotonic() + span_budget_s
        done = await _timed("spans", asyncio.gather(*(_chunks(url, SPANS, lane, [T, J, end_at], f"traces/{k}",
                                                              deadline=deadline) for k, lane in enumerate(lanes))))
        return sum(done)

    async def other_lane() -> None:
        other = await asyncpg.connect(url)
        try:
            await other.execute("SET synchronous_commit = off; SET jit = off")
            await _timed("jobs (live)", _chunks(url, JOBS_LIVE, ranges(1, J, 1_000_000), [J, T, end_at, sizes.live_backlog],
                                                "live jobs"))
            await _timed("jobs (history)", _chunks(url, JOBS_HISTORY, ranges(1, J, 500_000), [J, T, end_at, sizes.live_backlog],
                                                   "history"))
            await other.execute("SELECT setval(pg_get_serial_sequence('forge_jobs', 'id'), $1::bigint)", J)
            await _timed("logs", _chunks(url, LOGS, ranges(1, L, 500_000), [T, J, end_at, sizes.workflows], "logs"))
            await _timed("metrics", _metrics(other, end_at - dt.timedelta(hours=sizes.metric_hours), end_at,
                                             end_at - dt.timedelta(days=2)))
            await _timed("workflows", other.execute(WORKFLOWS.replace("$1::bigint", str(int(sizes.workflows)))
                                                    .replace("$2::timestamptz", "'" + end_at.isoformat() + "'::timestamptz")))
            await _timed("crons", other.execute(CRONS))
            await _timed("nodes, alerts, audit", other.execute(NODES_ETC))
        finally:
            await other.close()

    traces_written, _ = await asyncio.gather(spans_lane(), other_lane())
    await conn.execute("SET maintenance_work_mem = '1GB'; SET max_parallel_maintenance_workers = 1")
    for d in defs:
        await _timed(f"index {d.split(' ON ')[0].split()[-1]}", conn.execute(d))
    await _timed("vacuum analyze", conn.execute("VACUUM (ANALYZE) " + ", ".join(BIG_TABLES)))
    # spans are written newest day first: the newest stretch always reaches T
    info = {"end_at": end_at.isoformat(), "jobs": J, "T": T, "top_t": T, "top_l": L, "workflows": sizes.workflows,
            "traces_written": traces_written}
    await conn.execute("INSERT INTO forge_bench.seed (k, v) VALUES ('sizes', $1::jsonb) "
                       "ON CONFLICT (k) DO UPDATE SET v = excluded.v", json.dumps(info))
    await conn.close()
    return info


async def top_up(url: str) -> dict[str, Any]:
    """Append the spans, logs and metrics written since the seeding's end at the same rate
    (and refresh the running nodes' heartbeats), so time windows ending now are as full as
    they would be on a live cluster."""
    import datetime as dt
    import json

    conn = await asyncpg.connect(url)
    try:
        info = json.loads(await conn.fetchval("SELECT v::text FROM forge_bench.seed WHERE k = 'sizes'"))
        T = info["T"]
        end0 = dt.datetime.fromisoformat(info["end_at"])
        now = await conn.fetchval("SELECT now()")
        await conn.execute("SELECT forge_obs_ensure_partitions(ARRAY['forge_obs_logs', 'forge_obs_spans', 'forge_obs_metrics'], "
                           "now()::date, (now() + interval '1 day')::date)")
        # generators place index i at end0 - 7 days * (T - i) / T: indexes past T land after end0
        want = T + int((now - end0) / (dt.timedelta(days=7) / T))
        if want > info["top_t"]:
            await conn.execute(SPANS, info["top_t"] + 1, want, T, info["jobs"], end0)
            info["top_t"] = want
        if want > info["top_l"]:
            await conn.execute(LOGS, info["top_l"] + 1, want, T, info["jobs"], end0, info["workflows"])
            info["top_l"] = want
        last = await conn.fetchval("SELECT max(at) FROM forge_obs_metrics")
        if last is not None and now - last > dt.timedelta(seconds=10):
            await _metrics(conn, last + dt.timedelta(seconds=10), now, end0 - dt.timedelta(days=2))
        await conn.execute("UPDATE forge_nodes SET last_heartbeat = now() WHERE status = 'running' AND id LIKE 'node-%'")
        await conn.execute("UPDATE forge_leaders SET renewed_at = now() WHERE name = 'scheduler' AND node_id = 'node-0'")
        await conn.execute("UPDATE forge_bench.seed SET v = $1::jsonb WHERE k = 'sizes'", json.dumps(info))
        return info
    finally:
        await conn.close()


async def sizes_report(url: str) -> list[tuple[str, int, int]]:
    """Rows (estimated by the planner's statistics, refreshed by ANALYZE) and bytes with indexes, per table."""
    conn = await asyncpg.connect(url)
    try:
        rows = await conn.fetch(
            """SELECT c.relname AS name,
                      coalesce((SELECT sum(greatest(p.reltuples, 0)) FROM pg_inherits i JOIN pg_class p ON p.oid = i.inhrelid
                                WHERE i.inhparent = c.oid), greatest(c.reltuples, 0))::bigint AS n,
                      coalesce((SELECT sum(pg_total_relation_size(i.inhrelid)) FROM pg_inherits i WHERE i.inhparent = c.oid),
                               pg_total_relation_size(c.oid))::bigint AS bytes
               FROM pg_class c WHERE c.relname = ANY($1::text[])
               ORDER BY bytes DESC""", BIG_TABLES + ["forge_nodes", "forge_obs_alerts", "forge_dashboard_audit"])
        total = await conn.fetchval("SELECT pg_database_size(current_database())")
        return [(r["name"], r["n"], r["bytes"]) for r in rows] + [("(database)", -1, total)]
    finally:
        await conn.close()
