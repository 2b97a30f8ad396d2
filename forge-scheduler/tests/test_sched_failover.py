"""Real forge-node processes: the leader is SIGKILLed, another takes over within 3 s, and the
every-second cron keeps every slot exactly once (the test job store records the jobs)."""

import asyncio
import time

import asyncpg
from forge_kernel.testing import eventually as _eventually
from sched_helpers import ISOLATED


def eventually(check, timeout, what, interval=0.01):
    # polled every 10 ms: the failover times these tests print come from it
    return _eventually(check, timeout, what, interval)


TAKEOVER_LIMIT = 3.0
PROC_ENV = {**ISOLATED, "FORGE_LOG__LEVEL": "INFO"}


def config(roles=("scheduler",)):
    return {"node": {"roles": list(roles), "heartbeat_interval": 0.5},
            "app": {"modules": ["sched_app"], "example": False}}


async def leader_row(conn):
    return await conn.fetchrow("SELECT node_id, term, since FROM forge_leaders WHERE name = 'scheduler'")


async def test_leader_sigkill_takeover_and_no_duplicate_slot(forge_processes):
    procs = {nid: forge_processes(config(), node_id=nid, env=PROC_ENV) for nid in ("s1", "s2", "s3")}
    conn = await asyncpg.connect(forge_processes.db_url)
    try:
        first = await eventually(lambda: _leader(conn), 20, "a first leader")
        takeovers = []
        current = first
        for _ in range(2):
            await eventually(lambda: conn.fetchval("SELECT count(*) >= 3 FROM forge_cron_runs WHERE leader = $1",
                                                   current["node_id"]), 20, "the leader to enqueue slots")
            t0 = time.monotonic()
            procs[current["node_id"]].kill()  # SIGKILL: no clean-up of any kind

            async def successor():
                row = await _leader(conn)
                return row if row and row["term"] > current["term"] else None

            nxt = await eventually(successor, 15, "a new leader")
            takeovers.append(time.monotonic() - t0)
            assert nxt["node_id"] != current["node_id"] and procs[nxt["node_id"]].alive()
            current = nxt
        await eventually(lambda: conn.fetchval("SELECT count(*) >= 3 FROM forge_cron_runs WHERE leader = $1",
                                               current["node_id"]), 20, "the last leader to enqueue slots")
        print(f"\ntakeover after SIGKILL: {', '.join(f'{t:.3f}s' for t in takeovers)}")
        assert all(t <= TAKEOVER_LIMIT for t in takeovers), takeovers

        runs = await conn.fetch("SELECT slot, job_id FROM forge_cron_runs WHERE cron = 'every_second' ORDER BY slot")
        slots = [r["slot"] for r in runs]
        jobs = await conn.fetchval("SELECT count(*) FROM sched_fake_jobs WHERE name = 'every_second'")
        assert len(set(slots)) == len(slots) == jobs  # one job per slot, never two
        gaps = [(a, b) for a, b in zip(slots, slots[1:]) if (b - a).total_seconds() != 1]
        # failovers are shorter than the catch-up bound (3 slots), so no slot was dropped
        assert gaps == [], gaps
        assert await conn.fetchval("SELECT sum(dropped_total) FROM forge_cron_state") == 0
    finally:
        await conn.close()


async def _leader(conn):
    row = await leader_row(conn)
    return row if row is not None and row["node_id"] is not None else None


async def test_frozen_leader_is_deposed_after_its_lease(forge_processes):
    """SIGSTOP keeps the leader's socket open (the OS still answers keepalives), so only the lease
    can end its leadership: a follower ends the frozen session and takes over. Thawed, the old
    leader finds its leadership gone and enqueues nothing more."""
    import os
    import signal

    lease = 2.0
    cfg = config()
    cfg["scheduler"] = {"leader_lease": lease}
    procs = {nid: forge_processes(cfg, node_id=nid, env=PROC_ENV) for nid in ("f1", "f2")}
    conn = await asyncpg.connect(forge_processes.db_url)
    frozen = None
    try:
        first = await eventually(lambda: _leader(conn), 20, "a first leader")
        await eventually(lambda: conn.fetchval("SELECT count(*) >= 2 FROM forge_cron_runs WHERE leader = $1",
                                               first["node_id"]), 20, "the leader to enqueue slots")
        frozen = procs[first["node_id"]]
        t0 = time.monotonic()
        os.kill(frozen.pid, signal.SIGSTOP)

        async def successor():
            row = await _leader(conn)
            return row if row and row["term"] > first["term"] else None

        nxt = await eventually(successor, 30, "a successor")
        took = time.monotonic() - t0
        print(f"\ntakeover from a frozen leader (leader_lease {lease:g}s): {took:.3f}s")
        assert nxt["node_id"] != first["node_id"]
        assert took < lease + 5  # the lease, plus renew and election intervals
        os.kill(frozen.pid, signal.SIGCONT)
        frozen = None
        await asyncio.sleep(2.5)
        row = await _leader(conn)
        assert row["node_id"] == nxt["node_id"] and row["term"] == nxt["term"]  # the thawed node did not come back
        t_thaw = await conn.fetchval("SELECT clock_timestamp()")
        await asyncio.sleep(1.5)
        late = await conn.fetchval("SELECT count(*) FROM forge_cron_runs WHERE leader = $1 AND enqueued_at > $2",
                                   first["node_id"], t_thaw)
        assert late == 0
        # per cron: at 09:00 Berlin on a weekday `morning` and `every_second` share a slot time
        dup = await conn.fetchval("SELECT count(*) - count(DISTINCT (cron, slot)) FROM forge_cron_runs WHERE kind = 'scheduled'")
        assert dup == 0
    finally:
        if frozen is not None:
            os.kill(frozen.pid, signal.SIGCONT)
        await conn.close()
