"""The dashboard's statements against real tables: the big tables' pages read through their
indexes (bench/dashboard measures them at 10M jobs / 50M spans / 10M log lines), and the charts and
function totals that read only a sample of the metric rows still add up."""

from __future__ import annotations

import datetime as dt
import json
import types
from typing import Any
from urllib.parse import quote

import asyncpg
import pytest

from forge_kernel.migrations import migrate
from forge_kernel.plugins import PluginLoader
from forge_observe.config import ObserveConfig
from forge_observe.dashboard import views
from forge_observe.dashboard.config import DashboardConfig
from forge_observe.dashboard.render import Renderer

UTC = dt.timezone.utc


class _Config(dict):
    """What the views read of a node's config: [node] dead_after and [observe] flush_interval."""

    node = types.SimpleNamespace(dead_after=15.0)


def ctx(flush: float = 10.0) -> views.Ctx:
    node = types.SimpleNamespace(config=_Config(observe=ObserveConfig(flush_interval=flush)), registry=None, id="t")
    return views.Ctx(node, DashboardConfig(), frozenset(["forge_jobs", "forge_cron_state", "forge_workflow_runs",
                                                         "forge_obs_metrics", "forge_leaders"]))


async def _db(url: str) -> asyncpg.Connection:
    """Every installed package's migrations (the tables the dashboard reads), partitions around now."""
    conn = await asyncpg.connect(url)
    await migrate(conn, PluginLoader().load().migrations())
    for typ in ("json", "jsonb"):
        await conn.set_type_codec(typ, encoder=json.dumps, decoder=json.loads, schema="pg_catalog")
    await conn.execute("SELECT forge_obs_ensure_partitions(ARRAY['forge_obs_logs', 'forge_obs_spans', 'forge_obs_metrics'], "
                       "(now() - interval '8 days')::date, (now() + interval '1 day')::date)")
    return conn


def _scans(plan: Any) -> list[tuple[str, str]]:
    """(node type, index or relation name) of every scan in an EXPLAIN (FORMAT JSON) plan."""
    out = []
    if isinstance(plan, dict):
        if "Scan" in plan.get("Node Type", ""):
            out.append((plan["Node Type"], plan.get("Index Name") or plan.get("Relation Name", "")))
        for v in plan.values():
            out += _scans(v)
    elif isinstance(plan, list):
        for v in plan:
            out += _scans(v)
    return out


# (scan, index): an ordered "Index Scan" where the page reads newest first (a BRIN can only feed a sort)
@pytest.mark.parametrize("page, item, params, scan, index", [
    ("workflows", None, {"status": "all"}, "Index Scan", "forge_workflow_runs_created"),
    ("workflows", None, {"status": "blocked"}, "*", "forge_workflow_runs_status_created"),
    ("workflows", "0b6a0c4e-63d5-4c4b-9f7a-2f3e3c1d9a10", {}, "*", "forge_obs_logs_p*_workflow_run_id_idx*"),
    ("logs", None, {"since": "7d"}, "Index Scan", "forge_obs_logs_p*_at_idx*"),
    ("traces", None, {"since": "1d"}, "Index Scan", "forge_obs_spans_p*_start_at_idx*"),
])
async def test_big_tables_are_read_through_their_indexes(forge_db_url, page, item, params, scan, index):
    """Each page reads the index made for it, never a whole big table (seq scans disabled, so a
    missing index shows up as a Seq Scan; for newest-first pages sorts too, so an index giving the
    order wins if there is one)."""
    import fnmatch

    conn = await _db(forge_db_url)
    try:
        await conn.execute(
            """INSERT INTO forge_workflow_runs (id, name, status, created_at)
               SELECT md5('w' || g)::uuid, 'flow', CASE WHEN g % 1000 = 0 THEN 'blocked' ELSE 'succeeded' END,
                      now() - interval '1 second' * g FROM generate_series(1, 3000) g;
               INSERT INTO forge_obs_logs (at, node_id, level, message, workflow_run_id)
               SELECT now() - interval '1 second' * g, 'n', 'INFO', 'line ' || g,
                      CASE WHEN g % 100 = 0 THEN md5('w' || g)::uuid::text END FROM generate_series(1, 3000) g;
               INSERT INTO forge_obs_spans (trace_id, span_id, parent_id, name, kind, node_id, start_at, duration_ms)
               SELECT md5('t' || (g / 5)), left(md5('s' || g), 16), CASE WHEN g % 5 <> 0 THEN 'p' END, 'GET /x',
                      CASE WHEN g % 5 = 0 THEN 'server' ELSE 'client' END, 'n', now() - interval '1 second' * g, 1
               FROM generate_series(1, 5000) g;
               ANALYZE forge_workflow_runs, forge_obs_logs, forge_obs_spans""")
        _, build, _ = views.PAGES[page]
        query = build(ctx(), params) if item is None else views.DETAILS[page](ctx(), params, item)
        await conn.execute("SET enable_seqscan = off")
        if scan == "Index Scan":
            await conn.execute("SET enable_sort = off")
        plan = await conn.fetchval("EXPLAIN (FORMAT JSON) " + query.sql, *query.args)
        scans = _scans(plan)
        big = ("forge_workflow_runs", "forge_obs_logs", "forge_obs_spans")
        assert not [s for s in scans if s[0] == "Seq Scan" and s[1].startswith(big)], scans
        assert any(fnmatch.fnmatch(t, scan) and fnmatch.fnmatch(name, index) for t, name in scans), scans
        assert await conn.fetchval(query.sql, *query.args) is not None  # and it runs
    finally:
        await conn.close()


