"""Scheduling and failure semantics: priorities, delays, limits, capabilities, unique jobs,
timeouts, retries, retry-later, cancel, dead letter, unknown types, progress, hooks."""

from __future__ import annotations

import asyncio
import datetime as dt
import random

import pytest

from forge_kernel import hookimpl
from forge_kernel.errors import NotFound
from forge_kernel.plugins import PluginLoader
from forge_worker import JobQueue
from forge_worker.runtime import backoff_delay

from worker_helpers import eventually, log_rows, worker_config

import worker_jobs


async def _ran(pool, n, event="ran"):
    rows = await pool.fetch("SELECT * FROM job_log WHERE event = $1 ORDER BY seq", event)
    return rows if len(rows) >= n else None


async def test_priorities_run_highest_first(forge_node, forge_db_url):
    # store first, then start a one-slot worker, so order is decided by priority alone
    pre = await forge_node(modules=["worker_jobs"], config={"node": {"roles": ["realtime"]}})
    queue = JobQueue(pre.pool)
    for i, prio in enumerate([0, 5, -1, 10, 5]):
        await queue.enqueue("record", {"value": f"p{prio}-{i}"}, priority=prio)
    node = await forge_node(modules=["worker_jobs"], config=worker_config(concurrency=1))
    rows = await eventually(lambda: _ran(node.pool, 5), what="5 runs")
    assert [r["value"] for r in rows] == ["p10-3", "p5-1", "p5-4", "p0-0", "p-1-2"]


async def test_delayed_and_scheduled_jobs_wait(forge_node):
    node = await forge_node(modules=["worker_jobs"], config=worker_config())
    queue = JobQueue(node.pool)
    now = await node.pool.fetchval("SELECT now()")
    delayed = await queue.enqueue("record", {"value": "delayed"}, delay=0.6)
    at = await queue.enqueue("record", {"value": "at"}, run_at=now + dt.timedelta(seconds=0.3))
    far = await queue.enqueue("record", {"value": "far"}, delay=3600)
    info = await queue.get(delayed)
    assert info.status == "scheduled"
    rows = await eventually(lambda: _ran(node.pool, 2), what="both due jobs")
    assert [r["value"] for r in rows] == ["at", "delayed"]
    by = {r["value"]: r for r in rows}
    started = {r["job_id"]: r["at"] for r in rows}
    assert (started[at] - now).total_seconds() >= 0.3
    assert (started[delayed] - now).total_seconds() >= 0.6
    assert (await queue.get(far)).status == "scheduled"
    assert by["at"]["job_id"] == at


async def test_retries_with_backoff_then_success(forge_node):
    node = await forge_node(modules=["worker_jobs"], config=worker_config())
    job_id = await JobQueue(node.pool).enqueue(worker_jobs.flaky, {"fail_times": 2})
    await eventually(lambda: _ran(node.pool, 1), what="the third attempt")
    attempts = [r["attempt"] for r in await log_rows(node.pool, job_id=job_id, event="attempt")]
    assert attempts == [1, 2, 3]
    info = await eventually(lambda: _hist(node.pool, job_id), what="history")
    assert info.status == "succeeded" and info.attempt == 3


async def _hist(pool, job_id):
    j = await JobQueue(pool).get(job_id)
    return j if j is not None and j.status in ("succeeded", "cancelled", "discarded") else None


async def test_exhausted_jobs_go_to_dead_letter_and_can_be_retried_or_discarded(forge_node):
    node = await forge_node(modules=["worker_jobs"], config=worker_config())
    queue = JobQueue(node.pool)
    a = await queue.enqueue(worker_jobs.always_fails, {})
    b = await JobQueue(node.pool, node.registry).enqueue("always_fails", {})  # name resolved: @job defaults apply
    dead = await eventually(lambda: _dead(queue, 2), what="two dead jobs")
    assert {j.id for j in dead} == {a, b}
    assert all(j.attempt == 2 and "this job always fails" in j.last_error for j in dead)
    assert await queue.retry([a]) == [a]
    await eventually(lambda: _attempts(node.pool, a, 4), what="two more attempts")
    await eventually(lambda: _dead(queue, 2), what="dead again")
    assert await queue.discard([b]) == [b]
    assert (await queue.get(b)).status == "discarded"
    assert await queue.retry([b]) == []  # not dead any more


