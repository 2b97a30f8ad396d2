"""The app the dashboard tests run: jobs that succeed, fail for good or take their time, a cron,
a mutation that logs and dispatches (so a request's trace reaches a job), and a workflow that
reserves (compensated on cancel or failure), waits for an approval event, then charges (failing
until the file its run names exists, so a retry can succeed)."""

from __future__ import annotations

import asyncio
import os

from forge_kernel import cron, job, mutation, query, workflow


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


def reserve(item: str) -> str:
    return f"reserved {item}"


def release(item: str) -> str:
    return f"released {item}"


def charge(item: str, paid_flag: str) -> str:
    if not os.path.exists(paid_flag):
        raise RuntimeError(f"card declined for {item}")
    return f"charged {item}"


@workflow
async def order_flow(ctx, item: str, paid_flag: str) -> dict:
    await ctx.step(reserve, item, compensate=release)
    approval = await ctx.wait_for_event("approved")
    paid = await ctx.step(charge, item, paid_flag, retries=0)
    return {"approved_by": approval.payload, "paid": paid}


@mutation(public=True)
async def start_order(ctx, item: str, paid_flag: str) -> str:
    return await ctx.start_workflow(order_flow, item=item, paid_flag=paid_flag, correlation_key=f"order-{item}")
