from forge_kernel import cron


@cron("0 * * * *", timezone="Europe/Atlantis")
async def lost_city(ctx) -> None:
    pass
