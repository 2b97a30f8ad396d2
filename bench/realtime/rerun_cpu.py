"""CPU per re-run of the live-query engine, without sockets: a load-steadier yardstick for the
re-run path of bench (b) (the function call, the batched select and its round trip on the node's
side, the result's encoding and hash, the read index and run journal, the fan-out's Python path to
subscribers whose writes are stubbed).

An in-process node (the benchmark's ``bench_app``, realtime role, on an embedded PostgreSQL) with
``--queries`` live queries of ``topic_latest`` (five rows each), ``--subscribers`` per query. Each
round marks every query dirty (as a resync does: all queued at once, so the workers batch them as a
busy node's do) and waits for their runs; prints this thread's CPU time per re-run (median of
``--rounds``) and the batches they ran in.

    .venv/bin/python bench/realtime/rerun_cpu.py [--queries 100] [--subscribers 10] [--rounds 30]
    PYTHONPATH=DIR:DIR/forge-realtime:DIR/forge-gateway .venv/bin/python bench/realtime/rerun_cpu.py  # another checkout

``--garbage ROUNDS`` then counts the cyclic garbage the re-runs leave (objects only the cyclic GC frees,
by type) over that many more rounds.

Under callgrind (``--rounds 2`` and ``--rounds 12``, difference / (10 x queries)) it gives
instructions per re-run of this process (PostgreSQL's side is another process).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import gc
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # bench_app (and the stalls module it imports)


class StubOwner:
    """A subscriber whose connection takes every message at once (the write itself is not measured)."""

    def __init__(self) -> None:
        self.messages = 0
        self.direct = self._direct

    def _direct(self, message) -> bool:
        self.messages += 1
        return True

    def push(self, sub_id, message, kind) -> None:
        self.messages += 1

    def end(self, sub_id, error) -> None:
        raise AssertionError(f"subscription {sub_id} ended: {error}")


async def settle(engine, runs: int = 0) -> None:
    """Until ``runs`` more re-runs started and none is queued or running (a worker takes a batch off
    the queue a turn of the loop before its runs start)."""
    target = engine.stats.runs + runs
    while engine._queue or engine.running or engine.stats.runs < target:
        await asyncio.sleep(0.002)


async def garbage_per_run(engine, rounds: int) -> None:
    """Cyclic garbage per re-run: objects only the cyclic GC frees (they count towards its young
    threshold until a collection, and each collection walks them), by type, over ``rounds`` rounds."""
    gc.collect()
    gc.disable()
    try:
        runs0 = engine.stats.runs
        for _ in range(rounds):
            engine.on_resync(0)
            await settle(engine, len(engine.queries))
        runs = engine.stats.runs - runs0
        gc.set_debug(gc.DEBUG_SAVEALL)
        gc.collect()
        found = collections.Counter(type(o).__qualname__ for o in gc.garbage)
        gc.set_debug(0)
        gc.garbage.clear()
    finally:
        gc.enable()
    print(f"{sum(found.values()) / runs:.1f} objects of cyclic garbage per re-run ({runs} re-runs): "
          + ", ".join(f"{t} {n / runs:.2f}" for t, n in found.most_common(25)), flush=True)


async def main(args: argparse.Namespace) -> None:
    import asyncpg

    from forge_kernel.config import load_config
    from forge_kernel.db import with_database
    from forge_kernel.embedded_pg import EmbeddedPostgres
    from forge_kernel.executor import ANONYMOUS
    from forge_kernel.node import Node
    from forge_kernel.plugins import PluginLoader
    from forge_realtime.engine import Subscription
    from forge_realtime.service import for_node

    root = Path(tempfile.mkdtemp(prefix="rtrerun-"))
    pg = EmbeddedPostgres(root)
    admin_url = await asyncio.to_thread(pg.start)
    node = None
    try:
        admin = await asyncpg.connect(admin_url)
        await admin.execute("CREATE DATABASE forge_rerun")
        await admin.close()
        db_url = with_database(admin_url, "forge_rerun")
        loader = PluginLoader().load()
        cfg = load_config(loader.config_sections(), env={}, data={
            "database": {"url": db_url, "pool_min": 4, "pool_max": 30},
            "node": {"roles": ["function", "realtime"]},
            "app": {"modules": ["bench_app"], "example": False},
            "log": {"level": "WARNING"}})
        node = Node(cfg, loader)
        await node.start()
        async with node.pool.acquire() as conn:
            await conn.execute("INSERT INTO bench_items (topic, payload) SELECT t % $1, 'payload ' || t "
                               "FROM generate_series(1, $1 * 6) t", args.queries)
        engine = for_node(node).engine
        owners = [StubOwner() for _ in range(args.subscribers)]
        for topic in range(args.queries):
            for i, owner in enumerate(owners):
                engine.subscribe(Subscription(owner, f"s{topic}", "topic_latest", {"topic": topic}, ANONYMOUS))
        await settle(engine)
        per_run, batches = [], []
        for rnd in range(args.rounds + 2):  # two rounds to warm up
            runs0, b0 = engine.stats.runs, engine.stats.batches
            c0 = time.thread_time_ns()
            engine.on_resync(0)
            await settle(engine, len(engine.queries))
            cpu = time.thread_time_ns() - c0
            runs = engine.stats.runs - runs0
            if rnd >= 2:
                per_run.append(cpu / 1000 / runs)
                batches.append(engine.stats.batches - b0)
        if args.garbage:
            await garbage_per_run(engine, args.garbage)
        print(f"{statistics.median(per_run):.1f} us of CPU per re-run (median of {args.rounds} rounds of "
              f"{args.queries} queries x {args.subscribers} subscribers; min {min(per_run):.1f}; "
              f"batches per round {statistics.median(batches):.0f})", flush=True)
    finally:
        if node is not None:
            await node.stop()
        await asyncio.to_thread(pg.stop)
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--queries", type=int, default=100)
    ap.add_argument("--subscribers", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--garbage", type=int, default=0, metavar="ROUNDS",
                    help="then count the cyclic garbage per re-run over ROUNDS more rounds, by type")
    a = ap.parse_args()
    try:
        import uvloop

        uvloop.run(main(a))
    except ImportError:
        asyncio.run(main(a))
