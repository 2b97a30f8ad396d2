"""Chaos-test app: one cron every second; each execution records its slot."""

from forge_kernel import cron
from forge_kernel.migrations import Migration

MIGRATIONS = [Migration("sched_chaos_app", 1, "executions", """
CREATE TABLE chaos_executions (
    id      bigserial PRIMARY KEY,
    slot    text NOT NULL,
    job_id  bigint NOT NULL,
    attempt integer NOT NULL,
    at      timestamptz NOT NULL DEFAULT clock_timestamp()
)""")]

#: missed slots run per outage; a failover shorter than grace + CATCH_UP seconds loses none
CATCH_UP = 5
GRACE = 1


@cron("* * * * * *", catch_up=CATCH_UP, grace=GRACE)
async def chaos_tick(ctx) -> None:
    await ctx.db.execute("INSERT INTO chaos_executions (slot, job_id, attempt) VALUES ($1, $2, $3)",
                         ctx.job.options["slot"], ctx.job.id, ctx.job.attempt)
