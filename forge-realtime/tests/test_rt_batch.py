"""Batched re-runs (``[realtime] batch_runs``, ``FunctionExecutor.batched``): queued re-runs of one
function share one round trip, and every result is still what a run of its own returns."""

from __future__ import annotations

import asyncio
import gc
import weakref

from forge_kernel.batch import QueryBatch, RefusedConnection, lateral_sql
from forge_kernel.db import Database
from forge_kernel.errors import Timeout

from rt_helpers import realtime, settled, ws_connect, ws_url
from rt_helpers import rt_node  # noqa: F401 - pytest fixtures

OWNERS = ["a", "b", "c", "d", "e", "o'q", "none"]


async def _seed(node) -> None:
    async with node.pool.acquire() as conn:
        await conn.executemany("INSERT INTO rt_items (owner, title, n) VALUES ($1, $2, $3)",
                               [(o, f"{o}-{i}", i) for o in OWNERS[:-1] for i in range(3)])


async def test_a_batch_of_select_queries_takes_one_round_trip_and_equals_runs_of_their_own(rt_node):
    node = await rt_node()
    await _seed(node)
    ex = node.executor
    alone = [await ex.call("items_of", {"owner": o}) for o in OWNERS]
    calls: list = []
    before = (ex.batch_stats.round_trips, ex.batch_stats.statements)
    batched = await ex.batched([lambda o=o: ex.call("items_of", {"owner": o}, track_reads=True, call_out=calls)
                                for o in OWNERS])
    assert batched == alone
    assert (ex.batch_stats.round_trips - before[0], ex.batch_stats.statements - before[1]) == (1, len(OWNERS))
    assert all(c.batchable for c in calls)
    assert [[(r.table, r.filters) for r in c.reads] for c in calls] == [[("rt_items", (("owner", o),))] for o in OWNERS]


async def test_selects_without_parameters_in_a_batch_run_once_for_all_of_them(rt_node):
    node = await rt_node()
    await _seed(node)
    ex = node.executor
    alone = await ex.call("all_items", {})
    before = (ex.batch_stats.round_trips, ex.batch_stats.statements)
    assert await ex.batched([lambda: ex.call("all_items", {})] * 3) == [alone] * 3
    assert (ex.batch_stats.round_trips - before[0], ex.batch_stats.statements - before[1]) == (1, 3)


async def test_a_query_that_does_more_than_select_runs_alone_even_if_it_swallows_the_refusal(rt_node):
    node = await rt_node()
    await _seed(node)
    ex = node.executor
    count = await ex.call("count_items", {})
    calls: list = []
    jobs = [lambda: ex.call("items_of", {"owner": "a"}, call_out=calls),
            lambda: ex.call("count_items", {}, call_out=calls),
            lambda: ex.call("careful_count", {}, call_out=calls),
            lambda: ex.call("items_of", {"owner": "b"}, call_out=calls)]
    a, counted, careful, b = await ex.batched(jobs)
    assert counted == careful == count == 18
    assert a == await ex.call("items_of", {"owner": "a"}) and b == await ex.call("items_of", {"owner": "b"})
    assert {c.defn.name: c.batchable for c in calls} == {"items_of": True, "count_items": False, "careful_count": False}


async def test_an_argument_the_type_refuses_fails_only_its_own_call(rt_node):
    node = await rt_node()
    ex = node.executor
    # a NUL byte is refused by PostgreSQL's text type: the batched statement fails, then each runs alone
    results = await ex.batched([lambda: ex.call("items_of", {"owner": "a"}),
                                lambda: ex.call("items_of", {"owner": "bad\x00"})])
    assert results[0] == [] and isinstance(results[1], Exception)


async def test_the_calls_of_a_batch_time_out_on_its_shared_timer_as_each_would_alone(rt_node):
    node = await rt_node()
    await _seed(node)
    ex = node.executor
    expected = await ex.call("items_of", {"owner": "b"})
    # the two slow calls start together with the same timeout (one timer); the third's deadline is
    # later than the batch's, so it keeps its own and is not cut short by theirs
    jobs = [lambda: ex.call("slow_items_of", {"owner": "a", "seconds": 30}, timeout=0.3),
            lambda: ex.call("slow_items_of", {"owner": "a", "seconds": 30}, timeout=0.3),
            lambda: ex.call("slow_items_of", {"owner": "b", "seconds": 0.5}, timeout=30)]
    first, second, third = await ex.batched(jobs)
    assert isinstance(first, Timeout) and isinstance(second, Timeout)
    assert "did not finish within 0.3s" in first.message
    assert third == expected


async def test_a_batch_that_finishes_in_time_leaves_no_timer_behind(rt_node):
    node = await rt_node()
    await _seed(node)
    ex = node.executor
    expected = await ex.call("items_of", {"owner": "c"})
    results = await ex.batched([lambda: ex.call("slow_items_of", {"owner": "c", "seconds": 0.05}, timeout=0.3)] * 3)
    assert results == [expected] * 3
    await asyncio.sleep(0.4)  # past the batch's deadline: nothing cancels this task now
    assert await ex.call("items_of", {"owner": "c"}) == expected


