"""The app the dashboard tests run: jobs that succeed, fail for good or take their time, a cron,
a mutation that logs and dispatches (so a request's trace reaches a job)."""

from __future__ import annotations

import asyncio

from forge_kernel import cron, job, mutation, query


@query(public=True)
async def hello(ctx) -> str:
    return "hello"


@mutation(public=True)
async def place_order(ctx, item: str) -> int:
    ctx.log.info(f"placing order for {item}")
    return await ctx.dispatch(ship_order, item=item)


@job(max_attempts=3, queue="shipping")
async def ship_order(ctx, item: str) -> None:
    ctx.log.info(f"shipping {item}")


@job(max_attempts=1, queue="mail")
async def flaky_mail(ctx, to: str) -> None:
    raise RuntimeError(f"mail server refused {to}")


@job(max_attempts=1, queue="slow")
async def slow_report(ctx, n: int) -> None:
    await asyncio.sleep(n)


@cron("0 3 * * *")
async def nightly_cleanup(ctx) -> None:
    ctx.log.info("cleaning up")
