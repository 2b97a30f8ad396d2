"""Scheduler benchmark: FORGE's leader-elected crons vs Procrastinate's periodic deferrer,
in the same run, on the same PostgreSQL.

Each side runs three scheduling processes and a cron every second for ``--duration`` seconds;
two of the three processes are SIGKILLed during the run (for FORGE: the current leader each
time; Procrastinate has no leader - every worker defers - so two of its workers). Measured:

* slots expected / enqueued / duplicated / missed,
* enqueue lag = when the job row was stored minus the slot instant (median, p95, max),
* the longest gap between consecutive enqueues (what a crash costs),
* FORGE's takeover time after each SIGKILL (and over ``--takeovers`` extra rounds),
* committed transactions per second in each side's database (all its processes together).

PostgreSQL: an embedded server started here with stock settings (only port, socket dir and
max_connections=300 are set); the script prints the relevant settings. Usage:

    .venv/bin/python bench/scheduler/bench_scheduler.py [--duration 45]
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import asyncpg

from forge_kernel.embedded_pg import EmbeddedPostgres
from forge_kernel.testing.procs import NodeProcess

HERE = Path(__file__).resolve().parent
SECOND = dt.timedelta(seconds=1)
SETTINGS = ("server_version", "fsync", "synchronous_commit", "full_page_writes", "shared_buffers", "max_connections",
            "wal_level", "checkpoint_timeout")


def with_db(url: str, name: str) -> str:
    from forge_kernel.db import with_database

    return with_database(url, name)


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, int(round(q * (len(s) - 1))))]


def expected_slots(first_after: dt.datetime, end: dt.datetime) -> list[dt.datetime]:
    out, s = [], first_after.replace(microsecond=0) + SECOND
    while s <= end:
        out.append(s)
        s += SECOND
    return out


def summary(name: str, expected: list[dt.datetime], stored: list[tuple[dt.datetime, dt.datetime]],
            duplicated: int, tps: float, extra: str = "") -> dict:
    slots = {s for s, _ in stored}
    lags = [(at - s).total_seconds() * 1000 for s, at in stored]
    times = sorted(at for _, at in stored)
    gaps = [(b - a).total_seconds() for a, b in zip(times, times[1:])]
    res = {"name": name, "expected": len(expected), "enqueued": len(slots), "duplicated": duplicated,
           "missed": len(set(expected) - slots), "lag_p50_ms": pct(lags, 0.5), "lag_p95_ms": pct(lags, 0.95),
           "lag_max_ms": max(lags) if lags else float("nan"), "max_gap_s": max(gaps) if gaps else float("nan"),
           "tps": tps}
    print(f"{name:>13}: slots expected {res['expected']}, enqueued {res['enqueued']}, duplicated {duplicated}, "
          f"missed {res['missed']}; enqueue lag p50 {res['lag_p50_ms']:.1f} ms, p95 {res['lag_p95_ms']:.1f} ms, "
          f"max {res['lag_max_ms']:.1f} ms; longest enqueue gap {res['max_gap_s']:.2f} s; "
          f"{tps:.1f} commits/s in its database{extra}")
    return res


async def xacts(conn: asyncpg.Connection, db: str) -> int:
    await conn.execute("SELECT pg_stat_clear_snapshot()")
    return await conn.fetchval("SELECT xact_commit FROM pg_stat_database WHERE datname = $1", db)


async def until(fn, timeout: float, what: str, interval: float = 0.01):
    deadline = time.monotonic() + timeout
    while True:
        v = await fn()
        if v:
            return v
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(interval)


# --- FORGE --------------------------------------------------------------------------------
async def run_forge(url: str, admin: asyncpg.Connection, work: Path, duration: float, kills: list[float]) -> dict:
    db_url = with_db(url, "forge_bench")
    env = {"FORGE_DISABLE_PLUGIN_AUTOLOAD": "1", "FORGE_PLUGINS": "forge_scheduler.hooks,forge_worker.hooks",
           "FORGE_LOG__LEVEL": "INFO", "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")])}
    procs: dict[str, NodeProcess] = {}

    def spawn(nid: str, roles: list[str]) -> NodeProcess:
        cfg = {"database": {"url": db_url}, "node": {"id": nid, "roles": roles},
               "app": {"modules": ["bench_app"], "example": False}}
        p = NodeProcess(work / nid, cfg, env=env)
        procs[nid] = p
        return p.start()

    # the first node migrates alone, the others join once it is ready
    spawn("s1", ["scheduler"]).wait_ready()
    for nid, roles in (("s2", ["scheduler"]), ("s3", ["scheduler"]), ("w1", ["worker"])):
        spawn(nid, roles)
    for p in procs.values():
        p.wait_ready()
    conn = await asyncpg.connect(db_url)
    try:
        async def leader():
            r = await conn.fetchrow("SELECT node_id, term FROM forge_leaders WHERE name = 'scheduler'")
            return r if r is not None and r["node_id"] is not None else None

        current = await until(leader, 30, "a leader")
        registered = await until(lambda: conn.fetchval(
            "SELECT registered_at FROM forge_cron_state WHERE cron = 'bench_tick'"), 30, "cron state")
        x0, t0 = await xacts(admin, "forge_bench"), time.monotonic()
        takeovers = []
        for at in kills:
            await asyncio.sleep(max(0.0, t0 + at - time.monotonic()))
            k = time.monotonic()
            procs[current["node_id"]].kill()
            prev = current

            async def successor():
                r = await leader()
                return r if r is not None and r["term"] > prev["term"] else None

            current = await until(successor, 30, "a new leader")
            takeovers.append(time.monotonic() - k)
        await asyncio.sleep(max(0.0, t0 + duration - time.monotonic()))
        # slots of the last second may still be in flight (Procrastinate oversleeps by 0.5 s on purpose)
        end = await conn.fetchval("SELECT clock_timestamp()") - SECOND
        tps = (await xacts(admin, "forge_bench") - x0) / (time.monotonic() - t0)
        rows = await conn.fetch("SELECT slot, enqueued_at FROM forge_cron_runs WHERE cron = 'bench_tick' "
                                "AND kind = 'scheduled' AND slot <= $1", end)
        dup = await conn.fetchval("SELECT count(*) - count(DISTINCT slot) FROM forge_cron_runs "
                                  "WHERE cron = 'bench_tick' AND kind = 'scheduled'")
        stored = [(r["slot"], r["enqueued_at"]) for r in rows]
        res = summary("FORGE", expected_slots(registered, end), stored, dup, tps,
                      f"; takeover after SIGKILL {', '.join(f'{t:.3f} s' for t in takeovers)}")
        res["takeovers"] = takeovers
        return res
    finally:
        await conn.close()
        for p in procs.values():
            p.terminate(timeout=20)


async def run_takeovers(url: str, work: Path, rounds: int) -> list[float]:
    """SIGKILL the leader ``rounds`` times among three scheduler nodes (the killed node is
    started again each time, so three campaign); returns each takeover time."""
    db_url = with_db(url, "forge_takeover")
    env = {"FORGE_DISABLE_PLUGIN_AUTOLOAD": "1", "FORGE_PLUGINS": "forge_scheduler.hooks,forge_worker.hooks",
           "FORGE_LOG__LEVEL": "INFO", "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")])}
    procs: dict[str, NodeProcess] = {}

    def spawn(nid: str) -> NodeProcess:
        cfg = {"database": {"url": db_url}, "node": {"id": nid, "roles": ["scheduler"]},
               "app": {"modules": ["bench_app"], "example": False}}
        p = NodeProcess(work / f"takeover-{nid}", cfg, env=env)
        procs[nid] = p
        return p.start()

    spawn("t1").wait_ready()
    for nid in ("t2", "t3"):
        spawn(nid).wait_ready()
    conn = await asyncpg.connect(db_url)
    times: list[float] = []
    try:
        async def leader():
            r = await conn.fetchrow("SELECT node_id, term FROM forge_leaders WHERE name = 'scheduler'")
            return r if r is not None and r["node_id"] is not None else None

        await until(leader, 30, "a leader")
        # what the scheduler itself costs: 3 nodes (heartbeats, election, renewals, one cron per
        # second enqueued into forge-worker's table), no worker running
        x0, t0 = await xacts(conn, "forge_takeover"), time.monotonic()
        await asyncio.sleep(10)
        idle_tps = (await xacts(conn, "forge_takeover") - x0) / (time.monotonic() - t0)
        print(f"FORGE scheduler alone (3 nodes, 1 cron/s, no worker): {idle_tps:.1f} commits/s")
        for _ in range(rounds):
            current = await until(leader, 30, "a leader")
            await asyncio.sleep(1.0)
            k = time.monotonic()
            procs[current["node_id"]].kill()

            async def successor():
                r = await leader()
                return r if r is not None and r["term"] > current["term"] else None

            await until(successor, 30, "a new leader")
            times.append(time.monotonic() - k)
            await asyncio.to_thread(lambda: spawn(current["node_id"]).wait_ready())
    finally:
        await conn.close()
        for p in procs.values():
            p.terminate(timeout=20)
    print(f"FORGE takeover after SIGKILL of the leader, {rounds} rounds (3 nodes, election_interval 0.5 s): "
          f"min {min(times):.3f} s, p50 {pct(times, 0.5):.3f} s, p95 {pct(times, 0.95):.3f} s, max {max(times):.3f} s")
    return times


# --- Procrastinate ------------------------------------------------------------------------
async def run_procrastinate(url: str, admin: asyncpg.Connection, work: Path, duration: float,
                            kills: list[float]) -> dict:
    db_url = with_db(url, "procr_bench")
    os.environ["PROCR_CONNINFO"] = db_url
    sys.path.insert(0, str(HERE))
    from procr_app import app  # the workers' own app, so the schema matches what they run

    async with app.open_async():
        await app.schema_manager.apply_schema_async()
    env = {**os.environ, "PROCR_CONNINFO": db_url}
    procs = []
    for i in range(3):
        log = open(work / f"procr-{i}.log", "wb")
        procs.append(subprocess.Popen([sys.executable, str(HERE / "procr_app.py")], env=env, stdout=log,
                                      stderr=subprocess.STDOUT, start_new_session=True))
    conn = await asyncpg.connect(db_url)
    try:
        await until(lambda: conn.fetchval("SELECT count(*) > 0 FROM procrastinate_jobs"), 60, "the first periodic job")
        first = await conn.fetchval("SELECT to_timestamp(min((args->>'timestamp')::bigint)) FROM procrastinate_jobs")
        x0, t0 = await xacts(admin, "procr_bench"), time.monotonic()
        for i, at in enumerate(kills):
            await asyncio.sleep(max(0.0, t0 + at - time.monotonic()))
            os.kill(procs[i].pid, signal.SIGKILL)
            procs[i].wait(10)
        await asyncio.sleep(max(0.0, t0 + duration - time.monotonic()))
        # slots of the last second may still be in flight (Procrastinate oversleeps by 0.5 s on purpose)
        end = await conn.fetchval("SELECT clock_timestamp()") - SECOND
        tps = (await xacts(admin, "procr_bench") - x0) / (time.monotonic() - t0)
        rows = await conn.fetch(
            # procrastinate_periodic_defers keeps only recent rows; the jobs carry the slot as an argument
            """SELECT to_timestamp((j.args->>'timestamp')::bigint) AS slot, min(e.at) AS at
               FROM procrastinate_jobs j
               JOIN procrastinate_events e ON e.job_id = j.id AND e.type = 'deferred'
               WHERE j.task_name = 'bench_tick' AND to_timestamp((j.args->>'timestamp')::bigint) <= $1
               GROUP BY 1""", end)
        dup = await conn.fetchval(
            """SELECT coalesce(sum(n - 1), 0) FROM (SELECT count(*) AS n FROM procrastinate_jobs
               WHERE task_name = 'bench_tick' GROUP BY args->>'timestamp') per_slot""")
        # the first slot it deferred marks its start (it has no registration time)
        return summary("Procrastinate", expected_slots(first - SECOND, end),
                       [(r["slot"], r["at"]) for r in rows], int(dup), tps)
    finally:
        await conn.close()
        for p in procs:
            if p.poll() is None:
                os.kill(p.pid, signal.SIGTERM)
                try:
                    p.wait(15)
                except subprocess.TimeoutExpired:
                    os.kill(p.pid, signal.SIGKILL)
                    p.wait(5)


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--duration", type=float, default=45.0, help="seconds each side runs")
    ap.add_argument("--takeovers", type=int, default=10, help="leader SIGKILL rounds of the takeover phase")
    args = ap.parse_args()
    kills = [args.duration / 3, 2 * args.duration / 3]
    with tempfile.TemporaryDirectory(prefix="forge-bench-sched-") as tmp:
        work = Path(tmp)
        work.chmod(0o711)  # as root the server runs as forge_pg, which must pass through to work/pg
        pg = EmbeddedPostgres(work / "pg")
        url = pg.start()
        try:
            admin = await asyncpg.connect(url)
            try:
                shown = {s: await admin.fetchval(f"SHOW {s}") for s in SETTINGS}
                print("PostgreSQL (embedded, stock settings): " + ", ".join(f"{k}={v}" for k, v in shown.items()))
                print(f"machine: {os.cpu_count()} cores; each side: 3 scheduling processes, cron every second, "
                      f"{args.duration:.0f} s, SIGKILL at {', '.join(f'{k:.0f} s' for k in kills)}")
                for db in ("forge_bench", "procr_bench", "forge_takeover"):
                    await admin.execute(f'CREATE DATABASE "{db}"')
                if args.takeovers:
                    await run_takeovers(url, work, args.takeovers)
                forge = await run_forge(url, admin, work, args.duration, kills)
                peer = await run_procrastinate(url, admin, work, args.duration, kills)
                print("ratios (Procrastinate / FORGE): "
                      f"lag p50 {peer['lag_p50_ms'] / forge['lag_p50_ms']:.2f}x, "
                      f"lag p95 {peer['lag_p95_ms'] / forge['lag_p95_ms']:.2f}x, "
                      f"longest gap {peer['max_gap_s'] / forge['max_gap_s']:.2f}x, "
                      f"commits/s {peer['tps'] / forge['tps']:.2f}x")
            finally:
                await admin.close()
        finally:
            pg.release()


if __name__ == "__main__":
    asyncio.run(main())
