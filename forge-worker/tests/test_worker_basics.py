"""Enqueue paths, running, results, history."""

from __future__ import annotations

import datetime as dt
import json
import zoneinfo

import asyncpg
import attrs
import pytest

from forge_kernel import SYSTEM
from forge_kernel.errors import InvalidArgument
from forge_worker import JobQueue, enqueue
from forge_worker.runtime import DEFAULT_PREFETCH_MAX_FACTOR

from worker_helpers import eventually, log_rows, worker_config

import worker_jobs


async def test_enqueue_from_plain_python_runs_on_worker(forge_node):
    node = await forge_node(modules=["worker_jobs"], config=worker_config())
    queue = JobQueue(node.pool)
    job_id = await queue.enqueue(worker_jobs.record, {"value": "hello"})
    rows = await eventually(lambda: log_rows(node.pool, job_id=job_id), what="the job to run")
    assert [(r["event"], r["value"], r["attempt"]) for r in rows] == [("ran", "hello", 1)]
    done = await eventually(lambda: _status(queue, job_id, "succeeded"), what="history row")
    assert done.attempt == 1 and done.node_id == node.id


async def _status(queue, job_id, status):
    job = await queue.get(job_id)
    return job if job is not None and job.status == status else None


async def test_enqueue_many_in_one_call_keeps_order(forge_node):
    node = await forge_node(modules=["worker_jobs"], config=worker_config(concurrency=20))
    queue = JobQueue(node.pool)
    reqs = [queue.request(worker_jobs.record, {"value": str(i)}) for i in range(3000)]
    ids = await queue.enqueue_many(reqs)
    assert len(ids) == 3000 and ids == sorted(ids) and len(set(ids)) == 3000
    await eventually(lambda: _count(node.pool, "SELECT count(*) FROM job_log WHERE event = 'ran'", 3000),
                     timeout=60, what="3000 jobs")
    by_id = {r["job_id"]: r["value"] for r in await log_rows(node.pool)}
    assert all(by_id[job_id] == str(i) for i, job_id in enumerate(ids))
    # hot table empty once the results are reported (in batches, a moment after the jobs ran)
    await eventually(lambda: _count_is(node.pool, "SELECT count(*) FROM forge_jobs", 0), timeout=30,
                     what="the hot table to empty")


async def _count_is(pool, sql, expected):
    return await pool.fetchval(sql) == expected


async def _count(pool, sql, expected):
    n = await pool.fetchval(sql)
    return n if n == expected else None


async def test_dispatch_in_mutation_commits_with_it(forge_node):
    node = await forge_node(modules=["worker_jobs"], config=worker_config())
    job_id = await node.executor.call("add_item", {"id": 1, "title": "a"}, SYSTEM)
    assert job_id > 0
    with pytest.raises(Exception):
        await node.executor.call("add_item", {"id": 2, "title": "b", "fail": True}, SYSTEM)
    await eventually(lambda: log_rows(node.pool, job_id=job_id), what="the committed job")
    jobs = await node.pool.fetch("SELECT args FROM forge_jobs UNION ALL SELECT args FROM forge_job_history")
    assert [j["args"] for j in jobs] == [{"value": "item-1"}]  # the rolled-back mutation left no job
    rows = await log_rows(node.pool)
    assert [r["value"] for r in rows] == ["item-1"]


async def test_dispatch_from_action_and_from_job(forge_node):
    node = await forge_node(modules=["worker_jobs"], config=worker_config())
    await node.executor.call("dispatch_from_action", {"value": "from-action"}, SYSTEM)
    await JobQueue(node.pool).enqueue("fan_out", {"n": 3})
    await eventually(lambda: _count(node.pool, "SELECT count(*) FROM job_log WHERE event = 'ran'", 5), what="5 runs")
    values = sorted(r["value"] for r in await log_rows(node.pool, event="ran") if r["value"])
    assert values == ["child-0", "child-1", "child-2", "from-action"]


