"""End to end with the real job store and worker (forge-worker): crons run as jobs, history
gets status, duration and error, a slow cron does not hold up a fast one."""

import datetime as dt

import pytest
from sched_helpers import eventually

from forge_scheduler import Crons, crons_of, scheduler_of

pytest.importorskip("forge_worker", reason="forge-worker is not installed")

WITH_WORKER = {"FORGE_PLUGINS": "forge_scheduler.hooks,forge_worker.hooks"}


async def test_crons_run_on_the_worker_with_history(sched_node):
    node = await sched_node(modules=["sched_worker_app"], env=WITH_WORKER, roles=("scheduler", "worker"),
                            scheduler={"tick_interval": 0.1})
    assert scheduler_of(node) is not None
    crons = Crons(node.pool, crons_of(node.registry).values())
    await crons.trigger("failing", requested_by="test")

    async def enough():
        slow_done = await node.pool.fetchval(
            "SELECT count(*) FROM forge_cron_runs WHERE cron = 'slow_tick' AND status = 'succeeded'")
        failed = await node.pool.fetchval("SELECT count(*) FROM forge_cron_runs WHERE cron = 'failing' AND status = 'failed'")
        return slow_done >= 1 and failed == 1

    await eventually(enough, timeout=30, what="a finished slow run and the failed trigger")

    # every fast slot ran exactly once, as a job, and its history says so
    fast = await node.pool.fetch("SELECT * FROM forge_cron_runs WHERE cron = 'fast_tick' AND status = 'succeeded'")
    assert len(fast) >= 3
    execs = await node.pool.fetch("SELECT slot, count(*) AS n FROM sched_executions WHERE cron = 'fast_tick' GROUP BY slot")
    by_slot = {r["slot"]: r["n"] for r in execs}
    for r in fast:
        assert by_slot.get(r["slot"].isoformat()) == 1
        assert r["attempts"] == 1 and r["duration_ms"] is not None and r["finished_at"] >= r["started_at"]
        assert r["node_id"] == node.id and r["job_id"] is not None

    # the slow cron's run took its 3 s, and fast slots kept running meanwhile
    slow = await node.pool.fetchrow(
        "SELECT * FROM forge_cron_runs WHERE cron = 'slow_tick' AND status = 'succeeded' ORDER BY id LIMIT 1")
    assert slow["duration_ms"] >= 3000
    during = await node.pool.fetchval(
        "SELECT count(*) FROM forge_cron_runs WHERE cron = 'fast_tick' AND status = 'succeeded' "
        "AND started_at > $1 AND started_at < $2", slow["started_at"], slow["finished_at"])
    assert during >= 1
    # with overlap="skip", slots while it ran were recorded as skipped, not queued behind it
    skipped = await node.pool.fetch("SELECT slot FROM forge_cron_runs WHERE cron = 'slow_tick' AND status = 'skipped'")
    assert skipped and any(slow["started_at"] < s["slot"] < slow["finished_at"] for s in skipped)

    # a failing cron's error reaches the history
    failed = (await crons.history("failing"))[0]
    assert failed.kind == "manual" and failed.status == "failed" and "fails on purpose" in failed.error
    assert failed.attempts == 1 and isinstance(failed.finished_at, dt.datetime)

    # the leader ran the worker's own chores (lease rescue, job history retention) too
    chores = {r["task"]: r for r in await node.pool.fetch("SELECT * FROM forge_maintenance")}
    assert chores["worker.rescue_expired_leases"]["runs"] >= 1
    assert chores["worker.rescue_expired_leases"]["last_node"] == node.id