async def _dead(queue, n):
    d = await queue.dead()
    return d if len(d) == n and all(j.status == "dead" for j in d) else None


async def _attempts(pool, job_id, n):
    rows = await log_rows(pool, job_id=job_id, event="attempt")
    return rows if len(rows) >= n else None


async def test_unknown_job_type_fails_once_and_clearly(forge_node):
    node = await forge_node(modules=["worker_jobs"], config=worker_config())
    queue = JobQueue(node.pool)
    job_id = await queue.enqueue("no_such_job", {"x": 1}, max_attempts=5)
    wrong_kind = await queue.enqueue("add_item", {"id": 1, "title": "t"})
    bad_args = await queue.enqueue("record", {"value": 5})
    dead = await eventually(lambda: _dead(queue, 3), what="dead letter")
    by = {j.id: j for j in dead}
    assert by[job_id].attempt == 1 and "unknown job type 'no_such_job'" in by[job_id].last_error
    assert "not a job" in by[wrong_kind].last_error
    assert "value" in by[bad_args].last_error and by[bad_args].attempt == 1


async def test_retry_later_does_not_use_attempts(forge_node):
    node = await forge_node(modules=["worker_jobs"], config=worker_config())
    job_id = await JobQueue(node.pool).enqueue("later", {"times": 3}, max_attempts=1)
    await eventually(lambda: _ran(node.pool, 1), what="the job to finish")
    info = await eventually(lambda: _hist(node.pool, job_id), what="history")
    assert info.status == "succeeded" and info.attempt == 1
    assert len(await log_rows(node.pool, job_id=job_id, event="attempt")) == 4


async def test_cancel_from_inside_the_job(forge_node):
    node = await forge_node(modules=["worker_jobs"], config=worker_config())
    job_id = await JobQueue(node.pool).enqueue("gives_up", {})
    info = await eventually(lambda: _hist(node.pool, job_id), what="history")
    assert info.status == "cancelled" and info.last_error == "nothing to do"
    assert len(await log_rows(node.pool, job_id=job_id)) == 1  # never retried


async def test_timeout_fails_the_attempt(forge_node):
    node = await forge_node(modules=["worker_jobs"], config=worker_config())
    queue = JobQueue(node.pool)
    # one timer watches every running job's limit: a job with a long limit, started first, must
    # neither delay the shorter limits after it nor be cut short by them
    patient = await queue.enqueue("sleepy", {"seconds": 1.5}, timeout=60, max_attempts=1)
    await eventually(lambda: node.pool.fetchval("SELECT status = 'running' FROM forge_jobs WHERE id = $1", patient),
                     what="the long-limit job to start")
    job_id = await queue.enqueue(worker_jobs.too_slow, {})
    dead = await eventually(lambda: _dead(queue, 1), what="the timed out job in dead letter")
    assert dead[0].id == job_id and "timed out after 0.3s" in dead[0].last_error
    # a per-enqueue timeout overrides the job's own
    other = await queue.enqueue("sleepy", {"seconds": 5}, timeout=0.2, max_attempts=1)
    dead = await eventually(lambda: _dead(queue, 2), what="the second timeout")
    assert "timed out after 0.2s" in {j.id: j for j in dead}[other].last_error
    done = await eventually(lambda: _hist(node.pool, patient), what="the long-limit job to finish")
    assert done.status == "succeeded"