async def test_dispatcher_works_on_node_without_worker_role(forge_node):
    gw = await forge_node(modules=["worker_jobs"], config={"node": {"roles": ["worker"]},
                                                           "worker": {"concurrency": 1}})
    # a second node that does not run the worker role still stores jobs through ctx.dispatch
    other = await forge_node(modules=["worker_jobs"], config={"node": {"roles": ["realtime"]}})
    assert "worker" not in other.roles
    job_id = await other.executor.call("add_item", {"id": 7, "title": "x"}, SYSTEM)
    await eventually(lambda: log_rows(gw.pool, job_id=job_id), what="the job to run on the worker node")


async def test_bad_enqueue_input_is_rejected_clearly(forge_node):
    node = await forge_node(modules=["worker_jobs"], config=worker_config())
    queue = JobQueue(node.pool)
    with pytest.raises(InvalidArgument, match="value"):
        await queue.enqueue(worker_jobs.record, {"nope": 1})
    with pytest.raises(InvalidArgument, match="unknown job option"):
        await queue.enqueue("record", {"value": "x"}, colour="red")
    with pytest.raises(InvalidArgument, match="on_conflict"):
        await queue.enqueue("record", {"value": "x"}, unique_key="k", on_conflict="merge")
    with pytest.raises(InvalidArgument, match="JSON"):
        await queue.enqueue("record", {"value": object()})
    with pytest.raises(InvalidArgument, match="whole numbers from 1 to 9223372036854775807, got -3"):
        await queue.get(-3)
    with pytest.raises(InvalidArgument, match="got 9223372036854775808"):  # past BIGINT: never sent to PostgreSQL
        await queue.cancel(2**63)


async def test_enqueue_input_postgresql_cannot_store_is_rejected_naming_the_job_and_field(forge_node):
    """Each of these once reached PostgreSQL (or Python's datetime arithmetic) and failed there with an
    error naming neither the job nor the field, or an AttributeError from building the batch's literals."""
    node = await forge_node(modules=["worker_jobs"], config={"node": {"roles": ["realtime"]}})
    queue = JobQueue(node.pool)
    bad = {"capability must be a string or None, got 5": dict(capability=5),
           "unique_key must be a string or None, got 5": dict(unique_key=5),
           "caller must be a string or None, got 5": dict(caller=5),
           "queue contains a NUL character": dict(queue="a\x00b"),
           "caller contains a NUL character": dict(caller="a\x00b"),
           "unique_key contains a NUL character": dict(unique_key="a\x00b"),
           "capability contains a NUL character": dict(capability="a\x00b"),
           "caller contains a lone surrogate": dict(caller="a\ud800b"),
           "queue contains a lone surrogate": dict(queue="\udfffé"),
           "timeout must be a positive number of seconds": dict(timeout=10**400),
           "run_at must fall within the years 1 to 9999 in UTC": dict(
               run_at=dt.datetime(9999, 12, 31, 23, tzinfo=dt.timezone(dt.timedelta(hours=-5))))}
    for message, fields in bad.items():
        requests = [queue.request("record", {"value": "fine"}), queue.request("record", {"value": "x"}, **fields)]
        with pytest.raises(InvalidArgument, match=f"job 'record': {message}"):
            await queue.enqueue_many(requests)
    for what in ("args", "options"):
        request = attrs.evolve(queue.request("record", {"value": "x"}), **{what: {"value": float("nan")}})
        with pytest.raises(InvalidArgument, match=f"job 'record': {what} must be JSON-safe text"):
            await queue.enqueue_many([request])
    with pytest.raises(InvalidArgument, match="name contains a NUL character"):
        await queue.enqueue_many([attrs.evolve(queue.request("record", {"value": "x"}), name="rec\x00ord")])
    assert await node.pool.fetchval("SELECT count(*) FROM forge_jobs") == 0


