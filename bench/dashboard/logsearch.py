"""The logs page's search over 7 days, one statement versus a stretch at a time (views.LogSearch).

    .venv/bin/python bench/dashboard/logsearch.py --lines 2000000           # seed, measure, drop
    .venv/bin/python bench/dashboard/logsearch.py --reuse --keep --pg-root /var/tmp/forge-logs

Seeds only ``forge_obs_logs`` (``--lines`` over the last 7 days, the lines of ``seed.LOGS``), then
for each search: the one statement the page used to run over the whole window (under the 2 s
``statement_timeout``: text no line has meets it), and the page as it is now: ``LogSearch`` pages
of ``[dashboard] search_budget`` each, continued until the window is done, with the time of every
statement (the longest must stay far under the timeout). And the live stream's statement (the
newest 2 minutes). Not part of the test suite.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import sys
import tempfile
import time
import types
from pathlib import Path
from typing import Any

import asyncpg

sys.path.insert(0, str(Path(__file__).parent))
import seed as seedmod  # noqa: E402
from run import PG_SETTINGS, load, pct  # noqa: E402

from forge_kernel.db import with_database  # noqa: E402
from forge_observe.config import ObserveConfig  # noqa: E402
from forge_observe.dashboard import live as dlive  # noqa: E402
from forge_observe.dashboard import views  # noqa: E402
from forge_observe.dashboard.config import DashboardConfig  # noqa: E402

DB_NAME = "forge_bench_logsearch"
SEARCHES = [
    ("text no line has, 7d", {"text": "no line says this", "since": "7d"}),
    ("level CRITICAL (none), 7d", {"level": "CRITICAL", "since": "7d"}),
    ("text in 1 line of 2000, 7d", {"text": "payment provider answered 502 for order ord-1", "since": "7d"}),
    ("text in many lines, 7d", {"text": "served user", "since": "7d"}),
    ("node, 1d", {"node": "node-3", "since": "1d"}),
]


class Timed:
    """A pool whose statements are timed (what each of a search's statements took)."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool
        self.times: list[float] = []

    async def fetchval(self, sql: str, *args: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return await self.pool.fetchval(sql, *args)
        finally:
            self.times.append(time.perf_counter() - t0)


def ctx(budget: float) -> views.Ctx:
    class Config(dict):
        node = types.SimpleNamespace(dead_after=15.0)

    node = types.SimpleNamespace(config=Config(observe=ObserveConfig()), registry=None, id="bench")
    return views.Ctx(node, DashboardConfig(search_budget=budget), frozenset())


async def measure(url: str, budget: float) -> None:
    pools = dlive.Pools()  # the dashboard's own: read-only, statement_timeout 2 s, custom plans
    await pools.open(url, 2.0)
    pool = pools.read
    try:
        for label, params in SEARCHES:
            query = views.logs(ctx(budget), params)
            # the old page: one statement over the whole window
            sql, args = query.sql, list(query.args)
            args[7] = views.minutes(params, "since", 15.0) * 60.0  # the whole window, not the live tail
            t0 = time.perf_counter()
            try:
                rows = len((await pool.fetchval(sql, *args))["rows"])
                one = f"{(time.perf_counter() - t0) * 1000:7.0f} ms, {rows} lines"
            except asyncpg.QueryCanceledError:
                one = f"TIMEOUT after {time.perf_counter() - t0:.2f} s"
            # the page now: pages of the budget, continued until the window is done
            timed, pages, p, page_s, found, back = Timed(pool), 0, dict(params), [], 0, None
            while True:
                t0 = time.perf_counter()
                q = views.logs(ctx(budget), p)
                data = q.shape(await q.fetch(timed))
                page_s.append(time.perf_counter() - t0)
                pages += 1
                found += len(data["rows"])
                if pages == 1:
                    back = data["searched"]["back_to"]
                if data["searched"]["complete"] or data["continue_until"] is None or found >= 200 or pages >= 50:
                    break
                p = {**params, "until": data["continue_until"]}
            print(f"{label:30s} one statement: {one} | pages of {budget:g} s: first searched back to "
                  f"{back:%m-%d %H:%M}, {pages} page(s) to {'the end' if data['searched']['complete'] else 'a full page'} "
                  f"({found} lines), page p50 {pct([x * 1000 for x in page_s], .5):.0f} ms max "
                  f"{max(page_s) * 1000:.0f} ms, {len(timed.times)} statements p50 "
                  f"{pct([x * 1000 for x in timed.times], .5):.0f} ms max {max(timed.times) * 1000:.0f} ms | load {load()}",
                  flush=True)
        # the live stream's statement: the newest 2 minutes
        for label, params in SEARCHES[:2]:
            query = views.logs(ctx(budget), params)
            times = []
            for _ in range(11):
                t0 = time.perf_counter()
                await pool.fetchval(query.sql, *query.args)
                times.append((time.perf_counter() - t0) * 1000)
            print(f"live tail (2 min), {label:24s} p50 {pct(times[1:], .5):.1f} ms max {max(times[1:]):.1f} ms "
                  f"| load {load()}")
    finally:
        await pools.close()


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lines", type=int, default=2_000_000)
    ap.add_argument("--budget", type=float, default=DashboardConfig().search_budget)
    ap.add_argument("--pg-root")
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--reuse", action="store_true")
    args = ap.parse_args()
    from forge_kernel.embedded_pg import EmbeddedPostgres

    root = Path(args.pg_root) if args.pg_root else Path(tempfile.mkdtemp(prefix="forge-bench-logs-"))
    root.mkdir(parents=True, exist_ok=True)
    root.chmod(0o711)
    pg = EmbeddedPostgres(root / "pg", settings=PG_SETTINGS)
    server = pg.start()
    url = with_database(server, DB_NAME)
    try:
        admin = await asyncpg.connect(server)
        exists = await admin.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", DB_NAME)
        if not (exists and args.reuse):
            if exists:
                await admin.execute(f'DROP DATABASE "{DB_NAME}" WITH (FORCE)')
            await admin.execute(f'CREATE DATABASE "{DB_NAME}"')
        await admin.close()
        if not (exists and args.reuse):
            t0 = time.monotonic()
            await seedmod.migrate(url)
            conn = await asyncpg.connect(url)
            await conn.execute(seedmod.HELPERS)
            end_at = await conn.fetchval("SELECT now()")
            await conn.execute("SELECT forge_obs_ensure_partitions(ARRAY['forge_obs_logs'], "
                               "(now() - interval '8 days')::date, (now() + interval '2 days')::date)")
            n = args.lines
            await seedmod._chunks(url, seedmod.LOGS, seedmod.ranges(1, n, 500_000), [n, n, end_at, 1000], "logs")
            await conn.execute("VACUUM (ANALYZE) forge_obs_logs")
            await conn.close()
            seedmod.say(f"seeded {n:,} log lines in {time.monotonic() - t0:.0f} s; load {load()}")
        await measure(url, args.budget)
    finally:
        if not args.keep:
            admin = await asyncpg.connect(server)
            await admin.execute(f'DROP DATABASE IF EXISTS "{DB_NAME}" WITH (FORCE)')
            await admin.close()
        pg.release(wait=30)
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    asyncio.run(main())