async def test_cancel_pending_and_running_jobs(forge_node):
    # prefetch 0: the waiting job stays pending (claimed ahead: test_cancel_of_a_job_claimed_ahead)
    node = await forge_node(modules=["worker_jobs"], config=worker_config(concurrency=1, prefetch=0))
    queue = JobQueue(node.pool)
    running = await queue.enqueue(worker_jobs.long_running, {"seconds": 30})
    waiting = await queue.enqueue("record", {"value": "never"})
    await eventually(lambda: log_rows(node.pool, job_id=running, event="started"), what="the long job to start")
    assert await queue.cancel(waiting) == "cancelled"
    assert await queue.cancel(running) == "requested"
    rows = await eventually(lambda: log_rows(node.pool, job_id=running, event="cancelled"), what="cancellation")
    assert rows[0]["value"] == "True"  # the job saw ctx.cancelled
    info = await eventually(lambda: _hist(node.pool, running), what="history")
    assert info.status == "cancelled"
    assert (await queue.get(waiting)).status == "cancelled"
    assert not await log_rows(node.pool, job_id=waiting)
    with pytest.raises(NotFound):
        await queue.cancel(waiting)


async def test_cancel_of_a_job_claimed_ahead_before_it_starts(forge_node):
    """A job claimed ahead (leased to the node, waiting for a slot) and cancelled never starts: the
    node drops it and its cancellation is recorded; the job running beside it is not disturbed."""
    node = await forge_node(modules=["worker_jobs"], config=worker_config(concurrency=1, prefetch=2))
    queue = JobQueue(node.pool)
    running, *ahead = await queue.enqueue_many([  # one claim: the first starts, two are claimed ahead
        queue.request(worker_jobs.long_running, {"seconds": 30}), queue.request("record", {"value": "never"}),
        queue.request("record", {"value": "later"})])
    await eventually(lambda: log_rows(node.pool, job_id=running, event="started"), what="the long job to start")

    async def claimed_ahead():
        rows = await node.pool.fetch("SELECT id, status, node_id, started_at, attempt FROM forge_jobs "
                                     "WHERE id = ANY($1::bigint[]) ORDER BY id", ahead)
        return rows if all(r["status"] == "running" and r["node_id"] == node.id for r in rows) else None

    rows = await eventually(claimed_ahead, what="the node to claim both jobs ahead")
    assert [(r["started_at"], r["attempt"]) for r in rows] == [(None, 1), (None, 1)]  # not started
    assert node.worker.activity()["jobs"]["claimed_ahead"] == 2
    assert await queue.cancel(ahead[0]) == "requested"  # the node holds it: it drops it
    info = await eventually(lambda: _hist(node.pool, ahead[0]), what="the cancelled job in history")
    assert (info.status, info.started_at) == ("cancelled", None)
    await queue.cancel(running)
    done = await eventually(lambda: _hist(node.pool, ahead[1]), what="the other job claimed ahead to run")
    assert done.status == "succeeded" and done.started_at is not None
    assert not await log_rows(node.pool, job_id=ahead[0])  # never started
    assert [r["value"] for r in await log_rows(node.pool, job_id=ahead[1])] == ["later"]
    assert node.worker.stats["cancelled"] == 2


async def test_progress_is_coalesced(forge_node):
    node = await forge_node(modules=["worker_jobs"], config=worker_config(heartbeat_interval=0.1))
    queue = JobQueue(node.pool)
    job_id = await queue.enqueue("long_running", {"seconds": 3})
    seen = await eventually(lambda: _progress(queue, job_id), what="progress to be written")
    assert 0 <= seen.progress <= 100 and seen.progress_message.startswith("step ")
    # a tight loop of 100,000 progress calls costs no writes of its own
    await queue.cancel(job_id)
    await eventually(lambda: _hist(node.pool, job_id), what="the long job to be cancelled")
    before = node.worker.stats["progress_writes"]
    t = await queue.enqueue("tight_progress", {"steps": 100_000})
    await eventually(lambda: log_rows(node.pool, job_id=t, event="ran"), what="tight loop")
    writes = node.worker.stats["progress_writes"] - before
    # one write per lease renewal at most (0.3 s at 0.1 s intervals), not one per call
    assert 1 <= writes <= 10


