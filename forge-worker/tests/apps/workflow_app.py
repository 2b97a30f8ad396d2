"""Workflows the forge-worker tests run. Side effects go to ``wf_log`` so tests see how often a
step's function really ran (as opposed to how often its result was recorded)."""

from __future__ import annotations

import asyncio
import datetime as dt
import os

import attrs

from forge_kernel import mutation, workflow
from forge_kernel.migrations import Migration

MIGRATIONS = [Migration("workflow_tests", 1, "wf_log", """
    CREATE TABLE wf_log (
        seq     bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        run_id  text NOT NULL,
        step    text NOT NULL,
        event   text NOT NULL,
        node_id text,
        at      timestamptz NOT NULL DEFAULT clock_timestamp()
    );
    CREATE INDEX wf_log_run ON wf_log (run_id);
""")]

#: seconds each logged step and compensation takes (the kill tests make it longer)
STEP_SECONDS = float(os.environ.get("WF_STEP_SECONDS", "0"))


@attrs.frozen
class Receipt:
    step: str
    amount: int


def add(a: int, b: int) -> int:
    return a + b


def boom(step: str) -> None:
    raise ValueError(f"step {step} cannot be done")


def big(size: int) -> str:
    return "x" * size


def receipt(step: str, amount: int) -> Receipt:
    return Receipt(step, amount)


@mutation
async def effect(ctx, run: str, step: str) -> str:
    if STEP_SECONDS:
        await asyncio.sleep(STEP_SECONDS)
    await ctx.db.execute("INSERT INTO wf_log (run_id, step, event, node_id) VALUES ($1, $2, 'ran', $3)",
                         run, step, ctx.node.id if ctx.node else None)
    return f"{step}-done"


@mutation
async def undo(ctx, run: str, step: str) -> None:
    if STEP_SECONDS:
        await asyncio.sleep(STEP_SECONDS)
    await ctx.db.execute("INSERT INTO wf_log (run_id, step, event, node_id) VALUES ($1, $2, 'undone', $3)",
                         run, step, ctx.node.id if ctx.node else None)


@mutation
async def recorded_keys(ctx, run: str) -> list[str]:
    """The operations the run has recorded, as a statement started now sees them."""
    return [r["key"] for r in await ctx.db.fetch(
        "SELECT key FROM forge_workflow_steps WHERE run_id = $1::uuid ORDER BY seq", run)]


@workflow
async def sees_its_history(ctx) -> list[list[str]]:
    await ctx.step(add, 1, 1)
    first = await ctx.step(recorded_keys, run=ctx.run_id)
    await ctx.gather(ctx.step(add, 2, 2), ctx.step(add, 3, 3))
    ctx.now()
    then = await ctx.step(recorded_keys, run=ctx.run_id)
    await ctx.step(add, 4, 4)
    return [first, then]


@workflow
async def three_steps(ctx, n: int) -> int:
    a = await ctx.step(add, n, 1)
    b = await ctx.step(add, a, 1)
    return await ctx.step(add, b, 1)


@workflow(version="2")
async def booking(ctx, fail_at: int = 0, sleep: float = 0.0, steps: int = 3) -> list[str]:
    out = []
    for i in range(1, steps + 1):
        name = "abcdefghij"[i - 1]
        if i == fail_at:
            await ctx.step(boom, name, retries=1, backoff=0.01)
        out.append(await ctx.step(effect, run=ctx.run_id, step=name, compensate=undo))
        if sleep:
            await ctx.sleep(sleep)
    return out


@workflow
async def approval(ctx, timeout: float | None = None) -> dict:
    ev = await ctx.wait_for_event(["approved", "rejected"], timeout=timeout)
    if ev is None:
        return {"timed_out": True}
    return {"name": ev.name, "payload": ev.payload}


@workflow
async def clocky(ctx, nap: float) -> dict:
    t = ctx.now()
    r = ctx.random()
    u = ctx.uuid()
    seen = await ctx.step(receipt, "clock", 7)
    await ctx.sleep(nap)
    return {"now": t.isoformat(), "random": r, "uuid": str(u), "receipt_type": type(seen).__name__}


@workflow
async def fanout(ctx, n: int) -> list[int]:
    async def branch(i: int) -> int:
        x = await ctx.step(add, i, 10, name="first")
        return await ctx.step(add, x, 100, name="second")

    return await ctx.gather(*(branch(i) for i in range(n)))


@workflow
async def parent(ctx, n: int) -> list[int]:
    return await ctx.gather(*(ctx.child(three_steps, n=i) for i in range(n)))


@workflow(concurrency=1)
async def one_at_a_time(ctx, hold: float) -> None:
    await ctx.step(asyncio.sleep, hold, name="hold")


@workflow
async def oversized(ctx, size: int) -> str:
    return await ctx.step(big, size)


@workflow
async def flaky_forever(ctx) -> None:
    await ctx.step(boom, "x", retries=2, backoff=0.01)


def boom_with_nul(step: str) -> None:
    raise ValueError(f"step {step}\x00 cannot be done")


@workflow
async def fails_with_nul(ctx) -> None:
    await ctx.step(boom_with_nul, "x", retries=1, backoff=0.01)


@mutation
async def place_order(ctx, key: str, fail: bool = False) -> str:
    run_id = await ctx.start_workflow(three_steps, n=1, idempotency_key=key)
    if fail:
        raise RuntimeError("the order is rolled back")
    return run_id


@mutation
async def approve(ctx, target: str, fail: bool = False) -> int:
    n = await ctx.send_event(target, "approved", {"by": "test"})
    if fail:
        raise RuntimeError("rolled back")
    return n


from forge_kernel import job  # noqa: E402


@job
async def kick_off(ctx, key: str) -> None:
    """A job (or a cron, which runs as one) starting a run; the key makes a re-run harmless."""
    await ctx.start_workflow(three_steps, n=10, idempotency_key=key)


@mutation
async def whoami(ctx) -> dict:
    return {"user_id": ctx.auth.user_id, "kind": ctx.auth.kind, "roles": sorted(ctx.auth.roles)}


@workflow
async def who_runs(ctx) -> dict:
    return await ctx.step(whoami)


@mutation
async def start_who_runs(ctx) -> str:
    return await ctx.start_workflow(who_runs)
