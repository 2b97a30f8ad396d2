"""Live queries end to end: a node with the gateway serving /ws, clients over real sockets."""

from __future__ import annotations

import asyncio

import websockets

from rt_helpers import realtime, settled, token, ws_connect, ws_url
from rt_helpers import rt_node  # noqa: F401 - pytest fixtures


def query_of(node, function):
    return [q for q in realtime(node).engine.queries.values() if q.function == function]


async def test_subscribe_gets_result_then_updates_and_ignores_other_owners(rt_node):
    node = await rt_node()
    async with ws_connect(ws_url(node), token("alice")) as c:
        await c.send({"type": "subscribe", "id": "mine", "function": "my_items"})
        first = await c.recv()
        assert first["type"] == "data" and first["id"] == "mine" and first["data"] == []
        await node.executor.call("add_item", {"owner": "alice", "title": "x"})
        second = await c.recv()
        assert [i["title"] for i in second["data"]] == ["x"]
        assert second["position"] >= first["position"] and second["hash"] != first["hash"]
        [q] = query_of(node, "my_items")
        # the result with "x" may come from a run that started before the reader saw x's change,
        # which then runs the query once more (same result, nothing pushed): count after that
        await settled(node)
        runs = q.runs
        # a write to another owner's rows re-runs nothing and pushes nothing
        for i in range(5):
            await node.executor.call("add_item", {"owner": "bob", "title": f"b{i}"})
        await settled(node)
        assert q.runs == runs
        await c.nothing(0.3)


async def test_rows_moving_out_of_and_into_a_result_are_seen(rt_node):
    node = await rt_node()
    item = await node.executor.call("add_item", {"owner": "alice", "title": "x"})
    async with ws_connect(ws_url(node)) as c:
        await c.send({"type": "subscribe", "id": "a", "function": "items_of", "args": {"owner": "alice"}})
        await c.send({"type": "subscribe", "id": "b", "function": "items_of", "args": {"owner": "bob"}})
        got = {m["id"]: m for m in [await c.recv(), await c.recv()]}
        assert len(got["a"]["data"]) == 1 and got["b"]["data"] == []
        async with node.pool.acquire() as conn:
            await conn.execute("UPDATE rt_items SET owner = 'bob' WHERE id = $1", item["id"])
        got = {m["id"]: m for m in [await c.recv(), await c.recv()]}
        assert got["a"]["data"] == [] and [i["owner"] for i in got["b"]["data"]] == ["bob"]


async def test_one_execution_per_function_args_and_scope(rt_node):
    node = await rt_node()
    url = ws_url(node)
    async with ws_connect(url, token("alice")) as a1, ws_connect(url, token("alice")) as a2, \
            ws_connect(url, token("bob")) as b1, ws_connect(url) as anon:
        for c in (a1, a2, b1):
            await c.send({"type": "subscribe", "id": "m", "function": "my_items"})
            await c.send({"type": "subscribe", "id": "p", "function": "items_of", "args": {"owner": "alice"}})
            assert {(await c.recv())["id"], (await c.recv())["id"]} == {"m", "p"}
        await anon.send({"type": "subscribe", "id": "p", "function": "items_of", "args": {"owner": "alice"}})
        assert (await anon.recv())["type"] == "data"
        await settled(node)
        # my_items reads ctx.auth: one execution per caller; items_of does not: one for everybody
        assert sorted(q.key[2] for q in query_of(node, "my_items")) == ["user:alice", "user:bob"]
        [shared] = query_of(node, "items_of")
        assert shared.key[2] == "*" and len(shared.subscriptions) == 4
        runs = shared.runs
        await node.executor.call("add_item", {"owner": "alice", "title": "x"})
        for c in (a1, a2, b1, anon):
            msg = await c.recv_type("data")
            if msg["id"] == "p":
                assert [i["title"] for i in msg["data"]] == ["x"]
        await settled(node)
        assert shared.runs == runs + 1


async def test_auth_holds_each_caller_sees_only_its_rows(rt_node):
    node = await rt_node()
    await node.executor.call("add_item", {"owner": "alice", "title": "secret"})
    async with ws_connect(ws_url(node), token("bob")) as bob:
        await bob.send({"type": "subscribe", "id": "m", "function": "my_items"})
        assert (await bob.recv())["data"] == []
        await node.executor.call("add_item", {"owner": "alice", "title": "secret 2"})
        await node.executor.call("add_item", {"owner": "bob", "title": "mine"})
        msg = await bob.recv()
        assert [i["owner"] for i in msg["data"]] == ["bob"]