async def _progress(queue, job_id):
    j = await queue.get(job_id)
    return j if j is not None and j.progress is not None and j.progress > 0 else None


async def test_unique_jobs_skip_or_replace(forge_node):
    pre = await forge_node(modules=["worker_jobs"], config={"node": {"roles": ["realtime"]}})
    queue = JobQueue(pre.pool)
    a = await queue.enqueue("record", {"value": "first"}, unique_key="k1", delay=3600)
    b = await queue.enqueue("record", {"value": "second"}, unique_key="k1", delay=3600)
    assert a == b  # skipped: reports the job holding the key
    assert (await queue.get(a)).args == {"value": "first"}
    c = await queue.enqueue("record", {"value": "third"}, unique_key="k1", on_conflict="replace")
    assert c == a
    info = await queue.get(a)
    assert info.args == {"value": "third"} and info.status == "pending"
    ids = await queue.enqueue_many([queue.request("record", {"value": str(i)}, unique_key="k2") for i in range(5)])
    assert len(set(ids)) == 1
    assert await pre.pool.fetchval("SELECT count(*) FROM forge_jobs WHERE unique_key = 'k2'") == 1
    # once finished, the key is free again
    node = await forge_node(modules=["worker_jobs"], config=worker_config())
    await eventually(lambda: _ran(node.pool, 2), what="both unique jobs")
    await eventually(lambda: _hist(node.pool, a), what="history")
    d = await queue.enqueue("record", {"value": "again"}, unique_key="k1")
    assert d not in (0, a)


async def test_per_type_concurrency_limit_holds_across_nodes(forge_node):
    nodes = [await forge_node(modules=["worker_jobs"], config=worker_config(concurrency=5)) for _ in range(2)]
    queue = JobQueue(nodes[0].pool)
    await queue.enqueue_many([queue.request("limited", {"hold": 0.2}) for _ in range(8)])
    await eventually(lambda: _ran(nodes[0].pool, 8, "ended"), timeout=30, what="8 limited jobs")
    events = await nodes[0].pool.fetch("SELECT event, node_id FROM job_log ORDER BY at, seq")
    running = peak = 0
    for e in events:
        running += 1 if e["event"] == "started" else -1
        peak = max(peak, running)
    assert peak == 2


async def test_per_queue_concurrency_limit(forge_node):
    cfg = worker_config(concurrency=10, queue_limits={"slow": 1})
    nodes = [await forge_node(modules=["worker_jobs"], config=cfg) for _ in range(2)]
    queue = JobQueue(nodes[0].pool)
    await queue.enqueue_many([queue.request("sleepy", {"seconds": 0.1}, queue="slow") for _ in range(4)] +
                             [queue.request("record", {"value": str(i)}) for i in range(4)])
    await eventually(lambda: _ran(nodes[0].pool, 8), timeout=30, what="all jobs")
    spans = await nodes[0].pool.fetch(
        "SELECT started_at, finished_at FROM forge_job_history WHERE queue = 'slow' ORDER BY started_at")
    for prev, nxt in zip(spans, spans[1:]):
        assert nxt["started_at"] >= prev["finished_at"] - dt.timedelta(milliseconds=5)


async def test_capability_routing(forge_node):
    plain = await forge_node(modules=["worker_jobs"], config=worker_config())
    queue = JobQueue(plain.pool)
    job_id = await queue.enqueue(worker_jobs.needs_gpu, {"value": "x"})
    await asyncio.sleep(0.6)
    assert (await queue.get(job_id)).status == "pending"  # no node offers gpu yet
    cfg = worker_config()
    cfg["node"]["capabilities"] = ["gpu"]
    gpu = await forge_node(modules=["worker_jobs"], config=cfg)
    rows = await eventually(lambda: log_rows(plain.pool, job_id=job_id), what="the gpu node to run it")
    assert rows[0]["node_id"] == gpu.id


