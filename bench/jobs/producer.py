"""The producers of the worker-bound mode, in a process of their own (so they take no CPU from a
worker running in the benchmark process): keep at least ``--depth`` jobs pending, in batches of
``--batch`` through the system's own enqueue call, on ``--producers`` connections.

After ``--warmup`` seconds it prints ``start``, after ``--seconds`` more ``stop``, then one JSON
line: jobs stored and rows in the queue table at both moments (jobs completed in the window =
stored - growth of the table) and the fewest pending jobs seen in the window (> 0: the workers
never ran dry).

    python producer.py --system forge|graphile --url URL [--seconds 10] [--depth 20000] [--batch 500]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time

import asyncpg

TABLES = {  # (all rows, pending rows)
    "forge": ("SELECT count(*) FROM forge_jobs", "SELECT count(*) FROM forge_jobs WHERE status = 'pending'"),
    "graphile": ("SELECT count(*) FROM graphile_worker._private_jobs",
                 "SELECT count(*) FROM graphile_worker._private_jobs WHERE locked_at IS NULL"),
}


async def main(args: argparse.Namespace) -> None:
    conns = [await asyncpg.connect(args.url) for _ in range(args.producers)]
    watch = await asyncpg.connect(args.url)
    count_all, count_pending = TABLES[args.system]
    stored = 0
    low = [None]
    pending = [0]
    stop = asyncio.Event()

    if args.system == "forge":
        sys.path.insert(0, args.app_dir)
        import forge_bench_jobs as fb
        from forge_worker import JobQueue

        queues = [JobQueue(c) for c in conns]
        # built once, like graphile's JSON below: each call pays the system's enqueue (checks,
        # encoding, the INSERT), not the bench's construction of 500 request objects
        batch = [queues[0].request(fb.noop) for _ in range(args.batch)]

        async def store(i: int) -> None:
            await queues[i].enqueue_many(batch)
    else:
        specs = json.dumps([{"identifier": "noop", "payload": {}}] * args.batch)

        async def store(i: int) -> None:
            await conns[i].execute("SELECT graphile_worker.add_jobs(ARRAY(SELECT json_populate_recordset("
                                   "NULL::graphile_worker.job_spec, $1::json)))", specs)

    gate = asyncio.Event()  # cleared while a snapshot is taken: no enqueue is half-counted
    gate.set()
    inflight = [0]
    watch_lock = asyncio.Lock()

    async def produce(i: int) -> None:
        nonlocal stored
        while not stop.is_set():
            await gate.wait()
            if pending[0] < args.depth:
                inflight[0] += 1
                try:
                    await store(i)
                finally:
                    inflight[0] -= 1
                stored += args.batch
                pending[0] += args.batch
            else:
                await asyncio.sleep(0.002)

    async def snapshot() -> tuple[int, int, float]:
        """Jobs stored so far and rows in the table, at one moment (no enqueue in flight)."""
        gate.clear()
        try:
            while inflight[0]:
                await asyncio.sleep(0.0005)
            async with watch_lock:
                return stored, await watch.fetchval(count_all), time.perf_counter()
        finally:
            gate.set()

    async def observe(measuring: list[bool]) -> None:
        while not stop.is_set():
            async with watch_lock:
                pending[0] = await watch.fetchval(count_pending)
            if measuring[0]:
                low[0] = pending[0] if low[0] is None else min(low[0], pending[0])
            await asyncio.sleep(args.watch_interval)

    measuring = [False]
    tasks = [asyncio.create_task(produce(i)) for i in range(args.producers)]
    tasks.append(asyncio.create_task(observe(measuring)))
    await asyncio.sleep(args.warmup)
    s0, r0, t0 = await snapshot()
    measuring[0] = True
    # whose CPU is whose: this process and its connections' backends (run.py's CPU by role)
    print("pids", os.getpid(), *[c.get_server_pid() for c in [*conns, watch]], flush=True)
    print("start", flush=True)
    await asyncio.sleep(args.seconds)
    s1, r1, t1 = await snapshot()
    print("stop", flush=True)
    await asyncio.sleep(0.5)  # keep the connections (and their backends) while run.py reads the window's CPU
    stop.set()
    gate.set()
    await asyncio.gather(*tasks)
    print(json.dumps({"stored": s1 - s0, "rows_before": r0, "rows_after": r1, "elapsed": t1 - t0,
                      "completed": (s1 - s0) - (r1 - r0), "fewest_pending": low[0]}), flush=True)
    for c in [*conns, watch]:
        await c.close()


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--system", choices=sorted(TABLES), required=True)
    p.add_argument("--url", required=True)
    p.add_argument("--app-dir", default=".")
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--warmup", type=float, default=1.0)
    p.add_argument("--depth", type=int, default=20_000)
    p.add_argument("--batch", type=int, default=500)
    p.add_argument("--producers", type=int, default=2)
    p.add_argument("--watch-interval", type=float, default=0.025,
                   help="seconds between counts of pending jobs (each costs PostgreSQL CPU beside the workers')")
    asyncio.run(main(p.parse_args()))
