"""Test app: crons for the scheduler tests."""

from forge_kernel import cron


@cron("* * * * * *", catch_up=3, grace=1)
async def every_second(ctx) -> None:
    pass


@cron("0 9 * * mon-fri", timezone="Europe/Berlin", overlap="skip")
async def morning(ctx) -> None:
    pass