async def test_queues_config_selects_work(forge_node):
    node = await forge_node(modules=["worker_jobs"], config=worker_config(queues=["mail"]))
    queue = JobQueue(node.pool)
    other = await queue.enqueue("record", {"value": "default-q"})
    mine = await queue.enqueue("record", {"value": "mail-q"}, queue="mail")
    await eventually(lambda: log_rows(node.pool, job_id=mine), what="the mail job")
    assert (await queue.get(other)).status == "pending"


async def test_job_finished_hook_gets_every_attempt(forge_node):
    outcomes = []

    class Recorder:
        @hookimpl
        def forge_job_finished(self, node, outcome):
            async def keep():
                outcomes.append(outcome)
            return keep()

    loader = PluginLoader().load(extra=[("recorder", Recorder())])
    node = await forge_node(modules=["worker_jobs"], config=worker_config(), loader=loader)
    job_id = await JobQueue(node.pool).enqueue(worker_jobs.flaky, {"fail_times": 1})
    await eventually(lambda: _ran(node.pool, 1), what="success")
    await eventually(lambda: asyncio.sleep(0, len(outcomes) >= 2), what="two outcomes")
    assert [(o.job_id, o.status, o.attempt) for o in outcomes] == [(job_id, "failed", 1), (job_id, "succeeded", 2)]
    assert outcomes[0].error.startswith("RuntimeError: planned failure 1")
    assert outcomes[1].options.get("backoff") == 0.01



@pytest.mark.parametrize("with_wrapper", [False, True])
async def test_job_finished_hook_implementations_are_called_as_pluggy_calls_them(forge_node, with_wrapper):
    # the worker calls the implementations itself (pluggy's per-call checks were most of the hook's
    # cost): one that takes only some of the arguments gets those, in pluggy's order (the last
    # registered first), and with a wrapper registered pluggy's own call is used
    calls = []

    class First:
        @hookimpl
        def forge_job_finished(self, outcome):
            calls.append(("first", outcome.status))

    class Second:
        @hookimpl
        def forge_job_finished(self, outcome, node):
            calls.append(("second", outcome.status, node.id))

    class Wrapper:
        @hookimpl(wrapper=True)
        def forge_job_finished(self, node, outcome):
            calls.append(("wrapper", outcome.status))
            return (yield)

    extra = [("first", First()), ("second", Second())] + ([("wrapper", Wrapper())] if with_wrapper else [])
    loader = PluginLoader().load(extra=extra)
    node = await forge_node(modules=["worker_jobs"], config=worker_config(), loader=loader)
    await JobQueue(node.pool).enqueue("record", {"value": "x"})
    await eventually(lambda: asyncio.sleep(0, len(calls) >= (3 if with_wrapper else 2)), what="the hook calls")
    mine = [c for c in calls if c[0] != "wrapper"]
    assert mine == [("second", "succeeded", node.id), ("first", "succeeded")], calls
    assert (("wrapper", "succeeded") in calls) == with_wrapper

def test_backoff_grows_exponentially_with_jitter():
    rng = random.Random(3).random
    for attempt in range(1, 12):
        d = backoff_delay(attempt, 1.0, 60.0, rng)
        raw = min(60.0, 2 ** (attempt - 1))
        assert raw / 2 <= d <= raw
    assert backoff_delay(200, 1.0, 60.0, lambda: 1.0) == 60.0


def test_bad_job_settings_stop_startup_naming_the_job():
    from forge_kernel import job
    from forge_kernel.app import Registry
    from forge_kernel.errors import StartupError
    from forge_worker.validate import check_registry

    @job(concurrency=0, backoff={"base": -1, "step": 2})
    async def bad(ctx) -> None: ...

    @job(queue="")
    async def also_bad(ctx) -> None: ...

    from forge_kernel import cron

    @cron("* * * * *", max_attempts=0)
    async def nightly(ctx) -> None: ...

    reg = Registry()
    reg.add(bad.__forge__)
    reg.add(also_bad.__forge__)
    reg.add(nightly.__forge__)
    with pytest.raises(StartupError) as err:
        check_registry(reg)
    text = str(err.value)
    # a cron's job settings are checked at start-up too, not at every tick
    assert "@cron nightly" in text and "max_attempts must be a whole number from 1 to 2147483647, got 0" in text
    assert "@job bad" in text and "concurrency must be an integer >= 1, got 0" in text
    assert "backoff accepts the keys base and max, got step" in text and "backoff base" in text
    assert "@job also_bad" in text and "queue must be a non-empty string" in text
    check_registry(Registry())  # nothing to complain about