async def test_push_only_when_the_result_hash_changes(rt_node):
    node = await rt_node()
    a = await node.executor.call("add_item", {"owner": "alice", "title": "a", "n": 1})
    b = await node.executor.call("add_item", {"owner": "alice", "title": "b", "n": 2})
    async with ws_connect(ws_url(node)) as c:
        await c.send({"type": "subscribe", "id": "t", "function": "total_n", "args": {"owner": "alice"}})
        assert (await c.recv())["data"] == 3
        [q] = query_of(node, "total_n")
        runs = q.runs
        async with node.pool.acquire() as conn:  # swap the values: the sum stays 3
            await conn.execute("UPDATE rt_items SET n = CASE id WHEN $1 THEN 2 ELSE 1 END WHERE id IN ($1, $2)",
                               a["id"], b["id"])
        await settled(node)
        assert q.runs > runs  # it did re-run ...
        await c.nothing(0.3)  # ... but nothing was pushed
        await node.executor.call("set_n", {"id": a["id"], "n": 10})
        assert (await c.recv())["data"] == 11


async def test_resubscribe_with_last_hash_gets_unchanged(rt_node):
    node = await rt_node()
    async with ws_connect(ws_url(node)) as c:
        await c.send({"type": "subscribe", "id": "1", "function": "count_items"})
        first = await c.recv()
    async with ws_connect(ws_url(node)) as c:
        await c.send({"type": "subscribe", "id": "1", "function": "count_items", "hash": first["hash"]})
        msg = await c.recv()
        assert msg == {"type": "unchanged", "id": "1", "hash": first["hash"], "position": msg["position"]}
        await c.send({"type": "subscribe", "id": "2", "function": "count_items", "hash": "stale"})
        msg = await c.recv()
        assert msg["type"] == "data" and msg["data"] == 0


async def test_raw_sql_reads_the_whole_table(rt_node):
    node = await rt_node()
    async with ws_connect(ws_url(node)) as c:
        await c.send({"type": "subscribe", "id": "n", "function": "count_items"})
        assert (await c.recv())["data"] == 0
        await node.executor.call("add_item", {"owner": "zed", "title": "x"})
        assert (await c.recv())["data"] == 1


async def test_declared_reads_are_captured_at_start_up(rt_node):
    node = await rt_node()
    async with node.pool.acquire() as conn:
        assert await conn.fetchval("SELECT count(*) FROM forge_realtime_captures WHERE tbl = 'rt_notes'") == 1
    async with ws_connect(ws_url(node)) as c:
        await c.send({"type": "subscribe", "id": "n", "function": "note_count"})
        assert (await c.recv())["data"] == 0
        async with node.pool.acquire() as conn:
            await conn.execute("INSERT INTO rt_notes (body) VALUES ('hi')")
        assert (await c.recv())["data"] == 1


async def test_change_during_first_run_is_not_lost(rt_node):
    """The subscription is registered before its first result is computed: a change that commits
    after the query's snapshot but before the result is sent triggers another run."""
    node = await rt_node()
    rt = realtime(node)
    original = rt.engine.executor.call
    gate = asyncio.Event()

    async def slow_call(*a, **kw):  # the result is computed, then the write lands, then it is sent
        result = await original(*a, **kw)
        if not gate.is_set():
            gate.set()
            await node.executor.call("add_item", {"owner": "alice", "title": "late"})
            await settled_reader(node)
        return result

    rt.engine.executor = type("Slow", (), {"call": staticmethod(slow_call), "lookup": original.__self__.lookup,
                                           "authorize": original.__self__.authorize,
                                           "registry": original.__self__.registry})()
    async with ws_connect(ws_url(node)) as c:
        await c.send({"type": "subscribe", "id": "a", "function": "items_of", "args": {"owner": "alice"}})
        first = await c.recv()
        assert first["data"] == []
        second = await c.recv()
        assert [i["title"] for i in second["data"]] == ["late"]


async def settled_reader(node) -> None:
    """Wait for two complete polls: the second started after every earlier commit."""
    rt = realtime(node)
    start = rt.reader.polls
    while rt.reader.polls < start + 2:
        rt.reader.wake()
        await asyncio.sleep(0.01)


async def test_function_error_ends_only_that_subscription(rt_node):
    node = await rt_node()
    async with ws_connect(ws_url(node)) as c:
        await c.send({"type": "subscribe", "id": "bad", "function": "broken"})
        await c.send({"type": "subscribe", "id": "good", "function": "count_items"})
        got = {m["id"]: m for m in [await c.recv(), await c.recv()]}
        assert got["bad"]["type"] == "error" and got["bad"]["code"] == "INTERNAL"
        assert "boom" not in got["bad"]["message"]  # no internals leaked
        assert got["good"]["type"] == "data"
        await node.executor.call("add_item", {"owner": "a", "title": "x"})
        assert (await c.recv())["id"] == "good"


