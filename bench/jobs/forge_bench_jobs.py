"""Jobs the FORGE side of the benchmark runs (imported as an app module by the bench node)."""

from __future__ import annotations

import time

from forge_kernel import job

#: filled by run.py: counts finished no-op jobs and records enqueue-to-start latencies
STATE: dict = {"done": 0, "first": 0.0, "latencies": [], "starts": {}, "committed": {}}


@job
async def noop(ctx) -> None:
    if not STATE["done"]:
        STATE["first"] = time.perf_counter()  # drain timing starts at the first job
    STATE["done"] += 1


@job
async def timed(ctx, sent: float) -> None:
    # enqueuer and worker share this process, so perf_counter values are comparable
    now = time.perf_counter()
    STATE["latencies"].append(now - sent)
    STATE["starts"][ctx.job.id] = now
    STATE["done"] += 1
