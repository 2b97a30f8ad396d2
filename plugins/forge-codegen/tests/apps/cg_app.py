"""The app the codegen tests generate a client for and run it against: one function per error code,
a live query over a model, and a mutation that changes it."""

from __future__ import annotations

import asyncio

from forge_kernel import RateLimit, model, mutation, query
from forge_kernel.errors import Conflict, NotFound
from forge_kernel.migrations import Migration

MIGRATIONS = [Migration("cg_app", 1, "items", """
CREATE TABLE cg_items (
    id    bigserial PRIMARY KEY,
    owner text NOT NULL,
    title text NOT NULL,
    done  boolean NOT NULL DEFAULT false
);
""")]


@model(table="cg_items")
class Item:
    owner: str
    title: str
    done: bool = False
    id: int | None = None


@query
async def list_items(ctx) -> list[Item]:
    """The caller's items, oldest first (live)."""
    return await ctx.db.select(Item, owner=ctx.auth.user_id, order_by="id")


@mutation
async def add_item(ctx, title: str) -> Item:
    return await ctx.db.insert(Item(owner=ctx.auth.user_id, title=title))


@query(public=True)
async def echo(ctx, text: str, times: int = 1) -> str:
    return text * times


@query(roles=["admin"])
async def admin_only(ctx) -> str:
    return "secret"


@query(public=True)
async def missing(ctx) -> None:
    raise NotFound("no such thing")


@mutation(public=True)
async def clash(ctx) -> None:
    raise Conflict("already there")


@query(public=True, rate_limit=RateLimit(1, per=3600, key="global"))
async def limited(ctx) -> int:
    return 1


@query(public=True)
async def boom(ctx) -> int:
    raise RuntimeError("database password is hunter2")


@query(public=True, timeout=0.3)
async def slow(ctx) -> int:
    await asyncio.sleep(5)
    return 1
