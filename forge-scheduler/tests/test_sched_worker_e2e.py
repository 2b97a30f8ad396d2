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


async def test_runs_whose_job_ended_without_a_report_are_closed(sched_node):
    """No worker runs here, so jobs wait. One is cancelled before it runs, one is dead-lettered
    by the lease rescue (its worker died on the last attempt), one finished but its worker died
    before reporting, and one's history was purged: no forge_job_finished ever fires for them,
    and the leader's reconcile chore closes their runs from the job store's record."""
    from forge_worker.queue import JobQueue
    from forge_worker.runtime import rescue_expired

    node = await sched_node(modules=["sched_worker_app"], env=WITH_WORKER, roles=("scheduler",),
                            scheduler={"tick_interval": 0.1, "reconcile_interval": 0.2})
    crons = Crons(node.pool, crons_of(node.registry).values())
    await eventually(lambda: _v(scheduler_of(node).election.is_leader), what="leadership")
    await crons.pause("fast_tick")
    await crons.pause("slow_tick")
    for _ in range(4):
        await crons.trigger("failing", requested_by="test")

    async def queued():
        rows = await node.pool.fetch("SELECT id, job_id FROM forge_cron_runs WHERE cron = 'failing' ORDER BY id")
        return rows if len(rows) == 4 and all(r["job_id"] for r in rows) else None

    cancelled, rescued, unreported, purged = await eventually(queued, timeout=10, what="four queued runs")
    assert await JobQueue(node.pool).cancel(cancelled["job_id"]) == "cancelled"
    await node.pool.execute("INSERT INTO forge_nodes (id, host, pid, version, status, last_heartbeat) "
                            "VALUES ('w-dead', 'h', 1, '0', 'dead', now())")
    await node.pool.execute("UPDATE forge_jobs SET status = 'running', attempt = 1, node_id = 'w-dead', started_at = now(), "
                            "lease_until = now() - interval '1 second' WHERE id = $1", rescued["job_id"])
    assert (rescued["job_id"], "dead") in await rescue_expired(node.pool, 15)
    # the worker wrote the result, then died before its forge_job_finished call
    await node.pool.execute(
        """WITH gone AS (DELETE FROM forge_jobs WHERE id = $1 RETURNING *)
           INSERT INTO forge_job_history (id, name, queue, args, priority, status, attempt, max_attempts, unique_key,
               caller, options, node_id, last_error, created_at, run_at, started_at, finished_at)
           SELECT id, name, queue, args, priority, 'succeeded', 1, max_attempts, unique_key, caller, options,
                  'w-dead', NULL, created_at, run_at, now() - interval '2 seconds', now() FROM gone""",
        unreported["job_id"])
    await node.pool.execute("DELETE FROM forge_jobs WHERE id = $1", purged["job_id"])

    async def closed():
        rows = await node.pool.fetch("SELECT id, status, error, duration_ms FROM forge_cron_runs WHERE cron = 'failing'")
        by_id = {r["id"]: r for r in rows}
        return by_id if all(r["status"] not in ("queued", "retrying") for r in rows) else None

    runs = await eventually(closed, timeout=10, what="the reconcile chore to close the runs")
    assert runs[cancelled["id"]]["status"] == "cancelled"
    assert runs[rescued["id"]]["status"] == "failed" and "stopped heartbeating" in runs[rescued["id"]]["error"]
    assert runs[unreported["id"]]["status"] == "succeeded"
    assert runs[unreported["id"]]["duration_ms"] == pytest.approx(2000, abs=50)
    assert runs[purged["id"]]["status"] == "failed" and "no longer in the job store" in runs[purged["id"]]["error"]
    chore = await node.pool.fetchrow("SELECT * FROM forge_maintenance WHERE task = 'scheduler.reconcile_runs'")
    assert chore["runs"] >= 1 and chore["failures"] == 0 and chore["last_node"] == node.id


async def _v(value):
    return value