async def _claimed_ahead_then_started(node, queue, hold: float):
    """One slot and one job claimed ahead: ``first`` (sleepy ``hold`` s) starts at once, ``second``
    (sleepy 30 s, not on its last attempt) waits claimed ahead and starts on the node when the first
    ends. Returns both ids once the second runs."""
    first, second = await queue.enqueue_many([queue.request(worker_jobs.sleepy, {"seconds": hold}),
                                              queue.request(worker_jobs.sleepy, {"seconds": 30})])

    async def started_here():
        a = node.worker.running.get(second)
        return True if a is not None and a.task is not None else None

    await eventually(started_here, what="the job claimed ahead to start on the node")
    return first, second


async def test_lease_renewal_writes_when_a_long_job_claimed_ahead_started(forge_node):
    """A job claimed ahead has started_at NULL until it starts; when it runs long, the lease renewal
    writes its real start (not its claim's time) while it runs, before any result."""
    node = await forge_node(modules=["worker_jobs"], config=worker_config(concurrency=1, prefetch=1))
    queue = JobQueue(node.pool)
    first, second = await _claimed_ahead_then_started(node, queue, hold=0.5)
    # the first job has ended: its row may be live still or already moved to history
    claimed = await node.pool.fetchrow("SELECT started_at FROM forge_jobs WHERE id = $1 UNION ALL "
                                       "SELECT started_at FROM forge_job_history WHERE id = $1", first)

    async def start_written():
        r = await node.pool.fetchrow("SELECT status, started_at FROM forge_jobs WHERE id = $1", second)
        return r if r is not None and r["started_at"] is not None else None

    row = await eventually(start_written, what="the renewal to write the start of the job claimed ahead")
    assert row["status"] == "running"  # still running: the renewal wrote it, not its result
    # it started when the first job (0.5 s) ended, not when both were claimed
    assert row["started_at"] >= claimed["started_at"] + dt.timedelta(seconds=0.45)
    await queue.cancel(second)
    done = await eventually(lambda: _hist(node.pool, second), what="the long job to be cancelled")
    assert done.started_at == row["started_at"]


async def test_cancel_just_after_a_job_claimed_ahead_started_stops_it(forge_node):
    """A cancel that reaches a job claimed ahead right after it started (its start not written yet:
    the lease renewal is 30 s away) stops the running task; history records the cancel with the
    start the node saw."""
    cfg = worker_config(concurrency=1, prefetch=1)
    cfg["worker"]["heartbeat_interval"] = 30.0
    node = await forge_node(modules=["worker_jobs"], config=cfg)
    queue = JobQueue(node.pool)
    first, second = await _claimed_ahead_then_started(node, queue, hold=0.2)
    task = node.worker.running[second].task
    assert await node.pool.fetchval("SELECT started_at FROM forge_jobs WHERE id = $1", second) is None
    assert await queue.cancel(second) == "requested"
    done = await eventually(lambda: _hist(node.pool, second), what="the started job to be cancelled")
    assert task.cancelled() or task.done()
    assert done.status == "cancelled" and done.started_at is not None
    assert not await log_rows(node.pool, job_id=second, event="ran")  # stopped before its end
    first_done = await _hist(node.pool, first)
    assert first_done.status == "succeeded" and done.started_at >= first_done.started_at