async def test_run_at_in_the_repeated_hour_keeps_its_fold(forge_node):
    """01:30 on the night clocks go back happens twice (fold 0 and 1): the two compare equal in Python
    (one zone: wall time, fold ignored), yet each job is stored at its own instant."""
    node = await forge_node(modules=["worker_jobs"], config={"node": {"roles": ["realtime"]}})
    queue = JobQueue(node.pool)
    new_york = zoneinfo.ZoneInfo("America/New_York")
    first, second = (dt.datetime(2030, 11, 3, 1, 30, tzinfo=new_york, fold=fold) for fold in (0, 1))
    assert first == second and first.utcoffset() != second.utcoffset()
    for batch in ([first, second], [second, first]):
        ids = await queue.enqueue_many([queue.request("record", {"value": "x"}, run_at=when) for when in batch])
        stored = {r["id"]: r["run_at"] for r in await node.pool.fetch(
            "SELECT id, run_at FROM forge_jobs WHERE id = ANY($1::bigint[])", ids)}
        assert [stored[i] for i in ids] == [when.astimezone(dt.timezone.utc) for when in batch]


async def test_plain_asyncpg_pool_without_forge_codecs(forge_node):
    node = await forge_node(modules=["worker_jobs"], config=worker_config())
    pool = await asyncpg.create_pool(node.url, min_size=1, max_size=2)
    try:
        queue = JobQueue(pool)
        job_id = await enqueue(pool, "record", {"value": "raw"})
        await eventually(lambda: log_rows(node.pool, job_id=job_id), what="the job")
        info = await eventually(lambda: _status(queue, job_id, "succeeded"), what="history")
        assert info.args == {"value": "raw"}
    finally:
        await pool.close()


async def test_a_backlog_is_written_and_claimed_by_two_statements_in_flight(forge_node):
    """With ``claim_lanes = 2``, under a backlog a second connection sends the result-and-claim
    statement while the claim loop's waits for its commit (Worker._second_lane): statements
    overlap, and every job still runs exactly once, with its result written once."""
    node = await forge_node(modules=["worker_jobs"], config=worker_config(claim_lanes=2))
    queue = JobQueue(node.pool)
    ids = await queue.enqueue_many([queue.request(worker_jobs.noop) for _ in range(4000)])
    await eventually(lambda: _count_is(node.pool, "SELECT count(*) FROM forge_jobs", 0), timeout=120,
                     what="4000 jobs run and written")
    stats = node.worker.stats
    assert stats["overlapped"] > 0, stats
    assert stats["claimed"] == 4000 and stats["succeeded"] == 4000, stats
    hist = await node.pool.fetch("SELECT id, attempt FROM forge_job_history WHERE id = ANY($1::bigint[])", ids)
    assert sorted(r["id"] for r in hist) == sorted(ids) and {r["attempt"] for r in hist} == {1}


@pytest.mark.parametrize("settings, floor, ceiling", [({}, 20, DEFAULT_PREFETCH_MAX_FACTOR * 10),
                                                     ({"prefetch": 20}, 20, 20),
                                                     ({"prefetch": 5, "prefetch_max": 30}, 5, 30)])
async def test_the_reserve_grows_under_a_backlog_within_its_bound_and_shrinks_when_it_drains(
        forge_node, settings, floor, ceiling):
    """The jobs claimed ahead grow from ``prefetch`` towards ``prefetch_max`` while claims come back
    full and the slots waited for them (a backlog of no-op jobs), never past it (the rows a node
    holds stay within ``concurrency + prefetch_max``), and go back to ``prefetch`` once a claim
    finds fewer jobs than it asked for. A fixed ``prefetch`` (``prefetch_max`` unset) stays fixed."""
    concurrency = 10
    node = await forge_node(modules=["worker_jobs"], config=worker_config(concurrency=concurrency, **settings))
    worker = node.worker
    assert worker.prefetch == floor
    queue = JobQueue(node.pool)
    most_held = 0

    async def drained():
        nonlocal most_held
        most_held = max(most_held, await node.pool.fetchval(
            "SELECT count(*) FROM forge_jobs WHERE status = 'running' AND node_id = $1", node.id))
        return await _count_is(node.pool, "SELECT count(*) FROM forge_jobs", 0)

    await queue.enqueue_many([queue.request(worker_jobs.noop) for _ in range(3000)])
    await eventually(drained, timeout=120, what="3000 jobs run and written")
    stats = worker.stats
    assert stats["claimed"] == 3000 and stats["succeeded"] == 3000, stats
    assert stats["prefetch_peak"] == ceiling, stats  # grown all the way (no-op jobs: every round trip starves)
    assert most_held <= concurrency + ceiling, most_held

    async def shrunk():
        return worker.prefetch == floor

    await eventually(shrunk, what="the reserve back at prefetch")


