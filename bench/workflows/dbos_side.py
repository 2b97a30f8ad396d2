"""The DBOS Transact side, run in a venv of its own (bench/workflows/requirements-dbos.txt):

    python dbos_side.py MODE --url postgresql://... [--n N] [--seconds T] [--concurrency C]

Prints one JSON line. Modes: drain (N 3-step no-op workflows enqueued first with DBOSClient, then
a DBOS process with a queue of worker_concurrency C runs them), continuous (a producer enqueues
batches of 10 for T s), direct (C tasks call the workflow function in a loop for T s: DBOS's
fastest path, no queue), hold (start N slow workflows and wait forever: the parent SIGKILLs it),
recover (launch with the same executor id; DBOS recovers that executor's pending workflows).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time

from dbos import DBOS, DBOSClient, DBOSConfig

CHECKPOINTS: list[float] = []


def _instrument() -> None:
    """Time every step checkpoint: DBOS reads (check_operation_execution) then writes
    (record_operation_result), each in its own transaction; both are the step's checkpoint."""
    from dbos._sys_db import SystemDatabase

    for name in ("check_operation_execution", "record_operation_result"):
        real = getattr(SystemDatabase, name)

        def timed(self, *a, __real=real, __name=name, **kw):
            t = time.perf_counter()
            try:
                return __real(self, *a, **kw)
            finally:
                CHECKPOINTS.append((__name, time.perf_counter() - t))

        setattr(SystemDatabase, name, timed)


@DBOS.step()
async def noop(i: int) -> int:
    return i


@DBOS.step()
async def hold(seconds: float) -> None:
    await asyncio.sleep(seconds)


@DBOS.workflow()
async def three_noop(i: int) -> int:
    await noop(i)
    await noop(i)
    return await noop(i)


@DBOS.workflow()
async def slow_three(i: int, hold_s: float) -> int:
    await noop(i)
    await hold(hold_s)
    return await noop(i)


def _sa_url(url: str) -> str:
    return url.replace("postgresql://", "postgresql+psycopg://", 1)


def _config(args, executor: str = "bench-1") -> DBOSConfig:
    return {"name": "bench", "system_database_url": _sa_url(args.url), "sys_db_pool_size": args.concurrency + 10,
            "log_level": "WARNING", "executor_id": executor, "application_version": "1",
            "run_admin_server": False}


def _checkpoint_stats() -> dict:
    by_step: list[float] = []
    reads = [d for n, d in CHECKPOINTS if n == "check_operation_execution"]
    writes = [d for n, d in CHECKPOINTS if n == "record_operation_result"]
    by_step = [r + w for r, w in zip(reads, writes)]
    if not by_step:
        return {}
    by_step.sort()
    return {"checkpoint_p50_ms": statistics.median(by_step) * 1000,
            "checkpoint_p99_ms": by_step[int(len(by_step) * 0.99) - 1] * 1000, "checkpoints": len(by_step)}


async def _count_done(engine_url: str) -> int:
    import asyncpg

    conn = await asyncpg.connect(engine_url)
    try:
        return await conn.fetchval("SELECT count(*) FROM dbos.workflow_status WHERE status = 'SUCCESS'")
    finally:
        await conn.close()


async def _left(url: str) -> bool:
    import asyncpg

    conn = await asyncpg.connect(url)
    try:
        return await conn.fetchval("SELECT EXISTS (SELECT 1 FROM dbos.workflow_status "
                                   "WHERE status IN ('ENQUEUED', 'PENDING'))")
    finally:
        await conn.close()


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("mode")
    ap.add_argument("--url", required=True)
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--seconds", type=float, default=10)
    ap.add_argument("--concurrency", type=int, default=50)
    ap.add_argument("--hold", type=float, default=1.0)
    ap.add_argument("--poll", type=float, default=0.05)
    ap.add_argument("--rate", type=float, default=50.0)
    args = ap.parse_args()
    _instrument()
    if args.mode == "drain":
        DBOS(config=_config(args))
        DBOS.launch()  # creates the system tables; the queue is registered after the enqueues
        client = DBOSClient(system_database_url=_sa_url(args.url))
        t = time.perf_counter()
        for i in range(args.n):
            client.enqueue({"queue_name": "bench", "workflow_name": "three_noop"}, i)
        enq = time.perf_counter() - t
        CHECKPOINTS.clear()
        t0 = time.perf_counter()
        await DBOS.register_queue_async("bench", worker_concurrency=args.concurrency, polling_interval_sec=args.poll)
        while await _left(args.url):  # through DBOS's status index, as FORGE's side polls through its own
            await asyncio.sleep(0.02)
        took = time.perf_counter() - t0
        print(json.dumps({"mode": "drain", "n": args.n, "seconds": took, "rate": args.n / took,
                          "enqueue_seconds": enq, **_checkpoint_stats()}), flush=True)
    elif args.mode in ("continuous", "direct"):
        DBOS(config=_config(args))
        DBOS.launch()
        done = 0
        stop = time.perf_counter() + args.seconds
        if args.mode == "direct":
            async def loop(k: int) -> None:
                nonlocal done
                i = 0
                while time.perf_counter() < stop:
                    await three_noop(k * 10_000_000 + i)
                    i += 1
                    done += 1

            t0 = time.perf_counter()
            await asyncio.gather(*(loop(k) for k in range(args.concurrency)))
            took = time.perf_counter() - t0
        else:
            queue = await DBOS.register_queue_async("bench", worker_concurrency=args.concurrency,
                                                    polling_interval_sec=args.poll)
            before = await _count_done(args.url)
            t0 = time.perf_counter()
            i = 0
            while time.perf_counter() < stop:
                for _ in range(10):
                    await queue.enqueue_async(three_noop, i)
                    i += 1
                await asyncio.sleep(0)
            took = time.perf_counter() - t0
            done = await _count_done(args.url) - before
        print(json.dumps({"mode": args.mode, "done": done, "seconds": took, "rate": done / took,
                          **_checkpoint_stats()}), flush=True)
    elif args.mode == "latency":
        DBOS(config=_config(args))
        DBOS.launch()
        tasks = []
        interval = 1.0 / args.rate
        t0 = time.perf_counter()
        i = 0
        while time.perf_counter() - t0 < 1.0:  # warm-up, not measured
            tasks.append(asyncio.ensure_future(three_noop(i)))
            i += 1
            await asyncio.sleep(interval)
        await asyncio.gather(*tasks)
        CHECKPOINTS.clear()
        tasks = []
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < args.seconds:
            tasks.append(asyncio.ensure_future(three_noop(i)))
            i += 1
            await asyncio.sleep(max(0.0, t0 + i * interval - time.perf_counter()))
        await asyncio.gather(*tasks)
        print(json.dumps({"mode": "latency", "rate": args.rate, "workflows": len(tasks), **_checkpoint_stats()}),
              flush=True)
    elif args.mode == "hold":
        DBOS(config=_config(args))
        DBOS.launch()
        for i in range(args.n):
            await DBOS.start_workflow_async(slow_three, i, args.hold)
        print(json.dumps({"mode": "hold", "started": args.n}), flush=True)
        await asyncio.sleep(3600)
    elif args.mode == "recover":
        t0 = time.perf_counter()
        DBOS(config=_config(args))
        DBOS.launch()  # recovers this executor's pending workflows
        while await _count_done(args.url) < args.n:
            await asyncio.sleep(0.02)
        print(json.dumps({"mode": "recover", "seconds": time.perf_counter() - t0}), flush=True)
    os._exit(0)  # DBOS's background threads


if __name__ == "__main__":
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    sys.exit(asyncio.run(main()))
