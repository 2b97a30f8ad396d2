"""Chaos: three scheduler nodes and a worker node as real processes, a cron every second for
60 seconds, the leader SIGKILLed twice. No slot runs twice; no slot is missed beyond the
catch-up bound. Prints slots expected, run, duplicated, missed and each failover time.

About 70 s. The window closes at ``end`` (database clock); the leader decides each slot a
moment after it falls due, so the counts are taken only once ``decided_until`` has passed
``end`` - counting at once is what made one CI run on 2026-12-01 report the window's last slot
(10:53:00) as missed, 60 of 61, while its decision was still in flight.
"""

import asyncio
import datetime as dt
import math
import time

import asyncpg
import pytest
from forge_kernel.testing import eventually as _eventually
from sched_chaos_app import CATCH_UP, GRACE


def eventually(check, timeout, what, interval=0.01):
    # polled every 10 ms: the failover times these tests print come from it
    return _eventually(check, timeout, what, interval)


pytest.importorskip("forge_worker", reason="forge-worker is not installed")

DURATION = 60.0
KILL_AT = (20.0, 40.0)
ENV = {"FORGE_DISABLE_PLUGIN_AUTOLOAD": "1", "FORGE_PLUGINS": "forge_scheduler.hooks,forge_worker.hooks",
       "FORGE_LOG__LEVEL": "INFO"}


def config(roles):
    return {"node": {"roles": roles, "heartbeat_interval": 0.5},
            "app": {"modules": ["sched_chaos_app"], "example": False},
            "worker": {"poll_interval": 0.2}}


@pytest.mark.timeout(240)
async def test_chaos_two_leader_kills_in_sixty_seconds(forge_processes):
    schedulers = {nid: forge_processes(config(["scheduler"]), node_id=nid, env=ENV) for nid in ("s1", "s2", "s3")}
    forge_processes(config(["worker"]), node_id="w1", env=ENV)
    conn = await asyncpg.connect(forge_processes.db_url)
    try:
        async def leader():
            r = await conn.fetchrow("SELECT node_id, term FROM forge_leaders WHERE name = 'scheduler'")
            return r if r is not None and r["node_id"] is not None else None

        current = await eventually(leader, 30, "a leader")
        begin = await eventually(lambda: conn.fetchval("SELECT registered_at FROM forge_cron_state WHERE cron = 'chaos_tick'"),
                            30, "the cron's state")
        t0 = time.monotonic()
        failovers: list[float] = []
        kills: list[tuple[str, int, dt.datetime]] = []
        for at in KILL_AT:
            await asyncio.sleep(max(0.0, t0 + at - time.monotonic()))
            killed_at = time.monotonic()
            schedulers[current["node_id"]].kill()
            kills.append((current["node_id"], current["term"], await conn.fetchval("SELECT clock_timestamp()")))

            async def successor():
                r = await leader()
                return r if r is not None and r["term"] > current["term"] else None

            current = await eventually(successor, 30, "a new leader")
            failovers.append(time.monotonic() - killed_at)
        await asyncio.sleep(max(0.0, t0 + DURATION - time.monotonic()))
        closing = await conn.fetchrow("SELECT clock_timestamp() AS end, decided_until FROM forge_cron_state "
                                      "WHERE cron = 'chaos_tick'")
        end = closing["end"]
        # slots up to ``end`` whose decision was still in flight when the window closed
        in_flight = await conn.fetchval(
            "SELECT count(*) FROM generate_series(date_trunc('second', $1::timestamptz) + interval '1 second', $2, "
            "interval '1 second') AS s WHERE s > $1", closing["decided_until"], end)

        async def decided():
            return await conn.fetchval("SELECT decided_until >= $1 FROM forge_cron_state WHERE cron = 'chaos_tick'", end)

        await eventually(decided, 30, "the leader to decide every slot up to the end of the window")

        # let every decided slot up to the end finish on the worker
        async def settled():
            return await conn.fetchval(
                "SELECT count(*) = 0 FROM forge_cron_runs WHERE cron = 'chaos_tick' AND slot <= $1 "
                "AND status IN ('queued', 'retrying')", end)

        await eventually(settled, 30, "queued runs to finish", interval=0.2)
        # the first slot is the first whole second after the cluster registered the cron
        first = begin.replace(microsecond=0) + dt.timedelta(seconds=1)
        expected = []
        s = first
        while s <= end:
            expected.append(s)
            s += dt.timedelta(seconds=1)
        runs = await conn.fetch("SELECT slot, status, attempts FROM forge_cron_runs WHERE cron = 'chaos_tick' "
                                "AND kind = 'scheduled' AND slot <= $1", end)
        run_slots = [r["slot"] for r in runs]
        executions = await conn.fetch("SELECT slot, count(*) AS n FROM chaos_executions GROUP BY slot")
        executed = {r["slot"]: r["n"] for r in executions}
        dropped = await conn.fetchval("SELECT dropped_total FROM forge_cron_state WHERE cron = 'chaos_tick'")
        duplicated_runs = len(run_slots) - len(set(run_slots))
        duplicated_execs = sum(1 for n in executed.values() if n > 1)
        missed = sorted(set(expected) - set(run_slots))
        not_executed = [s for s in run_slots if executed.get(s.isoformat(), 0) == 0]
        lags = sorted(await conn.fetch(
            "SELECT extract(epoch FROM enqueued_at - slot) * 1000 AS ms FROM forge_cron_runs "
            "WHERE cron = 'chaos_tick' AND kind = 'scheduled' AND slot <= $1", end), key=lambda r: r["ms"])
        lag_ms = [float(r["ms"]) for r in lags]
        on_time = [ms for ms in lag_ms if ms < 1000.0 * GRACE]  # the catch-up after each failover is late by design
        print(f"\nchaos: slots expected {len(expected)}, run {len(set(run_slots))}, executed "
              f"{sum(1 for s in run_slots if executed.get(s.isoformat()))}, duplicated runs {duplicated_runs}, "
              f"duplicated executions {duplicated_execs}, missed {len(missed)}, dropped by catch-up {dropped}, "
              f"failovers {', '.join(f'{f:.3f}s' for f in failovers)}; slot->enqueue lag of on-time slots "
              f"p50 {on_time[len(on_time) // 2]:.1f} ms, max {on_time[-1]:.1f} ms; max lag {lag_ms[-1]:.0f} ms; "
              f"slots still being decided when the window closed {in_flight}")

        assert duplicated_runs == 0 and duplicated_execs == 0
        assert all(r["status"] == "succeeded" for r in runs), {r["status"] for r in runs}
        assert not_executed == []
        # an outage of f seconds misses about f + 1 slots; on-time (grace) and catch-up cover the rest
        bound = sum(max(0, math.ceil(f) + 1 - GRACE - CATCH_UP) for f in failovers)
        assert len(missed) <= bound, await explain(conn, missed, kills, failovers, end, schedulers)
        # whatever was not run was dropped by policy, and counted
        assert len(missed) == dropped, await explain(conn, missed, kills, failovers, end, schedulers)
        assert all(f <= 3.0 for f in failovers), failovers
    finally:
        await conn.close()