async def test_a_reserve_grown_on_short_jobs_goes_back_when_the_backlog_turns_into_long_ones(forge_node):
    """A backlog of no-op jobs grows the reserve; when the jobs behind them outlast a round trip
    (most of the jobs claimed ahead still wait when a claim comes back), it goes back to
    ``prefetch`` while claims still come back full, so a node does not keep a large reserve of
    long jobs from other nodes (and later higher-priority jobs waiting behind it)."""
    concurrency = 10
    node = await forge_node(modules=["worker_jobs"], config=worker_config(concurrency=concurrency))
    worker = node.worker
    floor = worker.prefetch
    queue = JobQueue(node.pool)
    await queue.enqueue_many([queue.request(worker_jobs.noop) for _ in range(3000)]
                             + [queue.request(worker_jobs.sleepy, {"seconds": 0.05}) for _ in range(1000)])

    async def grown_then_back_with_a_backlog():
        pending = await node.pool.fetchval("SELECT count(*) FROM forge_jobs WHERE status = 'pending'")
        return worker.stats["prefetch_peak"] > floor and worker.prefetch == floor and pending > 100

    await eventually(grown_then_back_with_a_backlog, timeout=120,
                     what="the reserve back at prefetch while long jobs are still pending")

    async def holds_less_with_a_backlog():  # what the node holds follows the reserve down
        held = await node.pool.fetchval("SELECT count(*) FROM forge_jobs WHERE status = 'running' AND node_id = $1",
                                        node.id)
        pending = await node.pool.fetchval("SELECT count(*) FROM forge_jobs WHERE status = 'pending'")
        return held <= concurrency + floor and pending > 0

    await eventually(holds_less_with_a_backlog, timeout=30, what="the rows held back within concurrency + prefetch")


# array-literal syntax (quotes, backslashes, braces, commas, NULL) and text beyond it
AWKWARD = ['say "hi"', "back\\slash \\\"both\\\\", "{braces,commas}", "NULL", "", "line\nbreak\ttab",
           "ünïcödé ✓ 🚀", "trailing \\"]


async def test_every_column_of_a_batch_is_stored_exactly(forge_node):
    """A batch goes to PostgreSQL as one array literal per column (queue._literal), a column holding one
    value throughout as that value repeated: awkward text, NULLs beside values and mixed columns arrive
    unchanged, in both the plain and the unique-key statement."""
    from forge_kernel import Auth

    node = await forge_node(modules=["worker_jobs"], config={"node": {"roles": ["realtime"]}})  # stored, never run
    queue = JobQueue(node.pool)
    later = dt.datetime(2030, 1, 2, 3, 4, 5, 678901, tzinfo=dt.timezone(dt.timedelta(hours=-5, minutes=-30)))
    ann = Auth.for_user("ann \"quoted\" \\ {x,y}", roles=["b", "a"])
    mixed = [queue.request("record", {"value": m}, queue=m or "q", priority=-i, max_attempts=i + 1, caller=m,
                           timeout=None if i % 2 else 0.25 * (i + 1), capability=None if i % 3 else m,
                           run_at=None if i % 2 else later, run_as=None if i % 2 else ann,
                           unique_key=None if i % 4 else f"k{m}")
             for i, m in enumerate(AWKWARD)]
    uniform = [queue.request("record", {"value": "same"}, queue="u", caller="c", timeout=1e-05) for _ in range(5)]
    for requests in (mixed, mixed[1:2] + mixed[3:], uniform):
        ids = await queue.enqueue_many(requests)
        rows = {r["id"]: r for r in await node.pool.fetch(
            "SELECT id, name, args::text, queue, priority, max_attempts, caller, timeout, capability, run_at, run_as::text,"
            " unique_key, status FROM forge_jobs WHERE id = ANY($1::bigint[])", ids)}
        for job_id, req in zip(ids, requests):
            row = rows[job_id]
            assert (row["name"], json.loads(row["args"]), row["queue"], row["priority"], row["max_attempts"],
                    row["caller"], row["timeout"], row["capability"], row["unique_key"]) == \
                (req.name, req.args, req.queue, req.priority, req.max_attempts, req.caller, req.timeout,
                 req.capability, req.unique_key)
            assert json.loads(row["run_as"]) == req.run_as
            if req.run_at is not None:
                assert row["run_at"] == later and row["status"] == "scheduled"
            else:
                assert row["status"] == "pending"
        await node.pool.execute("DELETE FROM forge_jobs")