async def _counter(conn: asyncpg.Connection, node: str, fn: str, rows: list[tuple[dt.datetime, float]]) -> None:
    await conn.executemany(
        "INSERT INTO forge_obs_metrics (at, node_id, name, labels, value) VALUES ($1, $2, 'forge_function_calls_total', $3, $4)",
        [(at, node, {"function": fn, "kind": "query", "code": "OK"}, v) for at, v in rows])


async def test_per_minute_chart_reads_a_sample_and_adds_up(forge_db_url):
    """A busy series (a row every flush) shows its exact growth in every minute; a quiet one
    (a row every 90 s) loses nothing after its first sampled row, however its rows fall."""
    conn = await _db(forge_db_url)
    try:
        now = await conn.fetchval("SELECT now()")
        busy = [(now - dt.timedelta(seconds=10 * k + 0.5), float(10 * (180 - k))) for k in range(180)]
        quiet = [(now - dt.timedelta(seconds=90 * k + 3), float(7 * (20 - k))) for k in range(20)]
        await _counter(conn, "busy-node", "get_order", busy)
        await _counter(conn, "quiet-node", "get_order", quiet)
        query = views.overview(ctx(), {})
        data = query.shape(await conn.fetchval(query.sql, *query.args))
        calls = data["charts"]["calls"]
        assert len(calls) == 60
        # the quiet series counts from its first row inside a minute's sample (the minute's last 13 s)
        sample = ctx().metric_sample
        minute0 = now.replace(second=0, microsecond=0) - dt.timedelta(minutes=59)

        def sampled(at: dt.datetime) -> bool:
            end = min(at.replace(second=0, microsecond=0) + dt.timedelta(minutes=1), now)
            return end - dt.timedelta(seconds=sample) < at <= end and at >= minute0 - dt.timedelta(minutes=1)

        quiet_seen = sorted(v for at, v in quiet if sampled(at))
        busy_seen = sorted(v for at, v in busy if sampled(at))
        assert sum(calls) == pytest.approx((busy_seen[-1] - busy_seen[0]) + (quiet_seen[-1] - quiet_seen[0]))
        # full minutes of the busy series (6 flushes of +10 each) stand out exactly where it ran
        assert 60.0 in calls and calls[-20] >= 60.0 and calls[-45] == 0.0
    finally:
        await conn.close()


