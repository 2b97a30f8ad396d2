"""Peer side of the scheduler benchmark: Procrastinate's periodic task every second.

Every worker runs Procrastinate's periodic deferrer; exactly-once per slot comes from the
unique (task_name, periodic_id, defer_timestamp) row in procrastinate_periodic_defers.
Run as a worker process: ``python procr_app.py`` with PROCR_CONNINFO set.
"""

import asyncio
import os

import procrastinate

app = procrastinate.App(connector=procrastinate.PsycopgConnector(conninfo=os.environ.get("PROCR_CONNINFO", "")))


# croniter reads a sixth field as seconds at the end; "* * * * * *" is every second
@app.periodic(cron="* * * * * *")
@app.task(name="bench_tick")
async def bench_tick(timestamp: int) -> None:
    pass


async def main() -> None:
    async with app.open_async():
        await app.run_worker_async(concurrency=4, wait=True)


if __name__ == "__main__":
    asyncio.run(main())
