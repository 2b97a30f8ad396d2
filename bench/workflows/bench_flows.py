"""The FORGE side's workflows: 3 no-op steps, and a slower one for the resume measurement."""

from __future__ import annotations

import asyncio

from forge_kernel import workflow


async def noop(i: int) -> int:
    return i


async def hold(seconds: float) -> None:
    await asyncio.sleep(seconds)


@workflow(version="1")
async def three_noop(ctx, i: int) -> int:
    await ctx.step(noop, i)
    await ctx.step(noop, i)
    return await ctx.step(noop, i)


@workflow(version="1")
async def slow_three(ctx, i: int, hold_s: float) -> int:
    await ctx.step(noop, i)
    await ctx.step(hold, hold_s)
    return await ctx.step(noop, i)


@workflow(version="1")
async def waiter(ctx, i: int) -> int:
    await ctx.wait_for_event("go")
    return await ctx.step(noop, i)


@workflow(version="1")
async def sleeper(ctx, i: int, until: str) -> int:
    import datetime as dt

    await ctx.sleep_until(dt.datetime.fromisoformat(until))
    return await ctx.step(noop, i)
