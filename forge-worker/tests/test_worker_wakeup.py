"""Wake-up hints (LISTEN/NOTIFY, coalesced, targeted) and leases of live jobs."""

from __future__ import annotations

import asyncio

import asyncpg

from forge_kernel import SYSTEM
from forge_worker import JobQueue

from worker_helpers import eventually, log_rows, worker_config

import worker_jobs


async def _listen(url: str) -> tuple[asyncpg.Connection, list[str]]:
    got: list[str] = []
    conn = await asyncpg.connect(url)
    await conn.add_listener("forge_jobs", lambda *a: got.append(a[3]))
    return conn, got


async def _sleeping(node):
    return node.worker.sleeping and await node.pool.fetchval(
        "SELECT count(*) FROM forge_worker_sleepers WHERE node_id = $1", node.id)


async def test_idle_worker_is_woken_by_one_hint_per_batch(forge_node):
    # a poll interval far beyond the test's patience: only the hint can start these jobs
    node = await forge_node(modules=["worker_jobs"], config=worker_config(poll_interval=600, spin_window=0))
    listener, hints = await _listen(node.url)
    try:
        await eventually(lambda: _sleeping(node), what="the worker to go idle")
        queue = JobQueue(node.pool)
        await queue.enqueue_many([queue.request(worker_jobs.record, {"value": str(i)}) for i in range(1000)])
        await eventually(lambda: _count_ran(node.pool, 1000), timeout=60, what="1000 jobs after one hint")
        await asyncio.sleep(0.2)
        assert hints == [node.id]  # one NOTIFY for 1000 jobs, addressed to the one sleeper
        # inside a mutation the hint commits with the transaction
        await eventually(lambda: _sleeping(node), what="the worker to go idle again")
        job_id = await node.executor.call("add_item", {"id": 1, "title": "t"}, SYSTEM)
        await eventually(lambda: log_rows(node.pool, job_id=job_id), what="the mutation's job")
    finally:
        await listener.close()


async def _count_ran(pool, n):
    return await pool.fetchval("SELECT count(*) FROM job_log WHERE event = 'ran'") >= n


async def test_busy_workers_get_no_notify_and_one_job_wakes_one_node(forge_node):
    cfg = worker_config(poll_interval=600, spin_window=0)
    nodes = [await forge_node(modules=["worker_jobs"], config=cfg) for _ in range(3)]
    listener, hints = await _listen(nodes[0].url)
    try:
        for n in nodes:
            await eventually(lambda: _sleeping(n), what="idle workers")
        job_id = await JobQueue(nodes[0].pool).enqueue(worker_jobs.record, {"value": "one"})
        await eventually(lambda: log_rows(nodes[0].pool, job_id=job_id), what="the single job")
        await asyncio.sleep(0.2)
        assert len(hints) == 1  # no thundering herd: one job, one node woken
        # with no sleeper registered, enqueues send no NOTIFY at all
        await nodes[0].pool.execute("DELETE FROM forge_worker_sleepers")
        for n in nodes:
            n.worker.sleeping = False  # pretend they are busy; they re-register when idle
        hints.clear()
        await listener.execute("SELECT 1")
        await JobQueue(nodes[0].pool).enqueue_many(
            [JobQueue(nodes[0].pool).request(worker_jobs.record, {"value": "x"}) for _ in range(10)])
        await asyncio.sleep(0.1)
        assert hints == []
    finally:
        await listener.close()


async def test_live_long_job_keeps_its_lease_and_runs_once(forge_node):
    cfg = worker_config(lease=1.0, heartbeat_interval=0.2, rescue_interval=0.2)
    nodes = [await forge_node(modules=["worker_jobs"], config=cfg) for _ in range(2)]
    job_id = await JobQueue(nodes[0].pool).enqueue(worker_jobs.long_running, {"seconds": 3})
    await eventually(lambda: log_rows(nodes[0].pool, job_id=job_id, event="ran"), timeout=30, what="the long job")
    rows = await log_rows(nodes[0].pool, job_id=job_id, event="started")
    assert len(rows) == 1  # three lease periods long, never handed to the other worker
    info = await eventually(lambda: _succeeded(nodes[0].pool, job_id), what="the result to be written")
    assert info.attempt == 1


async def _succeeded(pool, job_id):
    info = await JobQueue(pool).get(job_id)
    return info if info is not None and info.status == "succeeded" else None


async def _each_ran_once(pool, n):
    rows = await pool.fetch("SELECT job_id, count(*) AS n FROM job_log WHERE event = 'ran' GROUP BY job_id")
    return {r["job_id"]: r["n"] for r in rows} if len(rows) >= n else None


async def test_polling_alone_runs_every_job_when_no_hint_is_sent(forge_node):
    # a short poll interval and no spinning: the only way to find these jobs is the poll
    node = await forge_node(modules=["worker_jobs"], config=worker_config(poll_interval=0.3, spin_window=0))
    listener, hints = await _listen(node.url)
    try:
        await eventually(lambda: _sleeping(node), what="the worker to go idle")
        # 1. jobs stored with plain SQL: no enqueue code ran, so no NOTIFY was sent
        await node.pool.execute(
            """INSERT INTO forge_jobs (name, args)
               SELECT 'record', jsonb_build_object('value', 'sql-' || i) FROM generate_series(1, 30) AS i""")
        # ... and one delayed job, promoted by the worker's own look at the schedule
        await node.pool.execute(
            """INSERT INTO forge_jobs (name, args, status, run_at)
               VALUES ('record', '{"value": "sql-delayed"}', 'scheduled', now() + interval '1 second')""")
        # 2. jobs enqueued through the API while the hint gate is empty: the worker believes it is
        # registered as a sleeper, so it will not register again, and enqueues find no one to NOTIFY
        await node.pool.execute("DELETE FROM forge_worker_sleepers")
        queue = JobQueue(node.pool)
        api_ids = await queue.enqueue_many([queue.request(worker_jobs.record, {"value": f"api-{i}"})
                                            for i in range(30)])
        api_ids.append(await queue.enqueue(worker_jobs.record, {"value": "api-single"}))
        counts = await eventually(lambda: _each_ran_once(node.pool, 62), timeout=60,
                                  what="every job, found by polling alone")
        assert len(counts) == 62 and set(counts.values()) == {1}  # each ran, and ran once
        assert set(api_ids) <= set(counts)

        async def all_recorded():  # results are reported in batches, a moment after the job ran
            left = await node.pool.fetchval("SELECT count(*) FROM forge_jobs")
            done = await node.pool.fetchval(
                "SELECT count(*) FROM forge_job_history WHERE status = 'succeeded' AND attempt = 1")
            return left == 0 and done == 62

        await eventually(all_recorded, timeout=30, what="every result recorded (hot table empty, history 62)")
        await listener.execute("SELECT 1")  # any NOTIFY sent has been delivered by now
        assert hints == []  # not one wake-up hint: polling did all of it
    finally:
        await listener.close()
