"""The kernel change this package made for speed: queries run on read-only sessions without BEGIN/COMMIT.

Checks the guarantees that must survive it: a query cannot write, not even after switching the
session default off (the pool's RESET ALL restores it for the next call), and mutations still write.
"""

from __future__ import annotations

import pytest

from forge_kernel import ANONYMOUS, ForgeError, model, mutation, query
from forge_kernel.app import Registry


@model(table="qp_rows")
class QpRow:
    id: int
    n: int


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


@query(public=True)
async def helpers_only(ctx) -> int:
    rows = await ctx.db.select(QpRow, n=1)
    return len(rows) + (await ctx.db.get(QpRow, 1) is not None)


@query(public=True)
async def switch_off_through_the_connection(ctx) -> int:
    # not ctx.db.execute: the connection itself, which the model helpers' bookkeeping does not see
    await ctx.db.conn.execute("SET default_transaction_read_only = off")
    rows = await ctx.db.select(QpRow, n=1)
    return len(rows)


@query(public=True)
async def plain_reads(ctx, n: int) -> int:
    rows = await ctx.db.fetch('SELECT "id", count(*) AS c FROM qp_rows WHERE n = $1 GROUP BY "id"', n)
    return len(rows) + await ctx.db.fetchval("SELECT coalesce(max(n), 0)::int FROM qp_rows WHERE id = ANY($1::int[])", [1])


@query(public=True)
async def switch_off_in_a_select(ctx) -> str:
    # a SELECT that changes its session: set_config(..., false) outlives the statement
    return await ctx.db.fetchval("SELECT set_config('default_transaction_read_only', 'off', false)")


@query(public=True)
async def lock_in_a_select(ctx) -> bool:
    return await ctx.db.fetchval("SELECT pg_try_advisory_lock(4242)")


@mutation(public=True)
async def write(ctx) -> int:
    return await ctx.db.fetchval("INSERT INTO qp_items (n) VALUES (2) RETURNING n")


def _registry() -> Registry:
    reg = Registry()
    for fn in (sneaky_write, switch_off_then_count, session_read_only, helpers_only, switch_off_through_the_connection,
               plain_reads, switch_off_in_a_select, lock_in_a_select, write):
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


async def _one_logged_query_connection(forge_node):
    """A node whose query pool has one connection (every query gets it), with qp_rows holding
    (1, 1); returns the node, that connection's reset query and the list its statements go to."""
    node = await forge_node(registry=_registry(), config={"node": {"roles": ["function"]},
                                                         "database": {"pool_min": 1, "pool_max": 1}})
    await node.pool.execute("CREATE TABLE qp_rows (id integer PRIMARY KEY, n integer NOT NULL)")
    await node.pool.execute("INSERT INTO qp_rows VALUES (1, 1)")
    statements: list[str] = []
    async with node.query_pool.acquire() as conn:
        reset = conn.get_reset_query()
        conn.add_query_logger(lambda record: statements.append(record.query))
    return node, reset, statements


async def test_only_sessions_a_query_could_have_changed_are_reset(forge_node):
    """The reset on release is a round trip per query: it is skipped when only the model helpers
    ran, and kept for raw SQL and for anything sent through ``ctx.db.conn``."""
    node, reset, statements = await _one_logged_query_connection(forge_node)

    statements.clear()
    assert await node.executor.call("helpers_only", {}, ANONYMOUS) == 2
    assert len(statements) == 2 and reset not in statements, statements

    statements.clear()
    assert await node.executor.call("session_read_only", {}, ANONYMOUS) == "on"  # raw SQL
    assert statements[-1] == reset

    statements.clear()
    assert await node.executor.call("switch_off_through_the_connection", {}, ANONYMOUS) == 1
    assert statements[-1] == reset
    assert await node.executor.call("session_read_only", {}, ANONYMOUS) == "on"
    with pytest.raises(ForgeError):
        await node.executor.call("sneaky_write", {}, ANONYMOUS)


async def test_plain_reads_skip_the_reset_and_selects_that_change_the_session_do_not(forge_node):
    """Raw SQL that is one plain read (built-in functions only) returns its connection without the
    reset; a SELECT calling set_config(..., false) or taking an advisory lock is reset, so the next
    query on that very connection is read-only and holds no lock."""
    node, reset, statements = await _one_logged_query_connection(forge_node)
    await node.pool.execute("CREATE TABLE qp_items (n integer)")

    # the first call prepares its statements (and asyncpg looks the array type up, on the same
    # connection: more statements than the query's own, so that one is reset)
    assert await node.executor.call("plain_reads", {"n": 1}, ANONYMOUS) == 2
    statements.clear()
    assert await node.executor.call("plain_reads", {"n": 1}, ANONYMOUS) == 2
    assert len(statements) == 2 and reset not in statements, statements

    statements.clear()
    assert await node.executor.call("switch_off_in_a_select", {}, ANONYMOUS) == "off"
    assert statements[-1] == reset
    assert await node.executor.call("session_read_only", {}, ANONYMOUS) == "on"
    with pytest.raises(ForgeError):
        await node.executor.call("sneaky_write", {}, ANONYMOUS)

    statements.clear()
    assert await node.executor.call("lock_in_a_select", {}, ANONYMOUS) is True
    assert statements[-1] == reset
    assert await node.pool.fetchval("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND objid = 4242") == 0