async def test_draining_node_closes_sockets_with_1001(rt_node):
    node = await rt_node()
    async with websockets.connect(ws_url(node)) as ws:
        await ws.send('{"type": "subscribe", "id": "a", "function": "count_items"}')
        await ws.recv()
        stop = asyncio.create_task(node.stop())
        try:
            await asyncio.wait_for(ws.recv(), 10)
        except websockets.ConnectionClosed as exc:
            assert exc.rcvd is not None and exc.rcvd.code == 1001
        else:
            raise AssertionError("socket stayed open while the node drained")
        await stop


async def test_a_shared_query_that_starts_reading_auth_is_split_per_caller(rt_node):
    node = await rt_node()
    url = ws_url(node)
    async with ws_connect(url, token("alice")) as alice, ws_connect(url, token("bob")) as bob:
        for c in (alice, bob):
            await c.send({"type": "subscribe", "id": "w", "function": "whoami_if_items"})
            assert (await c.recv())["data"] is None
        await settled(node)
        [shared] = query_of(node, "whoami_if_items")
        assert shared.key[2] == "*" and len(shared.subscriptions) == 2
        async with node.pool.acquire() as conn:
            await conn.execute("INSERT INTO rt_notes (body) VALUES ('x')")
        # never a result computed as the other caller
        assert (await alice.recv())["data"] == "alice"
        assert (await bob.recv())["data"] == "bob"
        await settled(node)
        assert sorted(q.key[2] for q in query_of(node, "whoami_if_items")) == ["user:alice", "user:bob"]


async def test_reader_reconnects_and_resyncs_after_losing_its_connection(rt_node):
    node = await rt_node()
    rt = realtime(node)
    async with ws_connect(ws_url(node)) as c:
        await c.send({"type": "subscribe", "id": "n", "function": "count_items"})
        assert (await c.recv())["data"] == 0
        async with node.pool.acquire() as conn:
            pids = await conn.fetch(
                "SELECT pid FROM pg_stat_activity WHERE datname = current_database() AND query LIKE '%pg_current_snapshot%' "
                "AND pid <> pg_backend_pid()")
            assert pids, "the change reader's connection was not found"
            for r in pids:
                await conn.execute("SELECT pg_terminate_backend($1)", r["pid"])
            # written while the reader is away: its reconnect re-runs every live query
            await conn.execute("INSERT INTO rt_items (owner, title) VALUES ('a', 'while away')")
        msg = await c.recv(timeout=20)
        assert msg["data"] == 1
        assert node.supervisor.records["realtime-changes"].crashes >= 1


class _Pushes:
    direct = None
    def __init__(self) -> None:
        self.data: dict[str, list] = {}

    def push(self, sub_id, message, kind) -> None:
        if kind == "data":
            self.data.setdefault(sub_id, []).append(__import__("json").loads(b"".join(message))["data"])

    def end(self, sub_id, error) -> None:
        raise AssertionError(f"{sub_id} ended: {error}")


async def test_a_query_whose_table_another_query_captured_meanwhile_runs_again(rt_node):
    """Two first runs at once on a table nobody captures yet: the held one's snapshot predates
    the triggers the other installs, so a write between the two is in no change log. It must
    run again (it once did not: the capture looked installed to it, and nothing re-ran it)."""
    from forge_kernel.executor import ANONYMOUS
    from forge_realtime.engine import Subscription

    node = await rt_node(max_concurrent_runs=2)
    rt = realtime(node)
    original = rt.engine.executor.call
    held, release = asyncio.Event(), asyncio.Event()

    async def gated(function, args, auth, **kw):
        result = await original(function, args, auth, **kw)
        if function == "count_items" and not held.is_set():  # computed from a snapshot, not yet handled
            held.set()
            await release.wait()
        return result

    rt.engine.executor = type("Gated", (), {"call": staticmethod(gated), "lookup": original.__self__.lookup,
                                            "authorize": original.__self__.authorize,
                                            "registry": original.__self__.registry})()
    pushes = _Pushes()
    counting = Subscription(pushes, "count", "count_items", {}, ANONYMOUS)
    rt.engine.subscribe(counting)
    await asyncio.wait_for(held.wait(), 10)
    assert not rt.capture.covers("rt_items", ())
    async with node.pool.acquire() as conn:  # no trigger on rt_items yet: this write is not logged
        await conn.execute("INSERT INTO rt_items (owner, title) VALUES ('x', 'unlogged')")
    listing = Subscription(pushes, "list", "items_of", {"owner": "x"}, ANONYMOUS)
    rt.engine.subscribe(listing)  # its first run installs the capture of rt_items
    for _ in range(500):
        if "list" in pushes.data:
            break
        await asyncio.sleep(0.02)
    assert rt.capture.covers("rt_items", ())
    release.set()
    await settled(node)
    assert pushes.data["count"][-1] == 1, pushes.data["count"]
    rt.engine.unsubscribe(counting)
    rt.engine.unsubscribe(listing)
