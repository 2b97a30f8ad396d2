from forge_kernel import cron


@cron("61 * * * *")
async def broken_minutes(ctx) -> None:
    pass
