"""Test app run by the real worker: a fast cron, a slow one (overlap skip) and a failing one.
Each execution records the slot the scheduler handed over in the job's options."""

import asyncio

from forge_kernel import cron
from forge_kernel.migrations import Migration

MIGRATIONS = [Migration("sched_worker_app", 1, "executions", """
CREATE TABLE sched_executions (
    id       bigserial PRIMARY KEY,
    cron     text NOT NULL,
    slot     text,
    job_id   bigint NOT NULL,
    attempt  integer NOT NULL,
    started  timestamptz NOT NULL DEFAULT clock_timestamp(),
    finished timestamptz
)""")]


async def _record(ctx, name):
    return await ctx.db.fetchval(
        "INSERT INTO sched_executions (cron, slot, job_id, attempt) VALUES ($1, $2, $3, $4) RETURNING id",
        name, ctx.job.options.get("slot"), ctx.job.id, ctx.job.attempt)


@cron("* * * * * *", grace=2)
async def fast_tick(ctx) -> None:
    await _record(ctx, "fast_tick")


@cron("*/2 * * * * *", overlap="skip", grace=2)
async def slow_tick(ctx) -> None:
    rid = await _record(ctx, "slow_tick")
    await asyncio.sleep(3)
    await ctx.db.execute("UPDATE sched_executions SET finished = clock_timestamp() WHERE id = $1", rid)


@cron("0 0 1 1 *", max_attempts=1)
async def failing(ctx) -> None:
    raise ValueError("this cron fails on purpose")
