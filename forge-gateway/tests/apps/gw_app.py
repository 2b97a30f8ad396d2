"""Functions the gateway tests call over HTTP: every error path, auth, limits and typed arguments."""

from __future__ import annotations

import asyncio
import datetime as dt
import enum
import uuid
from typing import Literal

import attrs

from forge_kernel import RateLimit, action, job, mutation, query
from forge_kernel.errors import Conflict, NotFound
from forge_kernel.migrations import Migration

MIGRATIONS = [
    Migration("gw_test_app", 1, "items", "CREATE TABLE gw_items (name text PRIMARY KEY, qty integer NOT NULL DEFAULT 0)"),
    Migration("gw_test_app", 2, "jobs", "CREATE TABLE gw_jobs (id serial PRIMARY KEY, name text NOT NULL, caller text)"),
]


class Colour(enum.Enum):
    RED = "red"
    GREEN = "green"


@attrs.frozen
class Point:
    x: float
    y: float
    label: str | None = None


@attrs.frozen
class Shape:
    id: uuid.UUID
    points: list[Point]
    colour: Colour
    created: dt.datetime


@query(public=True)
async def add(ctx, a: int, b: int = 0) -> int:
    """Add two integers (public)."""
    return a + b


@query(public=True)
async def value(ctx, id: int) -> int:
    """One SELECT with a bind parameter: what the benchmark measures."""
    return await ctx.db.fetchval("SELECT $1::int + 1", id)


@query(public=True)
async def describe(ctx, shape: Shape, tags: list[str] = [], kind: Literal["a", "b"] = "a") -> dict[str, int]:
    """Typed nested arguments: an attrs class with a list of attrs classes, an enum, a UUID and a datetime."""
    return {"points": len(shape.points), "tags": len(tags)}


@query(public=True)
async def make_shape(ctx, n: int) -> Shape:
    n = max(0, min(n, 5))
    return Shape(id=uuid.UUID(int=n), points=[Point(float(i), float(-i)) for i in range(n)], colour=Colour.RED,
                 created=dt.datetime(2024, 1, 1, tzinfo=dt.timezone.utc))


@query
async def whoami(ctx) -> dict:
    """The caller as the function sees it (needs a caller)."""
    a = ctx.auth
    return {"user_id": a.user_id, "roles": sorted(a.roles), "kind": a.kind, "claims": sorted(a.claims)}


@query(roles=["admin"])
async def admin_only(ctx) -> str:
    return "secret admin data"


@query(public=True)
async def missing(ctx, id: int) -> str:
    raise NotFound(f"no thing {id}")


@query(public=True)
async def conflicting(ctx) -> str:
    raise Conflict("that name is taken")


@mutation(public=True)
async def insert_item(ctx, name: str) -> str:
    await ctx.db.execute("INSERT INTO gw_items (name) VALUES ($1)", name)
    return name


@mutation(public=True)
async def boom(ctx) -> str:
    raise RuntimeError("the secret database password is hunter2")


@action(public=True, timeout=0.3)
async def slow(ctx, seconds: float) -> str:
    await asyncio.sleep(seconds)
    return "done"


@action(public=True, timeout=5)
async def slow_flagged(ctx, seconds: float, flag: str) -> str:
    """Writes ``flag`` when it starts, so a test knows the call is in flight before it acts."""
    with open(flag, "w") as f:
        f.write("started")
    await asyncio.sleep(seconds)
    return "done"


@query(public=True, rate_limit=RateLimit(3, per=3600, key="ip"))
async def limited_ip(ctx) -> str:
    return "ok"


@query(rate_limit=RateLimit(2, per=3600, key="user"))
async def limited_user(ctx) -> str:
    return ctx.auth.user_id


@query(public=True, rate_limit=RateLimit(5, per=3600, key="global"))
async def limited_global(ctx) -> str:
    return "ok"


@job
async def noop(ctx, tag: str) -> None:
    pass


@mutation
async def enqueue(ctx, tag: str, fail: bool = False) -> int:
    job_id = await ctx.dispatch(noop, tag=tag)
    if fail:
        raise Conflict("rolled back after dispatching")
    return job_id


@query(public=True)
async def job_callers(ctx) -> list[str]:
    return [r["caller"] for r in await ctx.db.fetch("SELECT caller FROM gw_jobs ORDER BY id")]
