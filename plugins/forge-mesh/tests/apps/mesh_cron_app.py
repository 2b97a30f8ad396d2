"""A cron every second and a job, for the test that blocks the mesh port."""

from forge_kernel import cron, job, mutation
from forge_kernel.migrations import Migration

MIGRATIONS = [
    Migration("mesh_cron_app", 1, "ticks", "CREATE TABLE mesh_ticks (id bigserial PRIMARY KEY, at timestamptz NOT NULL DEFAULT now());"
              "CREATE TABLE mesh_notes (id bigserial PRIMARY KEY, key text NOT NULL)"),
]


@cron("* * * * * *", catch_up=0, grace=1)
async def tick(ctx) -> None:
    await ctx.db.execute("INSERT INTO mesh_ticks DEFAULT VALUES")


@job
async def note(ctx, key: str) -> None:
    await ctx.db.execute("INSERT INTO mesh_notes (key) VALUES ($1)", key)


@mutation(public=True)
async def dispatch_note(ctx, key: str) -> int:
    return await ctx.dispatch(note, key=key)