async def test_function_totals_count_a_node_that_stopped_in_the_window(forge_db_url):
    """The functions page reads only the last 31 flushes for "now", plus each node's own last
    rows when it stopped or went quiet in the window: a stopped node's calls still count."""
    conn = await _db(forge_db_url)
    try:
        now = await conn.fetchval("SELECT now()")
        await conn.execute(
            """INSERT INTO forge_nodes (id, host, pid, version, status, started_at, last_heartbeat, stopped_at)
               VALUES ('alive', 'h', 1, '1', 'running', now() - interval '2 hours', now(), NULL),
                      ('gone', 'h', 2, '1', 'stopped', now() - interval '2 hours', now() - interval '40 minutes',
                       now() - interval '40 minutes')""")
        # alive: +1 per 10 s flush for 70 minutes; gone: from 55 to 40 minutes ago, values 1..90
        alive = [(now - dt.timedelta(seconds=10 * k), float(420 - k)) for k in range(420)]
        gone = [(now - dt.timedelta(minutes=40, seconds=10 * k), float(90 - k)) for k in range(90)]
        await _counter(conn, "alive", "checkout", alive)
        await _counter(conn, "gone", "checkout", gone)
        query = views.functions(ctx(), {"since": "60m"})
        data = query.shape(await conn.fetchval(query.sql, *query.args))
        row = next(r for r in data["functions"] if r["function"] == "checkout")
        start = now - dt.timedelta(minutes=60)
        alive_growth = alive[0][1] - max(v for at, v in alive if at <= start)
        # the stopped node's series began inside the window: all of it counts
        assert row["calls"] == int(alive_growth + gone[0][1])
        # a 6 h window charts 60 points of 6 minutes, each an average per minute
        long = views.functions(ctx(), {"since": "6h"})
        charts = long.shape(await conn.fetchval(long.sql, *long.args))["charts"]
        assert len(charts["calls"]) == 60
    finally:
        await conn.close()


async def test_log_search_walks_back_a_stretch_at_a_time_and_continues(forge_db_url, monkeypatch):
    """Text in 7 days of logs (no index narrows it): read newest first, a stretch of time per
    statement, within the search budget; each answer says how far back it got and where to continue,
    and continuing until the window is done finds exactly what one scan of the whole window finds."""
    conn = await _db(forge_db_url)
    try:
        await conn.execute(
            """INSERT INTO forge_obs_logs (at, node_id, level, message)
               SELECT now() - interval '7 days' * g / 20000, 'n', 'INFO',
                      'line ' || g || CASE WHEN g % 1500 = 7 THEN ' needle' ELSE '' END
               FROM generate_series(1, 19990) g; ANALYZE forge_obs_logs""")
        expected = await conn.fetchval("SELECT array_agg(message ORDER BY at DESC) FROM forge_obs_logs "
                                       "WHERE message LIKE '%needle%'")
        # a first stretch of 2 days, then 1 s stretches (as if every statement took too long): a page
        # covers a little over 2 days before its 0.1 s budget is spent
        monkeypatch.setattr(views, "LOG_FIRST_STRETCH", 2 * 86400.0)
        monkeypatch.setattr(views, "LOG_STATEMENT_AIM", 0.0)
        cfg = ctx()
        cfg = views.Ctx(cfg.node, DashboardConfig(search_budget=0.1), cfg.have)
        found: list[str] = []
        params = {"text": "needle", "since": "7d"}
        pages, statements = 0, 0
        while True:
            query = views.logs(cfg, params)
            assert query.live == ("until" not in params)
            data = query.shape(await query.fetch(conn))
            json.dumps(data, default=str)  # the JSON twin's answer
            pages += 1
            statements += data["searched"]["statements"]
            found += [r["message"] for r in data["rows"]]
            if data["searched"]["complete"]:
                assert data["continue_until"] is None
                break
            assert data["continue_until"] and pages < 10, data["searched"]
            if pages == 1:  # the page says how far it got and links the rest
                html = Renderer().block("logs.html", "live", d=data, f=query.filters, budget=0.1)
                assert "Searched back to" in html and "Continue further back" in html, html
                assert "until=" + quote(data["continue_until"]) in html.replace("&amp;", "&"), html
            params = {**params, "until": data["continue_until"]}
        assert 3 <= pages <= 5 and statements > pages, (pages, statements)
        assert found == expected and len(found) == 14
        # the trace and job filters read through their indexes: one statement, the whole window
        query = views.logs(cfg, {"job": "5", "since": "7d"})
        data = query.shape(await query.fetch(conn))
        assert data["searched"] == {**data["searched"], "complete": True, "statements": 1}
    finally:
        await conn.close()