async def test_starts_of_jobs_claimed_ahead_are_written_with_their_results_and_marks(forge_node):
    """A job claimed ahead that ends before any lease renewal gets its start from its result row
    (the started column of the batch), and one on its last attempt from the mark written before
    it starts: both are when it started on the node (after the job ahead of it ended), not its
    claim's time, and not before it was claimed."""
    cfg = worker_config(concurrency=1, prefetch=2, heartbeat_interval=30.0)
    node = await forge_node(modules=["worker_jobs"], config=cfg)
    queue = JobQueue(node.pool)
    first, second, last = await queue.enqueue_many([
        queue.request(worker_jobs.sleepy, {"seconds": 0.4}),
        queue.request(worker_jobs.record, {"value": "x"}),  # not its last attempt: start with its result
        queue.request(worker_jobs.long_running, {"seconds": 0.05}),  # max_attempts 1: start marked first
    ])
    done = {}
    for job_id in (first, second, last):
        done[job_id] = await eventually(lambda: _hist(node.pool, job_id), timeout=30, what=f"job {job_id} done")
    head = done[first]
    for job_id in (second, last):
        j = done[job_id]
        assert head.started_at + dt.timedelta(seconds=0.35) <= j.started_at <= j.finished_at, (head, j)


async def test_lease_renewals_never_deadlock_with_result_statements(forge_node, forge_db_url):
    """RENEW locks a node's running rows in id order, a result-and-claim statement the rows of the
    attempts it writes in the order they finished: run at the same time they deadlocked (PostgreSQL
    aborts one after deadlock_timeout, 1 s: a stalled claim loop). Under a steady stream of jobs that
    finish out of order, with a renewal every 50 ms, no statement of the node meets a deadlock."""
    import asyncpg
    from loguru import logger

    warnings: list[str] = []
    sink = logger.add(lambda m: warnings.append(str(m)), level="WARNING", format="{message}")
    try:
        node = await forge_node(modules=["worker_jobs"],
                                config=worker_config(heartbeat_interval=0.05, concurrency=20, prefetch=40))
        queue = JobQueue(node.pool)
        rnd = random.Random(17)
        loop = asyncio.get_running_loop()
        until = loop.time() + 4.0
        stored = 0
        while loop.time() < until:
            if await node.pool.fetchval("SELECT count(*) FROM forge_jobs WHERE status = 'pending'") < 400:
                await queue.enqueue_many([queue.request(worker_jobs.nap, {"seconds": rnd.random() * 0.004})
                                          for _ in range(200)])
                stored += 200
            await asyncio.sleep(0.01)

        async def drained():
            return await node.pool.fetchval("SELECT count(*) = 0 FROM forge_jobs") or None

        await eventually(drained, what="every job done")
        assert stored >= 1000
        assert not [w for w in warnings if "deadlock" in w.lower()], warnings
        await asyncio.sleep(1.2)  # backends report their counters at most once a second
        conn = await asyncpg.connect(forge_db_url)
        try:
            assert await conn.fetchval("SELECT deadlocks FROM pg_stat_database WHERE datname = current_database()") == 0
        finally:
            await conn.close()
    finally:
        logger.remove(sink)