async def test_a_nul_character_or_a_huge_error_text_holds_up_no_result(forge_node):
    """PostgreSQL's text holds no NUL: a job failing with one in its message made the statement that
    writes the whole batch of results fail on every try, so no result of the node was written again.
    It is stored as U+FFFD; a runaway message is cut with a marker; the other results of the batch
    are written as they are."""
    from forge_worker.runtime import MAX_ERROR_TEXT

    node = await forge_node(modules=["worker_jobs"], config=worker_config())
    queue = JobQueue(node.pool)
    ids = await queue.enqueue_many([queue.request(worker_jobs.fails_with_nul_or_size, {"message": "a<NUL>b"}),
                                    queue.request(worker_jobs.fails_with_nul_or_size, {"message": "big", "size": 10**6}),
                                    queue.request(worker_jobs.fails_with, {"message": "plain"})])
    await eventually(lambda: _count(node.pool, "SELECT count(*) FROM forge_jobs WHERE status = 'dead'", len(ids)),
                     timeout=60, what="the failing jobs dead-lettered")
    errors = {r["id"]: r["last_error"] for r in await node.pool.fetch(
        "SELECT id, last_error FROM forge_jobs WHERE id = ANY($1::bigint[])", ids)}
    assert errors[ids[0]].startswith("RuntimeError: a\ufffdb\n")
    assert len(errors[ids[1]]) < MAX_ERROR_TEXT + 100 and errors[ids[1]].endswith("characters]")
    assert errors[ids[1]].startswith("RuntimeError: bigxxx") and "…[cut " in errors[ids[1]]
    assert errors[ids[2]].startswith("RuntimeError: plain\n")


async def test_error_texts_of_a_batch_are_written_exactly(forge_node):
    """Results go to PostgreSQL as array literals in one text value (runtime._text_array): error
    texts with the literal's own syntax in them reach last_error unchanged."""
    node = await forge_node(modules=["worker_jobs"], config=worker_config())
    queue = JobQueue(node.pool)
    ids = await queue.enqueue_many([queue.request(worker_jobs.fails_with, {"message": m}) for m in AWKWARD])
    await eventually(lambda: _count(node.pool, "SELECT count(*) FROM forge_jobs WHERE status = 'dead'", len(ids)),
                     timeout=60, what="the failing jobs dead-lettered")
    errors = {r["id"]: r["last_error"] for r in await node.pool.fetch(
        "SELECT id, last_error FROM forge_jobs WHERE id = ANY($1::bigint[])", ids)}
    for job_id, message in zip(ids, AWKWARD):
        assert errors[job_id].startswith(f"RuntimeError: {message}\n"), (message, errors[job_id])


async def test_a_finished_job_is_freed_without_the_cyclic_collector(forge_node):
    """A job's call and its ctx point at each other; the worker cuts that as the job ends, so the
    job's objects (ctx, its database, the attempt, its task and row) go by reference counting. With
    the collector off, none of 300 finished jobs' contexts is left in memory (each used to wait for
    a young collection: most of the worker's garbage-collection time per job)."""
    import gc

    from forge_worker.context import JobContext

    node = await forge_node(modules=["worker_jobs"], config=worker_config(concurrency=10))
    queue = JobQueue(node.pool)

    def contexts() -> int:
        return sum(1 for o in gc.get_objects() if type(o) is JobContext)

    gc.collect()
    gc.disable()
    try:
        await queue.enqueue_many([queue.request(worker_jobs.noop) for _ in range(300)])
        await eventually(lambda: _count_is(node.pool, "SELECT count(*) FROM forge_jobs", 0), timeout=30,
                         what="the jobs to run")
        assert contexts() == 0
    finally:
        gc.enable()
