"""The app the realtime tests subscribe to."""

from __future__ import annotations

import asyncio

import attrs

from forge_kernel import RateLimit, model, mutation, query
from forge_kernel.migrations import Migration

MIGRATIONS = [Migration("rt_testapp", 1, "items", """
CREATE TABLE rt_items (
    id    bigserial PRIMARY KEY,
    owner text NOT NULL,
    title text NOT NULL,
    n     integer NOT NULL DEFAULT 0
);
CREATE TABLE rt_notes (id bigserial PRIMARY KEY, body text NOT NULL);
""")]


@model(table="rt_items")
class Item:
    id: int | None
    owner: str
    title: str
    n: int = 0


@query
async def my_items(ctx) -> list[Item]:
    """The caller's items (reads ctx.auth: one execution per caller)."""
    return await ctx.db.select(Item, owner=ctx.auth.user_id, order_by="id")


@query(public=True)
async def items_of(ctx, owner: str) -> list[Item]:
    """Items of ``owner`` (does not read ctx.auth: shared by every subscriber)."""
    return await ctx.db.select(Item, owner=owner, order_by="id")


@query(public=True)
async def slow_items_of(ctx, owner: str, seconds: float) -> list[Item]:
    """``items_of`` after a pause (timeouts)."""
    await asyncio.sleep(seconds)
    return await ctx.db.select(Item, owner=owner, order_by="id")


@query(public=True)
async def count_items(ctx) -> int:
    """Raw SQL: a whole-table read found through EXPLAIN."""
    return await ctx.db.fetchval("SELECT count(*) FROM rt_items")


@query(public=True)
async def total_n(ctx, owner: str) -> int:
    """Changes to rows of ``owner`` whose sum stays the same must not be pushed."""
    rows = await ctx.db.select(Item, owner=owner)
    return sum(r.n for r in rows)


@query(public=True, reads=["rt_notes"])
async def note_count(ctx) -> int:
    """Declares its read: rt_notes is captured at start-up."""
    return await ctx.db.fetchval("SELECT count(*) FROM rt_notes")


@query(roles=["admin"])
async def admin_count(ctx) -> int:
    """Needs the admin role (does not read ctx.auth itself)."""
    return await ctx.db.fetchval("SELECT count(*) FROM rt_items")


@query
async def whoami_if_items(ctx) -> str | None:
    """Reads ctx.auth only once rt_notes has rows: starts shared, must split per caller later."""
    if await ctx.db.fetchval("SELECT count(*) FROM rt_notes"):
        return ctx.auth.user_id
    return None


@query(public=True, rate_limit=RateLimit(3, per=3600, key="ip"))
async def limited_count(ctx) -> int:
    """Three calls per hour per client address, over /rpc and /ws together."""
    return await ctx.db.fetchval("SELECT count(*) FROM rt_items")


@query(public=True)
async def not_a_number(ctx) -> dict:
    """Float values JSON cannot carry."""
    return {"nan": float("nan"), "inf": [float("inf"), 1.5]}


@query(public=True)
async def broken(ctx) -> int:
    raise RuntimeError("boom")


@mutation(public=True)
async def add_item(ctx, owner: str, title: str, n: int = 0) -> Item:
    return await ctx.db.insert(Item(id=None, owner=owner, title=title, n=n))


@mutation(public=True)
async def set_n(ctx, id: int, n: int) -> Item:
    item = await ctx.db.get(Item, id)
    return await ctx.db.update(attrs.evolve(item, n=n))


@query(public=True)
async def careful_count(ctx) -> int:
    """Raw SQL whose failure it swallows: inside a batch of re-runs it must still get the real count."""
    try:
        return await ctx.db.fetchval("SELECT count(*) FROM rt_items")
    except Exception:
        return -1


@query(public=True)
async def all_items(ctx) -> list[Item]:
    """A select without parameters (a batch cannot unnest it: it runs once for every such call)."""
    return await ctx.db.select(Item, order_by="id")