async def test_renewals_write_only_leases_past_half_and_still_see_cancels_and_losses(forge_node):
    """A lease is renewed once it would be past half its length by the next heartbeat, not every
    heartbeat; the other rows held are read each heartbeat, so a cancellation whose NOTIFY never came
    and a lease lost elsewhere are still seen without any row being written."""
    node = await forge_node(modules=["worker_jobs"], config=worker_config(concurrency=2, prefetch=0, lease=30.0))
    queue = JobQueue(node.pool)
    cancelled, lost = await queue.enqueue_many([queue.request(worker_jobs.sleepy, {"seconds": 60}),
                                                queue.request(worker_jobs.sleepy, {"seconds": 60})])

    async def both_running():
        running = node.worker.running
        return all(i in running and running[i].task is not None for i in (cancelled, lost)) or None

    await eventually(both_running, what="both jobs to run on the node")
    leases = {r["id"]: r["lease_until"] for r in await node.pool.fetch(
        "SELECT id, lease_until FROM forge_jobs WHERE id = ANY($1::bigint[])", [cancelled, lost])}
    await asyncio.sleep(0.5)  # five heartbeats
    assert {r["id"]: r["lease_until"] for r in await node.pool.fetch(
        "SELECT id, lease_until FROM forge_jobs WHERE id = ANY($1::bigint[])", [cancelled, lost])} == leases
    assert node.worker.stats["leases_renewed"] == 0
    # no NOTIFY: only the heartbeat's read can see these
    await node.pool.execute("UPDATE forge_jobs SET cancel_requested = true WHERE id = $1", cancelled)
    await node.pool.execute("UPDATE forge_jobs SET node_id = 'another-node' WHERE id = $1", lost)
    done = await eventually(lambda: _hist(node.pool, cancelled), what="the cancel to be seen")
    assert done.status == "cancelled"

    async def dropped():
        return lost not in node.worker.running or None

    await eventually(dropped, what="the lost lease to be seen")
    assert node.worker.stats["lost"] == 1
    assert await node.pool.fetchval("SELECT node_id FROM forge_jobs WHERE id = $1", lost) == "another-node"


async def test_a_job_outliving_its_lease_keeps_it(forge_node):
    """A job running past several lease lengths has its lease renewed before half of it is left, so
    no rescue (every 0.5 s here) takes it: it runs once."""
    node = await forge_node(modules=["worker_jobs"], config=worker_config(lease=1.0))
    queue = JobQueue(node.pool)
    job_id = await queue.enqueue(worker_jobs.sleepy, {"seconds": 2.5})
    done = await eventually(lambda: _hist(node.pool, job_id), what="the long job to finish")
    assert done.status == "succeeded" and done.attempt == 1
    assert len(await log_rows(node.pool, event="ran")) == 1
    assert node.worker.stats["leases_renewed"] >= 1


async def test_a_job_starts_with_none_of_the_context_of_the_job_before_it(forge_node):
    """A job claimed ahead is started from the task of the job whose slot it takes; what that job
    set in its context (a context variable of the app, a span it left open) is not the next job's.
    One slot, three jobs claimed at once: each sees the default."""
    node = await forge_node(modules=["worker_jobs"], config=worker_config(concurrency=1, prefetch=4))
    queue = JobQueue(node.pool)
    ids = await queue.enqueue_many([queue.request(worker_jobs.set_tenant, {"value": f"tenant {i}"}) for i in range(3)])
    seen = await eventually(lambda: _all_saw(node.pool, ids), what="the three jobs to run")
    assert seen == [None, None, None]
    assert node.worker.stats["claimed"] >= 2  # some were claimed ahead (started from another job's task)


async def _all_saw(pool, ids):
    rows = await pool.fetch("SELECT job_id, value FROM job_log WHERE event = 'saw' AND job_id = ANY($1::bigint[]) "
                            "ORDER BY seq", ids)
    return [r["value"] for r in rows] if len(rows) == len(ids) else None


async def test_a_cancelled_error_from_the_jobs_own_code_fails_the_attempt(forge_node):
    """A job awaiting a future that something else cancelled gets CancelledError while the worker
    did not cancel it: the attempt fails and is retried like any exception, and the row is not held
    (re-raised, it was never reported nor freed: its lease was renewed forever and it never ran again)."""
    node = await forge_node(modules=["worker_jobs"], config=worker_config())
    queue = JobQueue(node.pool)
    job_id = await queue.enqueue(worker_jobs.awaits_a_cancelled_future, {})
    dead = await eventually(lambda: _dead(queue, 1), what="the job to fail its two attempts")
    assert dead[0].id == job_id and dead[0].attempt == 2
    assert "CancelledError" in dead[0].last_error
    assert len(await log_rows(node.pool, job_id=job_id, event="attempt")) == 2
    assert job_id not in node.worker.running
