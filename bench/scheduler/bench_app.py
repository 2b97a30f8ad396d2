"""FORGE side of the scheduler benchmark: one cron every second (seconds-first 6-field form)."""

from forge_kernel import cron


@cron("* * * * * *", catch_up=10, grace=2)
async def bench_tick(ctx) -> None:
    pass
