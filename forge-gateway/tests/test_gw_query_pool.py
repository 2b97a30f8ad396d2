"""The kernel change this package made for speed: queries run on read-only sessions without BEGIN/COMMIT.

Checks the guarantees that must survive it: a query cannot write, not even after switching the
session default off (the pool's RESET ALL restores it for the next call), and mutations still write.
"""

from __future__ import annotations

import pytest

from forge_kernel import ANONYMOUS, ForgeError, mutation, query
from forge_kernel.app import Registry


@query(public=True)
async def sneaky_write(ctx) -> int:
    return await ctx.db.fetchval("INSERT INTO qp_items (n) VALUES (1) RETURNING n")


@query(public=True)
async def switch_off_then_count(ctx) -> int:
    # a query that turns the session default off can write within its own call only
    await ctx.db.execute("SET default_transaction_read_only = off")
    return await ctx.db.fetchval("SELECT count(*) FROM qp_items")


@query(public=True)
async def session_read_only(ctx) -> str:
    return await ctx.db.fetchval("SHOW default_transaction_read_only")


@mutation(public=True)
async def write(ctx) -> int:
    return await ctx.db.fetchval("INSERT INTO qp_items (n) VALUES (2) RETURNING n")


def _registry() -> Registry:
    reg = Registry()
    for fn in (sneaky_write, switch_off_then_count, session_read_only, write):
        reg.add(fn.__forge__)
    return reg


async def test_queries_cannot_write_and_sessions_stay_read_only(forge_node):
    node = await forge_node(registry=_registry(), config={"node": {"roles": ["function"]},
                                                         "database": {"pool_min": 1, "pool_max": 1}})
    await node.pool.execute("CREATE TABLE qp_items (n integer)")
    assert node.executor.reads.primary.pool is node.query_pool and node.executor.reads.primary.readonly_sessions
    with pytest.raises(ForgeError) as info:
        await node.executor.call("sneaky_write", {}, ANONYMOUS)
    assert info.value.code == "INTERNAL" and "cannot write" in info.value.message
    assert await node.executor.call("write", {}, ANONYMOUS) == 2
    assert await node.executor.call("switch_off_then_count", {}, ANONYMOUS) == 1
    # pool_max = 1: the next query gets the very same connection, reset to read-only
    assert await node.executor.call("session_read_only", {}, ANONYMOUS) == "on"
    with pytest.raises(ForgeError):
        await node.executor.call("sneaky_write", {}, ANONYMOUS)
    assert await node.pool.fetchval("SELECT count(*) FROM qp_items") == 1