async def explain(conn, missed, kills, failovers, end, schedulers) -> str:
    """What a failure needs to be understood without a re-run: each missed slot with the runs
    around it (who decided them, when), the kills on the database clock, the cron's state and
    what the scheduler nodes logged about crons and leadership."""
    lines = [f"missed {[m.isoformat() for m in missed]}; window end {end.isoformat()}; failovers {failovers}",
             "kills: " + "; ".join(f"{n} (term {t}) at {at.isoformat()}" for n, t, at in kills)]
    state = await conn.fetchrow("SELECT decided_until, dropped_total, last_dropped FROM forge_cron_state "
                                "WHERE cron = 'chaos_tick'")
    lines.append(f"state: {dict(state)}")
    for m in missed[:5]:
        near = await conn.fetch(
            "SELECT slot, leader, leader_term, enqueued_at, status FROM forge_cron_runs WHERE cron = 'chaos_tick' "
            "AND kind = 'scheduled' AND slot BETWEEN $1::timestamptz - interval '3 seconds' AND $1::timestamptz + interval '3 seconds' "
            "ORDER BY slot", m)
        lines.append(f"around {m.isoformat()}: " + "; ".join(
            f"{r['slot'].time()} by {r['leader']}/{r['leader_term']} at {r['enqueued_at'].time()} {r['status']}"
            for r in near))
    for nid, proc in schedulers.items():
        wanted = [ln for ln in proc.log().splitlines() if "cron" in ln or "lead" in ln]
        lines.append(f"--- {nid} ---\n" + "\n".join(wanted[-15:]))
    return "\n".join(lines)
