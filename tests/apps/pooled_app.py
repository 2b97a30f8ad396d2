"""The app of tests/test_pooler.py: the key flows a cluster runs, through a pooler or not.

Orders dispatch a job in the mutation's transaction (outbox); ``slow`` runs long on its first
attempt (its worker is SIGKILLed mid-run) and finishes at once when rescued; ``tick`` is an
every-second cron; ``limited`` is rate limited cluster-wide; ``where`` tells which server a
query read (primary or replica). The cluster nodes also load ``pooled_workflow_app``.
"""

from __future__ import annotations

import asyncio

from forge_kernel import RateLimit, cron, job, model, mutation, query
from forge_kernel.migrations import Migration

MIGRATIONS = [Migration("pooled_app", 1, "orders", """
CREATE TABLE pa_orders (
    id     bigserial PRIMARY KEY,
    owner  text NOT NULL,
    item   text NOT NULL,
    status text NOT NULL DEFAULT 'new'
);
CREATE TABLE pa_log (
    id      bigserial PRIMARY KEY,
    event   text NOT NULL,
    ref     text,
    node    text NOT NULL,
    attempt integer,
    at      timestamptz NOT NULL DEFAULT clock_timestamp()
);
""")]


@model(table="pa_orders")
class Order:
    id: int | None
    owner: str
    item: str
    status: str = "new"


async def _log(ctx, event: str, ref: object = None, attempt: int | None = None) -> None:
    await ctx.db.execute("INSERT INTO pa_log (event, ref, node, attempt) VALUES ($1, $2, $3, $4)",
                         event, None if ref is None else str(ref), ctx.node.id, attempt)


@mutation(public=True)
async def place_order(ctx, owner: str, item: str, fail: bool = False) -> int:
    order = await ctx.db.insert(Order(id=None, owner=owner, item=item))
    await ctx.dispatch(fulfil, order_id=order.id)
    if fail:
        raise RuntimeError("the order fails after dispatching its job: neither may remain")
    return order.id


@job(max_attempts=3)
async def fulfil(ctx, order_id: int) -> None:
    await ctx.db.execute("UPDATE pa_orders SET status = 'done' WHERE id = $1", order_id)
    await _log(ctx, "fulfil", order_id, ctx.job.attempt)


@mutation(public=True)
async def start_slow(ctx) -> int:
    return await ctx.dispatch(slow)


@job(max_attempts=3)
async def slow(ctx) -> None:
    await _log(ctx, "slow-start", ctx.job.id, ctx.job.attempt)
    if ctx.job.attempt == 1:
        await asyncio.sleep(120)  # its worker is killed meanwhile
    await _log(ctx, "slow-done", ctx.job.id, ctx.job.attempt)


@cron("* * * * * *", grace=5)
async def tick(ctx) -> None:
    await _log(ctx, "tick", ctx.job.options.get("slot"), ctx.job.attempt)


@query(public=True)
async def orders_of(ctx, owner: str) -> list[Order]:
    return await ctx.db.select(Order, owner=owner, order_by="id")


@query(public=True, rate_limit=RateLimit(requests=3, per=3600, key="global"))
async def limited(ctx) -> int:
    return 1


@query(public=True)
async def where(ctx) -> dict:
    row = await ctx.db.fetchrow("SELECT pg_is_in_recovery() AS replica, "
                                "current_setting('transaction_read_only') AS read_only")
    return {"replica": row["replica"], "read_only": row["read_only"] == "on"}


@query(public=True)
async def sneaky_write(ctx) -> int:
    return await ctx.db.fetchval("INSERT INTO pa_log (event, node) VALUES ('sneaky', 'q') RETURNING id")



@query(public=True)
async def planner(ctx) -> list[str]:
    """Session settings the worker changes for its own statements only."""
    row = await ctx.db.fetchrow("SELECT current_setting('enable_seqscan') AS a, current_setting('enable_bitmapscan') AS b, "
                                "current_setting('synchronous_commit') AS c")
    return [row["a"], row["b"], row["c"]]


@mutation(public=True)
async def dispatch_noops(ctx, n: int) -> int:
    for _ in range(n):
        await ctx.dispatch(noop)
    return n


@job(max_attempts=1)
async def noop(ctx) -> None:
    """Touches no database: the worker's own statements are all that run."""


@query(public=True)
async def orders_where(ctx, owner: str) -> dict:
    """The owner's items and whether a replica answered."""
    replica = await ctx.db.fetchval("SELECT pg_is_in_recovery()")
    return {"replica": replica, "items": [o.item for o in await ctx.db.select(Order, owner=owner, order_by="id")]}

