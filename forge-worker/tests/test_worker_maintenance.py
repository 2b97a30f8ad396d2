"""Maintenance chores the scheduler leader runs: lease rescue and history retention."""

from __future__ import annotations

from forge_worker import JobQueue
from forge_worker.service import maintenance_tasks


async def _ghost_job(pool, *, attempt: int, max_attempts: int = 5, cancel: bool = False, lease_s: float = -1) -> int:
    return await pool.fetchval(
        """INSERT INTO forge_jobs (name, args, status, attempt, max_attempts, node_id, lease_until, cancel_requested,
                                   started_at)
           VALUES ('record', '{"value": "x"}', 'running', $1, $2, 'ghost-node',
                   now() + make_interval(secs => $3), $4, now()) RETURNING id""",
        attempt, max_attempts, lease_s, cancel)


async def test_rescue_task_requeues_dead_letters_and_honours_cancellation(forge_node):
    node = await forge_node(modules=["worker_jobs"], config={"node": {"roles": ["realtime"]}})
    tasks = {t.name: t for t in maintenance_tasks(node)}
    assert set(tasks) == {"worker.rescue_expired_leases", "worker.history_retention", "workflows.recover_runs",
                          "workflows.retention"}
    expired = await _ghost_job(node.pool, attempt=1)
    last = await _ghost_job(node.pool, attempt=5, max_attempts=5)
    cancelled = await _ghost_job(node.pool, attempt=1, cancel=True)
    alive = await _ghost_job(node.pool, attempt=1, lease_s=600)
    async with node.pool.acquire() as conn:
        assert await tasks["worker.rescue_expired_leases"].run(conn) == 3
        assert await tasks["worker.rescue_expired_leases"].run(conn) == 0  # idempotent
    queue = JobQueue(node.pool)
    e = await queue.get(expired)
    assert e.status == "pending" and e.node_id is None and "ghost-node stopped heartbeating" in e.last_error
    assert (await queue.get(last)).status == "dead"
    c = await queue.get(cancelled)
    assert c.status == "cancelled" and "cancelled on request" in c.last_error
    assert (await queue.get(alive)).status == "running"  # its lease holds: never taken away


async def test_rescue_uses_node_membership(forge_node):
    node = await forge_node(modules=["worker_jobs"], config={"node": {"roles": ["realtime"], "dead_after": 1.0}})
    job_id = await _ghost_job(node.pool, attempt=1, lease_s=600)
    await node.pool.execute(
        """INSERT INTO forge_nodes (id, host, pid, version, status, last_heartbeat)
           VALUES ('ghost-node', 'h', 1, '0', 'running', now() - interval '1 minute')""")
    task = next(t for t in maintenance_tasks(node) if t.name == "worker.rescue_expired_leases")
    async with node.pool.acquire() as conn:
        assert await task.run(conn) == 1  # lease still valid, but its node stopped heartbeating
    assert (await JobQueue(node.pool).get(job_id)).status == "pending"


async def test_history_retention(forge_node):
    node = await forge_node(modules=["worker_jobs"], config={"node": {"roles": ["realtime"]},
                                                              "worker": {"history_retention": 3600}})
    for age in (7200, 10):
        await node.pool.execute(
            """INSERT INTO forge_job_history (id, name, queue, args, priority, status, attempt, max_attempts, options,
                                              created_at, run_at, finished_at)
               VALUES ($1::bigint, 'record', 'default', '{}', 0, 'succeeded', 1, 5, '{}', now(), now(),
                       now() - make_interval(secs => $1::bigint))""", age)
    await node.pool.execute("INSERT INTO forge_worker_sleepers (node_id, queues, capabilities) VALUES ('gone', '{}', '{}')")
    task = next(t for t in maintenance_tasks(node) if t.name == "worker.history_retention")
    async with node.pool.acquire() as conn:
        assert await task.run(conn) == 1
    assert [r["id"] for r in await node.pool.fetch("SELECT id FROM forge_job_history")] == [10]
    assert await node.pool.fetchval("SELECT count(*) FROM forge_worker_sleepers") == 0
