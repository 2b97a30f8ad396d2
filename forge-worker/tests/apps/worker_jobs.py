"""Jobs the forge-worker tests run. Every job records what happened in ``job_log`` so tests
observe runs through the database, like a user would."""

from __future__ import annotations

import asyncio
import contextvars

from forge_kernel import action, cron, job, mutation
from forge_kernel.migrations import Migration

MIGRATIONS = [Migration("worker_tests", 1, "job_log", """
    CREATE TABLE job_log (
        seq      bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        job_id   bigint NOT NULL,
        name     text NOT NULL,
        attempt  integer NOT NULL,
        node_id  text,
        event    text NOT NULL,
        value    text,
        at       timestamptz NOT NULL DEFAULT clock_timestamp()
    );
    CREATE TABLE items (id bigint PRIMARY KEY, title text NOT NULL);
""")]


async def log(ctx, event: str, value: str | None = None) -> None:
    await ctx.db.execute("INSERT INTO job_log (job_id, name, attempt, node_id, event, value) VALUES ($1, $2, $3, $4, $5, $6)",
                         ctx.job.id, ctx.job.name, ctx.job.attempt, ctx.node.id if ctx.node else None, event, value)


@job
async def record(ctx, value: str) -> None:
    await log(ctx, "ran", value)


@job(max_attempts=3, backoff=0.01)
async def flaky(ctx, fail_times: int) -> None:
    await log(ctx, "attempt")
    if ctx.job.attempt <= fail_times:
        raise RuntimeError(f"planned failure {ctx.job.attempt}")
    await log(ctx, "ran")


@job(max_attempts=2, backoff=0.01)
async def always_fails(ctx) -> None:
    await log(ctx, "attempt")
    raise ValueError("this job always fails")


@job(max_attempts=1)
async def fails_with(ctx, message: str) -> None:
    raise RuntimeError(message)


@job(max_attempts=1)
async def fails_with_nul_or_size(ctx, message: str, size: int = 0) -> None:
    """Job arguments are jsonb, which holds no NUL: the job makes its own (``<NUL>``)."""
    raise RuntimeError(message.replace("<NUL>", "\x00") + "x" * size)


@job
async def later(ctx, times: int) -> None:
    await log(ctx, "attempt")
    if ctx.job.attempt <= times and int(await ctx.db.fetchval(
            "SELECT count(*) FROM job_log WHERE job_id = $1 AND event = 'attempt'", ctx.job.id)) <= times:
        raise ctx.retry_later(0.05, "not yet")
    await log(ctx, "ran")


@job
async def gives_up(ctx) -> None:
    await log(ctx, "attempt")
    raise ctx.cancel("nothing to do")


@job(timeout=0.3, max_attempts=1)
async def too_slow(ctx) -> None:
    await log(ctx, "attempt")
    await asyncio.sleep(30)


@job(max_attempts=1)
async def long_running(ctx, seconds: float) -> None:
    await log(ctx, "started")
    try:
        for i in range(int(seconds * 20)):
            ctx.progress(min(100, i / (seconds * 20) * 100), f"step {i}")
            await asyncio.sleep(0.05)
    except asyncio.CancelledError:
        await asyncio.shield(log(ctx, "cancelled", str(ctx.cancelled)))
        raise
    await log(ctx, "ran")


@job
async def tight_progress(ctx, steps: int) -> None:
    for i in range(steps):
        ctx.progress(i * 100 / steps, "working")
    await asyncio.sleep(0.3)  # spans a lease renewal, so the last progress is written
    await log(ctx, "ran")


@job(concurrency=2)
async def limited(ctx, hold: float) -> None:
    await log(ctx, "started")
    await asyncio.sleep(hold)
    await log(ctx, "ended")


@job(capability="gpu")
async def needs_gpu(ctx, value: str) -> None:
    await log(ctx, "ran", value)


@job
async def fan_out(ctx, n: int) -> None:
    for i in range(n):
        await ctx.dispatch(record, value=f"child-{i}")
    await log(ctx, "ran")


@job
async def sleepy(ctx, seconds: float) -> None:
    await asyncio.sleep(seconds)
    await log(ctx, "ran")


@job
async def noop(ctx) -> None:
    return None


@mutation
async def add_item(ctx, id: int, title: str, fail: bool = False) -> int:
    await ctx.db.execute("INSERT INTO items (id, title) VALUES ($1, $2)", id, title)
    job_id = await ctx.dispatch(record, value=f"item-{id}")
    if fail:
        raise RuntimeError("rolled back on purpose")
    return job_id


@action
async def dispatch_from_action(ctx, value: str) -> int:
    return await ctx.dispatch(record, value=value)


@cron("* * * * *")
async def minutely(ctx) -> None:
    await log(ctx, "cron")


@job(max_attempts=10)
async def crash_work(ctx, i: int) -> None:
    await asyncio.sleep(0.005)
    await log(ctx, "ran", str(i))


@job
async def nap(ctx, seconds: float) -> None:
    """Sleeps without touching the database: many of them finish out of claim (id) order."""
    await asyncio.sleep(seconds)


#: what a job sets in its own context; another job must never see it
TENANT: contextvars.ContextVar[str | None] = contextvars.ContextVar("worker_tests_tenant", default=None)


@job
async def set_tenant(ctx, value: str) -> None:
    """Records the tenant its context held as it started, then sets its own (and never resets it)."""
    await log(ctx, "saw", TENANT.get())
    TENANT.set(value)


@job(max_attempts=2, backoff=0.01)
async def awaits_a_cancelled_future(ctx) -> None:
    """Lets through the CancelledError of a future something else cancelled (its own task is not
    cancelled): a failure of the job, not a cancellation of the worker's task."""
    await log(ctx, "attempt")
    future = asyncio.get_running_loop().create_future()
    future.cancel()
    await future