async def test_cancelling_a_batch_from_outside_is_a_cancellation_not_a_timeout(rt_node):
    node = await rt_node()
    ex = node.executor
    seen: list[BaseException] = []

    async def job():
        try:
            return await ex.call("slow_items_of", {"owner": "a", "seconds": 30}, timeout=30)
        except BaseException as exc:
            seen.append(exc)
            raise

    task = asyncio.ensure_future(ex.batched([job, job]))
    await asyncio.sleep(0.1)
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        pass
    assert len(seen) == 2 and all(isinstance(e, asyncio.CancelledError) for e in seen)


async def test_a_batched_run_leaves_nothing_for_the_cyclic_gc(rt_node):
    # each batched re-run used to leave its Database and RefusedConnection in a reference cycle (with
    # the read set and the batch's connection hanging off it): at thousands of re-runs a second that
    # garbage drove the node's collections, whose pauses were bench/realtime (b)'s p99
    node = await rt_node()
    await _seed(node)
    ex = node.executor
    jobs = [lambda o=o: ex.call("items_of", {"owner": o}, track_reads=True) for o in OWNERS]
    jobs.append(lambda: ex.call("careful_count", {}))  # refused inside the batch, runs alone again
    await ex.batched(jobs)  # warm: first-time caches and imports are not what is measured
    gc.collect()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        for _ in range(3):
            assert len(await ex.batched(jobs)) == len(OWNERS) + 1
        gc.collect()
        left = [type(o).__name__ for o in gc.garbage if isinstance(o, (Database, RefusedConnection))]
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
    assert left == []


def test_lateral_sql_keeps_each_argument_tuple_apart():
    sql = lateral_sql('SELECT * FROM "t" WHERE "a" = $1 AND "b" = $2 ORDER BY "id" DESC LIMIT 5',
                      ('"pg_catalog"."text"', '"pg_catalog"."int4"'))
    assert 'unnest($1::"pg_catalog"."text"[], $2::"pg_catalog"."int4"[]) WITH ORDINALITY' in sql
    assert '"a" = forge_batch_args.p1 AND "b" = forge_batch_args.p2' in sql and "$3" not in sql


async def test_queued_re_runs_of_one_function_run_as_a_batch_and_end_on_fresh_results(rt_node):
    node = await rt_node(max_concurrent_runs=1)
    rt = realtime(node)
    owners = [f"w{i}" for i in range(20)]
    async with ws_connect(ws_url(node)) as c:
        for o in owners:
            await c.send({"type": "subscribe", "id": o, "function": "items_of", "args": {"owner": o}})
        last = {}
        while len(last) < len(owners):
            msg = await c.recv_type("data")
            last[msg["id"]] = msg["data"]
        await settled(node)
        batches = rt.engine.stats.batches
        # one statement touching every owner: twenty queries invalidated by one change, queued behind one worker
        for round_ in range(3):
            async with node.pool.acquire() as conn:
                await conn.execute("INSERT INTO rt_items (owner, title, n) SELECT o, 'r' || $2::int, $2::int "
                                   "FROM unnest($1::text[]) o", owners, round_)
        await settled(node)

        async def drained() -> dict:
            while True:
                try:
                    msg = await c.recv(timeout=0.5)
                except asyncio.TimeoutError:
                    return last
                if msg["type"] == "data":
                    last[msg["id"]] = msg["data"]

        await drained()
        assert rt.engine.stats.batches > batches, "twenty queued re-runs of one function never ran as a batch"
        for o in owners:
            fresh = await node.executor.call("items_of", {"owner": o})
            assert last[o] == fresh and [i["title"] for i in fresh] == ["r0", "r1", "r2"]


async def test_a_batch_is_freed_when_it_ends_without_the_cyclic_gc(rt_node, monkeypatch):
    # the batch's shared timer ran in its calls' context, where the batch is the current one (BATCH), and
    # the batch kept the handle: a reference cycle per batch (with its connection proxies and the calls'
    # span, 13 objects) for the cyclic GC, and on asyncio's loop, whose cancelled handles keep their
    # context until their deadline, the batch stayed alive that long
    node = await rt_node()
    await _seed(node)
    ex = node.executor
    jobs = [lambda o=o: ex.call("items_of", {"owner": o}, track_reads=True) for o in OWNERS]
    await ex.batched(jobs)  # warm: first-time caches are not what is measured
    ended: list[weakref.ref] = []
    close = QueryBatch.close

    def closing(batch: QueryBatch) -> None:
        ended.append(weakref.ref(batch))
        close(batch)

    monkeypatch.setattr(QueryBatch, "close", closing)
    gc.disable()
    try:
        for _ in range(3):
            assert len(await ex.batched(jobs)) == len(OWNERS)
        for _ in range(100):  # callbacks of the batch's tasks, still to run, hold its context for a moment
            alive = sum(ref() is not None for ref in ended)
            if not alive:
                break
            await asyncio.sleep(0.01)
    finally:
        gc.enable()
    assert (len(ended), alive) == (3, 0)
