"""Functions the mesh tests forward between nodes."""

from __future__ import annotations

import asyncio
import os
import signal
import time

from forge_kernel import action, job, mutation, query
from forge_kernel.migrations import Migration

MIGRATIONS = [
    Migration("mesh_test_app", 1, "items",
              "CREATE TABLE mesh_items (id bigserial PRIMARY KEY, key text NOT NULL, node text NOT NULL, "
              "created_at timestamptz NOT NULL DEFAULT now()); CREATE INDEX ON mesh_items (key)"),
    Migration("mesh_test_app", 2, "effects",
              "CREATE TABLE mesh_effects (id bigserial PRIMARY KEY, key text NOT NULL, node text NOT NULL)"),
]


def _node_id(ctx) -> str:
    return ctx.node.id if ctx.node is not None else "?"


@query(public=True)
async def whoami(ctx) -> dict:
    """Who ran it, and as whom."""
    return {"node": _node_id(ctx), "user": ctx.auth.user_id, "kind": ctx.auth.kind, "roles": sorted(ctx.auth.roles)}


@query(public=True)
async def blob(ctx, size: int = 1024) -> str:
    """A payload of ``size`` bytes (the benchmark's 1 KB query reads one row too)."""
    await ctx.db.fetchval("SELECT 1")
    return "x" * size


@query(public=True)
async def items(ctx, key: str) -> list[dict]:
    rows = await ctx.db.fetch("SELECT id, node FROM mesh_items WHERE key = $1 ORDER BY id", key)
    return [dict(r) for r in rows]


@mutation(public=True)
async def add_item(ctx, key: str) -> dict:
    """One row per successful run: duplicates show as two rows with the same key."""
    row = await ctx.db.fetchrow("INSERT INTO mesh_items (key, node) VALUES ($1, $2) RETURNING id", key, _node_id(ctx))
    if os.environ.get("MESH_TEST_KILL_MID_TX") == "1":
        os.kill(os.getpid(), signal.SIGKILL)  # the transaction is open: nothing of it may survive
    return {"id": row["id"], "node": _node_id(ctx)}


@action(public=True)
async def side_effect(ctx, key: str) -> dict:
    """An action: records its effect through a mutation on the node running it."""
    if os.environ.get("MESH_TEST_KILL_IN_ACTION") == "1":
        os.kill(os.getpid(), signal.SIGKILL)
    await ctx.mutation(record_effect, key=key)
    return {"node": _node_id(ctx)}


@mutation(public=True)
async def record_effect(ctx, key: str) -> int:
    return await ctx.db.fetchval("INSERT INTO mesh_effects (key, node) VALUES ($1, $2) RETURNING id", key, _node_id(ctx))


@query(public=True, timeout=60)
async def slow(ctx, seconds: float, marker: str = "") -> str:
    """Sleeps; when cancelled, writes the time it noticed into ``marker`` (a file path)."""
    try:
        await asyncio.sleep(seconds)
    except asyncio.CancelledError:
        if marker:
            with open(marker, "w") as f:
                f.write(repr(time.time()))
        raise
    return _node_id(ctx)


@query(public=True, timeout=3600)
async def hold(ctx, seconds: float) -> str:
    """Keeps a node busy (a call in flight) so the forwarder prefers the others."""
    await asyncio.sleep(seconds)
    return _node_id(ctx)


@query(public=True, timeout=1.0)
async def quick(ctx) -> str:
    """A query with a 1 s deadline."""
    return _node_id(ctx)


@mutation(public=True)
async def start_long_job(ctx, seconds: float = 60.0) -> int:
    return await ctx.dispatch(long_job, seconds=seconds)


@query(public=True)
async def shout(ctx, text: str) -> str:
    ctx.log.info(f"shout: {text}")
    return _node_id(ctx)


@query(public=True, capability="gpu")
async def on_gpu(ctx) -> str:
    return _node_id(ctx)


@query(public=True)
async def private_echo(ctx) -> str:
    return "never"


@query
async def mine(ctx) -> dict:
    """Needs a caller: forwarded calls keep the caller's identity."""
    return {"user": ctx.auth.user_id, "node": _node_id(ctx)}


@job
async def long_job(ctx, seconds: float = 60.0) -> None:
    await asyncio.sleep(seconds)
