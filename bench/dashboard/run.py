"""The admin dashboard at scale: seed a big database, then time every page's JSON twin.

    .venv/bin/python bench/dashboard/run.py                 # seed 10M jobs / 50M spans / 10M logs, measure, drop
    .venv/bin/python bench/dashboard/run.py --keep --pg-root /var/tmp/forge-dash   # keep server and database
    .venv/bin/python bench/dashboard/run.py --pg-root /var/tmp/forge-dash --reuse  # measure the kept database again
    .venv/bin/python bench/dashboard/run.py --scale 0.01    # a quick check of the whole path (100k jobs...)

The database is a fresh one (``forge_bench_dashboard``) on an embedded PostgreSQL of the bench's
own, or on ``FORGE_TEST_DATABASE_URL``'s server when set. It is made by the real migrations
(forge_kernel.migrations.migrate over every installed package), then filled by seed.py. One real
``forge-node`` (role gateway, an admin API key) serves the dashboard; every case below is fetched
``--rounds`` times over HTTP (``GET /_forge/api/<page>``) and its statement run as many times
straight through asyncpg (what PostgreSQL costs, without HTTP and shaping), both reported as
p50/p95. Any case whose SQL p95 is over 100 ms gets its ``EXPLAIN (ANALYZE, BUFFERS)`` printed.
A case no index can narrow (a text
search over 7 days of logs) answers within ``[dashboard] search_budget`` saying how far back it got.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import hashlib
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
import types
from pathlib import Path
from typing import Any

import asyncpg
import httpx

sys.path.insert(0, str(Path(__file__).parent))
import seed as seedmod  # noqa: E402

from forge_kernel.db import with_database  # noqa: E402
from forge_kernel.testing.procs import NodeProcess, free_port  # noqa: E402
from forge_observe.dashboard import live as dlive  # noqa: E402
from forge_observe.dashboard import queries as dq  # noqa: E402
from forge_observe.dashboard import views  # noqa: E402
from forge_observe.config import ObserveConfig  # noqa: E402
from forge_observe.dashboard.config import DashboardConfig  # noqa: E402

DB_NAME = "forge_bench_dashboard"
ADMIN_KEY = "bench-dashboard-admin-key-" + hashlib.sha256(os.urandom(16)).hexdigest()[:16]
PG_SETTINGS = {"shared_buffers": "1GB", "max_wal_size": "4GB", "checkpoint_timeout": "30min",
               "fsync": "off", "synchronous_commit": "off", "full_page_writes": "off"}


def load() -> str:
    return "/".join(f"{x:.1f}" for x in os.getloadavg())


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p * (len(xs) - 1))))]


def cases(info: dict[str, Any]) -> list[tuple[str, str, str | None, dict[str, str]]]:
    """(label, page, item, query parameters): the filters operators use, on the seeded data."""
    J, T = info["jobs"], info["T"]
    backlog = 900_000 * J // 10_000_000
    # a job finished (history) with a stored consumer trace, and a dead letter
    j_hist = next(j for j in range(J - backlog - 21 * 1000, 0, -1)
                  if (J - j) % 21 == 0 and j % 100 not in (7, 11, 12, 13, 17))
    j_dead = next(j for j in range(J - backlog - 1000, 0, -1) if j % 100 == 7)
    recent_trace = hashlib.md5(f"t{T - 300}".encode()).hexdigest()
    wf = hashlib.md5(f"w{info['workflows'] - 100_000 if info['workflows'] > 100_000 else 1}".encode()).hexdigest()
    wf_id = f"{wf[:8]}-{wf[8:12]}-{wf[12:16]}-{wf[16:20]}-{wf[20:]}"
    two_h = (dt.datetime.now(dt.timezone.utc) - dt.timedelta(hours=3)).isoformat(timespec="seconds")
    one_h = (dt.datetime.now(dt.timezone.utc) - dt.timedelta(hours=2)).isoformat(timespec="seconds")
    user = str(4242)
    return [
        ("overview", "overview", None, {}),
        ("functions 60m", "functions", None, {}),
        ("functions 6h", "functions", None, {"since": "6h"}),
        ("jobs live", "jobs", None, {}),
        ("jobs live page 2", "jobs", None, {"__page2": "1"}),
        ("jobs pending", "jobs", None, {"status": "pending"}),
        ("jobs dead", "jobs", None, {"status": "dead"}),
        ("jobs dead name", "jobs", None, {"status": "dead", "name": "settle_payout"}),
        ("jobs live queue", "jobs", None, {"queue": "billing"}),
        ("jobs succeeded", "jobs", None, {"status": "succeeded"}),
        ("jobs succeeded page 2", "jobs", None, {"status": "succeeded", "__page2": "1"}),
        ("jobs succeeded name", "jobs", None, {"status": "succeeded", "name": "audit_login"}),
        ("jobs succeeded node", "jobs", None, {"status": "succeeded", "node": "node-3"}),
        ("jobs cancelled window", "jobs", None, {"status": "cancelled", "since": two_h, "until": one_h}),
        ("jobs args (history)", "jobs", None, {"status": "succeeded", "args": json.dumps({"user_id": int(user)})}),
        ("jobs args (live)", "jobs", None, {"args": json.dumps({"tenant": "t7"})}),
        ("job detail (history)", "jobs", str(j_hist), {}),
        ("job detail (dead)", "jobs", str(j_dead), {}),
        ("queues", "queues", None, {}),
        ("crons", "crons", None, {}),
        ("crons one", "crons", None, {"cron": "cron_7"}),
        ("workflows live", "workflows", None, {}),
        ("workflows all", "workflows", None, {"status": "all"}),
        ("workflows failed", "workflows", None, {"status": "failed"}),
        ("workflows blocked", "workflows", None, {"status": "blocked"}),
        ("workflows name", "workflows", None, {"status": "all", "name": "flow_audit_login"}),
        ("workflow detail", "workflows", wf_id, {}),
        ("realtime", "realtime", None, {}),
        ("logs 15m", "logs", None, {}),
        ("logs errors 1h", "logs", None, {"level": "ERROR", "since": "1h"}),
        ("logs text 15m", "logs", None, {"text": "ord-99"}),
        ("logs node 1h", "logs", None, {"node": "node-3", "since": "1h"}),
        ("logs 7d", "logs", None, {"since": "7d"}),
        ("logs trace", "logs", None, {"trace": recent_trace, "since": "1d"}),
        ("logs job", "logs", None, {"job": str(j_hist), "since": "2d"}),
        ("traces 15m", "traces", None, {}),
        ("traces errors 1h", "traces", None, {"errors": "1", "since": "1h"}),
        ("traces name 6h", "traces", None, {"name": "checkout", "since": "6h"}),
        ("traces 1d", "traces", None, {"since": "1d"}),
        ("trace waterfall", "traces", recent_trace, {}),
        ("nodes", "nodes", None, {}),
        ("alerts", "alerts", None, {}),
        ("audit", "audit", None, {}),
        ("audit who", "audit", None, {"who": "ops-2"}),
    ]


def build(page: str, item: str | None, params: dict[str, str]) -> views.Query:
    class Config(dict):  # what views read of a node's config: [node] dead_after, [observe] flush_interval
        node = types.SimpleNamespace(dead_after=15.0)

    node = types.SimpleNamespace(config=Config(observe=ObserveConfig()), registry=None, id="bench")
    have = frozenset(["forge_jobs", "forge_cron_state", "forge_workflow_runs", "forge_obs_metrics", "forge_leaders"])
    ctx = views.Ctx(node, DashboardConfig(), have)
    _, builder, _ = views.PAGES[page]
    if item is None:
        return builder(ctx, params)
    return views.DETAILS[page](ctx, params, int(item) if page == "jobs" else item)


async def measure(url: str, base: str, info: dict[str, Any], rounds: int, explain_ms: float) -> list[dict[str, Any]]:
    conn = await asyncpg.connect(url, server_settings={"statement_timeout": "2000", "jit": "off"})
    await dlive._codecs(conn)
    out = []
    async with httpx.AsyncClient(base_url=base, headers={"X-API-Key": ADMIN_KEY}, timeout=30) as http:
        for label, page, item, params in cases(info):
            params = dict(params)
            if params.pop("__page2", None):  # the cursor page 1 offers
                first = (await http.get(f"/_forge/api/{page}", params=params)).json()
                if first.get("next_before") is None:
                    print(f"{label}: page 1 offers no next page, skipped")
                    continue
                params["before"] = str(first["next_before"])
            path = f"/_forge/api/{page}" + (f"/{item}" if item else "")
            query = build(page, item, params)
            load_before = load()
            http_ms, sql_ms, status, err = [], [], None, None
            for i in range(rounds + 1):  # the first of each is a warm-up, not counted
                t0 = time.perf_counter()
                r = await http.get(path, params=params)
                t1 = time.perf_counter()
                status = r.status_code
                if status != 200:
                    err = r.text[:300]
                try:
                    await conn.fetchval(query.sql, *query.args)
                except asyncpg.QueryCanceledError:
                    err = (err or "") + " [SQL cancelled by the 2 s statement timeout]"
                t2 = time.perf_counter()
                if i:
                    http_ms.append((t1 - t0) * 1000)
                    sql_ms.append((t2 - t1) * 1000)
            row = {"case": label, "status": status, "http_p50": pct(http_ms, .5), "http_p95": pct(http_ms, .95),
                   "sql_p50": pct(sql_ms, .5), "sql_p95": pct(sql_ms, .95), "load": f"{load_before} .. {load()}",
                   "error": err}
            print(f"{label:28s} {status} HTTP p50 {row['http_p50']:7.1f} p95 {row['http_p95']:7.1f} ms | SQL p50 "
                  f"{row['sql_p50']:7.1f} p95 {row['sql_p95']:7.1f} ms | load {row['load']}"
                  + (f" | {err}" if err else ""), flush=True)
            if row["sql_p95"] > explain_ms:
                try:
                    plan = await conn.fetch("EXPLAIN (ANALYZE, BUFFERS) " + query.sql, *query.args)
                    row["explain"] = "\n".join(r[0] for r in plan)
                except asyncpg.QueryCanceledError:
                    plan = await conn.fetch("EXPLAIN " + query.sql, *query.args)
                    row["explain"] = "(timed out under EXPLAIN ANALYZE; plan only)\n" + "\n".join(r[0] for r in plan)
                print(row["explain"], flush=True)
            out.append(row)
        # live ticks (the hub's single statement per node and second): five tabs on the usual
        # pages, then every live case above watched at once
        every = [(label, build(page, item, dict(params))) for label, page, item, params in cases(info)
                 if not params.get("__page2")]
        usual = {"overview", "jobs live", "queues", "logs 15m", "traces 15m"}
        for name, views_ in (("live tick, 5 usual tabs", [q for label, q in every if label in usual]),
                             ("live tick, every view", [q for _, q in every if q.live])):
            sql, args = dq.compose([(q.sql, q.args) for q in views_])
            ticks = []
            for i in range(rounds + 1):
                t0 = time.perf_counter()
                try:
                    await conn.fetchrow(sql, *args)
                except asyncpg.QueryCanceledError:
                    ticks.append(2000.0)
                    continue
                if i:
                    ticks.append((time.perf_counter() - t0) * 1000)
            row = {"case": f"{name} ({len(views_)})", "status": 200, "http_p50": None, "http_p95": None,
                   "sql_p50": pct(ticks, .5), "sql_p95": pct(ticks, .95), "load": load(), "error": None}
            print(f"{row['case']:28s} SQL p50 {row['sql_p50']:7.1f} p95 {row['sql_p95']:7.1f} ms | load {row['load']}")
            out.append(row)
        # 7 days of logs searched for text no line has: no index narrows it; the page answers within
        # [dashboard] search_budget with how far back it got (bench/dashboard/logsearch.py continues it)
        t0 = time.perf_counter()
        r = await http.get("/_forge/api/logs", params={"since": "7d", "text": "no line says this"})
        took = time.perf_counter() - t0
        body = r.json()
        print(f"log search, text no line has, 7d: HTTP {r.status_code} after {took:.2f} s: "
              f"searched {json.dumps(body.get('searched'), default=str)}, error {body.get('error')}")
        out.append({"case": "log search (7d, text no line has)", "status": r.status_code, "took_s": took,
                    "searched": body.get("searched"), "error": body.get("error")})
    await conn.close()
    return out


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scale", type=float, default=1.0, help="fraction of the full sizes (10M jobs, 50M spans...)")
    ap.add_argument("--span-budget", type=float, default=900.0, help="seconds the span seeding may take")
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--explain-ms", type=float, default=100.0)
    ap.add_argument("--pg-root", help="the embedded server's folder (kept with --keep; reused when it exists)")
    ap.add_argument("--keep", action="store_true", help="keep the database (and the embedded server's folder)")
    ap.add_argument("--reuse", action="store_true", help="measure the kept database without seeding")
    ap.add_argument("--seed-only", action="store_true")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()
    sizes = seedmod.Sizes(jobs=int(10_000_000 * args.scale), traces=int(10_000_000 * args.scale),
                          logs=int(10_000_000 * args.scale), workflows=max(1000, int(500_000 * args.scale)),
                          live_backlog=int(900_000 * args.scale), metric_hours=24)
    pg = None
    root = None
    server = os.environ.get("FORGE_TEST_DATABASE_URL")
    if not server:
        from forge_kernel.embedded_pg import EmbeddedPostgres

        root = Path(args.pg_root) if args.pg_root else Path(tempfile.mkdtemp(prefix="forge-bench-dash-"))
        root.mkdir(parents=True, exist_ok=True)
        root.chmod(0o711)  # the server runs as its own account and must pass through
        pg = EmbeddedPostgres(root / "pg", settings=PG_SETTINGS)
        server = pg.start()
    url = with_database(server, DB_NAME)
    node = None
    results: dict[str, Any] = {"machine": f"{os.cpu_count()} CPUs", "started": time.strftime("%Y-%m-%d %H:%M")}
    try:
        admin = await asyncpg.connect(server)
        exists = await admin.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", DB_NAME)
        if exists and not args.reuse:
            await admin.execute(f'DROP DATABASE "{DB_NAME}" WITH (FORCE)')
        if not exists or not args.reuse:
            await admin.execute(f'CREATE DATABASE "{DB_NAME}"')
        results["pg"] = {k: await admin.fetchval(f"SHOW {k}") for k in
                         ("server_version", "shared_buffers", "work_mem", "fsync", "max_parallel_workers_per_gather")}
        await admin.close()
        if not args.reuse:
            t0 = time.monotonic()
            seedmod.say(f"migrations applied: {await seedmod.migrate(url)}; load {load()}")
            info = await seedmod.seed(url, sizes, args.span_budget)
            results["seed_seconds"] = time.monotonic() - t0
            seedmod.say(f"seeded in {results['seed_seconds']:.0f} s; load {load()}")
        info = await seedmod.top_up(url)
        results["sizes"] = [{"table": t, "rows": n, "bytes": b} for t, n, b in await seedmod.sizes_report(url)]
        for r in results["sizes"]:
            print(f"  {r['table']:26s} {r['rows']:>14,} rows {r['bytes'] / 2**30:8.2f} GiB")
        if args.seed_only:
            return
        cfg = {"database": {"url": url}, "node": {"roles": ["gateway"], "id": "bench-dash"},
               "app": {"example": False},
               "gateway": {"port": free_port(), "host": "127.0.0.1",
                           "api_keys": [{"name": "bench", "sha256": hashlib.sha256(ADMIN_KEY.encode()).hexdigest(),
                                         "roles": ["forge-admin"]}]},
               "dashboard": {"admin_roles": ["forge-admin"]}, "log": {"level": "WARNING"}}
        workdir = Path(tempfile.mkdtemp(prefix="forge-bench-dash-node-"))
        node = NodeProcess(workdir, cfg).start().wait_ready(120)
        base = f"http://127.0.0.1:{node.ready_info()['ports']['http']}"
        info = await seedmod.top_up(url)  # again, just before measuring
        results["load_before"] = load()
        results["cases"] = await measure(url, base, info, args.rounds, args.explain_ms)
        results["load_after"] = load()
    finally:
        if node is not None:
            node.terminate()
        if not args.keep:
            admin = await asyncpg.connect(server)
            await admin.execute(f'DROP DATABASE IF EXISTS "{DB_NAME}" WITH (FORCE)')
            await admin.close()
        if pg is not None:
            pg.release(wait=30)
            if not args.keep and root is not None:
                shutil.rmtree(root, ignore_errors=True)
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=1, default=str))


if __name__ == "__main__":
    asyncio.run(main())
