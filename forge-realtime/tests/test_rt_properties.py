"""Hypothesis: random inserts, updates and deletes across owners, applied while subscribed.

Properties: every subscriber's last received result equals a fresh run of its query as that
subscriber, and no subscriber ever received a push whose result equals its previous one.
"""

from __future__ import annotations

import asyncio
import json

import asyncpg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rt_helpers import realtime, settled
from forge_kernel.executor import Auth
from forge_realtime.engine import Subscription
from rt_helpers import rt_node  # noqa: F401 - pytest fixtures

OWNERS = ["a", "b", "c"]

op = st.one_of(
    st.tuples(st.just("insert"), st.sampled_from(OWNERS), st.integers(0, 3)),
    st.tuples(st.just("update_n"), st.integers(0, 50), st.integers(0, 3)),
    st.tuples(st.just("move"), st.integers(0, 50), st.sampled_from(OWNERS)),
    st.tuples(st.just("delete"), st.integers(0, 50)),
    st.tuples(st.just("pause"), st.sampled_from([0.0, 0.002, 0.02])),
)
batches = st.lists(st.lists(op, min_size=1, max_size=4), min_size=1, max_size=12)


class Recorder:
    """A subscriber that remembers everything pushed to it."""
    direct = None

    def __init__(self) -> None:
        self.pushes: dict[str, list] = {}
        self.errors: dict[str, str] = {}

    def push(self, sub_id: str, message: tuple[bytes, ...], kind: str) -> None:
        msg = json.loads(b"".join(message))
        if kind == "data":
            self.pushes.setdefault(sub_id, []).append(msg["data"])

    def end(self, sub_id: str, error) -> None:
        self.errors[sub_id] = f"{error.code}: {error.message}"


@pytest.fixture
async def prop_node(rt_node):
    return await rt_node(max_concurrent_runs=3)


async def apply(conn, batch) -> None:
    for _ in range(20):  # concurrent batches may deadlock on each other's rows: retry, as an app would
        try:
            return await apply_once(conn, batch)
        except asyncpg.exceptions.DeadlockDetectedError:
            await asyncio.sleep(0.01)
    raise AssertionError("batch kept deadlocking")


async def apply_once(conn, batch) -> None:
    async with conn.transaction():
        for step in batch:
            kind = step[0]
            ids = [r[0] for r in await conn.fetch("SELECT id FROM rt_items ORDER BY id")]
            if kind == "insert":
                await conn.execute("INSERT INTO rt_items (owner, title, n) VALUES ($1, 't', $2)", step[1], step[2])
            elif kind == "pause":
                await asyncio.sleep(step[1])
            elif not ids:
                continue
            elif kind == "update_n":
                await conn.execute("UPDATE rt_items SET n = $2 WHERE id = $1", ids[step[1] % len(ids)], step[2])
            elif kind == "move":
                await conn.execute("UPDATE rt_items SET owner = $2 WHERE id = $1", ids[step[1] % len(ids)], step[2])
            elif kind == "delete":
                await conn.execute("DELETE FROM rt_items WHERE id = $1", ids[step[1] % len(ids)])


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(batches=batches, concurrent=st.booleans())
async def test_last_result_is_fresh_and_no_push_repeats(prop_node, batches, concurrent):
    node = prop_node
    engine = realtime(node).engine
    rec = Recorder()
    subs: list[Subscription] = []
    for owner in OWNERS:
        user = Auth(user_id=owner, kind="user")
        for function, args in [("items_of", {"owner": owner}), ("total_n", {"owner": owner}), ("my_items", {})]:
            for copy in range(2):  # two subscribers per query: they share one execution
                sub = Subscription(rec, f"{function}:{owner}:{copy}", function, args, user)
                subs.append(sub)
                engine.subscribe(sub)
    anon = Subscription(rec, "count", "count_items", {}, Auth())
    subs.append(anon)
    engine.subscribe(anon)
    try:
        if concurrent:  # batches from several connections at once: commits interleave
            async def run(part):
                async with node.pool.acquire() as conn:
                    for b in part:
                        await apply(conn, b)

            await asyncio.gather(*(run(batches[i::3]) for i in range(3)))
        else:
            async with node.pool.acquire() as conn:
                for b in batches:
                    await apply(conn, b)
        await settled(node)
        assert rec.errors == {}
        for sub in subs:
            got = rec.pushes.get(sub.sub_id)
            assert got, f"{sub.sub_id} received nothing"
            fresh = await node.executor.call(sub.function, sub.args, sub.auth)
            assert json.loads(json.dumps(fresh, default=str)) == got[-1], sub.sub_id
            for before, after in zip(got, got[1:]):
                assert before != after, f"{sub.sub_id} received an unchanged result"
    finally:
        for sub in subs:
            engine.unsubscribe(sub)
        async with node.pool.acquire() as conn:
            await conn.execute("DELETE FROM rt_items")
        await settled(node)
