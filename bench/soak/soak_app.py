"""The app the chaos soak runs on three forge-node processes: mutations that dispatch jobs and
start workflows, a job and a workflow whose every execution leaves a row (so re-runs are
counted), a per-second cron that records each slot it ran, and a live query over the rows the
jobs write. Everything is public: the soak measures the platform, not auth."""

from __future__ import annotations

import asyncio
import random

from forge_kernel import cron, job, model, mutation, query, workflow
from forge_kernel.migrations import Migration

TOPICS = 50

MIGRATIONS = [Migration("bench_soak", 1, "tables", """
CREATE TABLE soak_dispatched (
    job_id  bigint PRIMARY KEY,
    key     text NOT NULL,
    at      timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE TABLE soak_job_runs (
    id      bigserial PRIMARY KEY,
    job_id  bigint NOT NULL,
    key     text NOT NULL,
    attempt integer NOT NULL,
    node    text NOT NULL,
    at      timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE INDEX soak_job_runs_job ON soak_job_runs (job_id);
CREATE TABLE soak_items (
    id      bigserial PRIMARY KEY,
    topic   integer NOT NULL,
    val     text NOT NULL
);
CREATE INDEX soak_items_topic ON soak_items (topic, id DESC);
CREATE TABLE soak_flows (
    key     text PRIMARY KEY,
    run_id  text NOT NULL,
    at      timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE TABLE soak_step_runs (
    id      bigserial PRIMARY KEY,
    key     text NOT NULL,
    step    text NOT NULL,
    at      timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE TABLE soak_cron_execs (
    id      bigserial PRIMARY KEY,
    slot    timestamptz NOT NULL,
    run_id  bigint,
    node    text NOT NULL,
    at      timestamptz NOT NULL DEFAULT clock_timestamp()
);
""")]


@model(table="soak_items")
class SoakItem:
    id: int | None
    topic: int
    val: str


@query(public=True)
async def topic_items(ctx, topic: int) -> list[SoakItem]:
    """The five newest items of one topic: what the live subscribers watch."""
    return await ctx.db.select(SoakItem, topic=topic, order_by="-id", limit=5)


@mutation(public=True)
async def write_item(ctx, topic: int, val: str) -> int:
    return await ctx.db.fetchval("INSERT INTO soak_items (topic, val) VALUES ($1, $2) RETURNING id", topic, val)


@mutation(public=True)
async def dispatch_jobs(ctx, key: str, n: int) -> list[int]:
    """Dispatch ``n`` jobs; their ids commit in soak_dispatched with them (the committed set)."""
    ids = []
    for i in range(n):
        job_key = f"{key}/{i}"
        job_id = await ctx.dispatch(soak_job, key=job_key, topic=random.randrange(TOPICS))
        await ctx.db.execute("INSERT INTO soak_dispatched (job_id, key) VALUES ($1, $2)", job_id, job_key)
        ids.append(job_id)
    return ids


@job(max_attempts=10)
async def soak_job(ctx, key: str, topic: int) -> None:
    # long enough that a SIGKILL often catches jobs running
    await asyncio.sleep(random.uniform(0.0, 0.3))
    await ctx.db.execute("INSERT INTO soak_job_runs (job_id, key, attempt, node) VALUES ($1, $2, $3, $4)",
                         ctx.job.id, key, ctx.job.attempt, ctx.node.id)
    await ctx.db.execute("INSERT INTO soak_items (topic, val) VALUES ($1, $2)", topic, key)


@mutation(public=True)
async def flow_step(ctx, key: str, step: str) -> str:
    """A workflow step: every execution leaves a row (a re-run after a crash shows twice here)."""
    await ctx.db.execute("INSERT INTO soak_step_runs (key, step) VALUES ($1, $2)", key, step)
    return f"{key}:{step}"


FLOW_STEPS = ("a", "b", "c", "d")


@workflow(version="1")
async def soak_flow(ctx, key: str) -> str:
    out = []
    for i, step in enumerate(FLOW_STEPS):
        out.append(await ctx.step(flow_step, key=key, step=step))
        if i == 1:
            await ctx.sleep(1.0)  # a durable timer in the middle
    return ",".join(out)


@mutation(public=True)
async def start_flow(ctx, key: str) -> str:
    run_id = await ctx.start_workflow(soak_flow, key=key, idempotency_key=f"soak-{key}")
    await ctx.db.execute("INSERT INTO soak_flows (key, run_id) VALUES ($1, $2)", key, run_id)
    return run_id


@cron("* * * * * *")
async def soak_tick(ctx) -> None:
    """Every second, at the cron's defaults (catch_up skip, grace 30 s): records the slot it ran."""
    import datetime as dt

    opts = ctx.job.options
    await ctx.db.execute("INSERT INTO soak_cron_execs (slot, run_id, node) VALUES ($1, $2, $3)",
                         dt.datetime.fromisoformat(opts["slot"]), opts.get("cron_run"), ctx.node.id)
