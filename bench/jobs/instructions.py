"""CPU instructions one no-op job costs a FORGE worker node, with and without forge-observe (callgrind).

    .venv/bin/python bench/jobs/instructions.py [--jobs 5000] [--rounds 1]     # needs valgrind

Timings on the shared 2-CPU machine swing by 2x from one drain to the next; instruction counts do
not. For each side a node with the ``worker`` role (default ``[worker]`` settings, as in run.py's
drain) runs under ``valgrind --tool=callgrind`` with instrumentation off; it first drains a
warm-up batch (statement caches, imports, first-call costs), then counting is switched on, N
no-op jobs are stored in one transaction, the node drains them, counting is switched off once
its jobs table is empty, and the total is divided by N. ``without`` is the node without
forge-observe (``FORGE_DISABLE_PLUGINS=observe``), ``with`` the same node with forge-observe at
its defaults, except for its timed loops: under valgrind's ~50x slowdown they would run 50x more
often per job. Its metric snapshots (every 10 s) and writes (every 0.5 s) are slowed down
(``flush_interval`` 3600 s, ``write_interval`` 60 s); its aggregation of the event ring (every
0.5 s, i.e. batches of thousands of events at full speed) runs once, on SIGUSR1 after the drain
and before counting stops, so it is counted in full, as is the writing of the sampled jobs' spans
(the same signal after the warm-up writes the warm-up's, so the writer's connection is open). The figure is the node's whole process: the
claim loop, the job tasks, the event loop, garbage collection, and forge-observe's recording and
aggregation.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import asyncpg

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


async def serve(url: str, observe: bool, aggregation: bool = True, worker: dict | None = None) -> None:
    """The node under valgrind (``--serve``): runs until SIGTERM; on SIGUSR1 it aggregates its
    telemetry events (forge-observe) and says so."""
    from forge_kernel.config import load_config
    from forge_kernel.node import Node
    from forge_kernel.plugins import PluginLoader

    loader = PluginLoader(env={} if observe else {"FORGE_DISABLE_PLUGINS": "observe"}).load()
    data = {"database": {"url": url, "pool_min": 2, "pool_max": 20}, "node": {"roles": ["worker"]},
            "app": {"modules": ["forge_bench_jobs"], "example": False}, "log": {"level": "WARNING"},
            "worker": worker or {}}
    if observe:
        from forge_observe import service

        data["observe"] = {"flush_interval": 3600, "write_interval": 60}
        service.AGGREGATE_EVERY = 3600.0
    node = Node(load_config(loader.config_sections(), data=data, env={}), loader, freeze_gc=True)  # GC as `forge-node start`

    async def aggregate() -> None:
        if observe and aggregation:
            obs = service.for_node(node)
            obs.aggregate()
            # the spans of the sampled jobs (1 %) are written now: the writer's connection is made
            # before the counted window, and the window's own spans are counted in it
            await obs.writer.write_pending()
        gc.collect()  # each side starts its window with the same empty young generations
        print("aggregated", flush=True)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    tasks: set[asyncio.Task] = set()

    def on_usr1() -> None:
        task = asyncio.create_task(aggregate())
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    loop.add_signal_handler(signal.SIGUSR1, on_usr1)
    await node.start()
    print("ready", flush=True)
    await stop.wait()
    await node.stop()


async def drained(conn: asyncpg.Connection, limit: float = 1800.0) -> None:
    deadline = time.monotonic() + limit
    while await conn.fetchval("SELECT EXISTS (SELECT 1 FROM forge_jobs)"):
        if time.monotonic() > deadline:
            raise SystemExit("the node under valgrind did not drain its jobs")
        await asyncio.sleep(0.05)


async def per_job(base: str, n: int, warmup: int, observe: bool, tmp: Path, keep: str = "",
                  aggregate: bool = True, worker: dict | None = None, cache_sim: bool = False) -> float:
    import forge_bench_jobs as fb
    from forge_worker import JobQueue

    from run import forge_prepare, fresh_db

    name = "bench_cg_observe" if observe else "bench_cg"
    url = await fresh_db(base, name)
    await forge_prepare(url)
    out = tmp / f"callgrind.{name}"
    proc = await asyncio.create_subprocess_exec(
        "valgrind", "--tool=callgrind", "--instr-atstart=no", f"--cache-sim={'yes' if cache_sim else 'no'}", f"--callgrind-out-file={out}",
        sys.executable, str(Path(__file__).resolve()), "--serve", url, *(["--observe"] if observe else []),
        *([] if aggregate else ["--skip-aggregation"]), "--worker-json", json.dumps(worker or {}),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL, start_new_session=True)

    def control(*argv: str) -> None:
        subprocess.run(["callgrind_control", *argv, str(proc.pid)], check=True, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)

    async def aggregated() -> None:
        proc.send_signal(signal.SIGUSR1)
        if (await asyncio.wait_for(proc.stdout.readline(), 600)).strip() != b"aggregated":
            raise SystemExit("the node under valgrind did not aggregate")

    conn = await asyncpg.connect(url)
    queue = JobQueue(conn)
    try:
        line = await asyncio.wait_for(proc.stdout.readline(), 900)
        if line.strip() != b"ready":
            raise SystemExit("the node under valgrind did not start")
        await queue.enqueue_many([queue.request(fb.noop) for _ in range(warmup)])
        await drained(conn)
        await aggregated()
        await asyncio.sleep(1.0)  # its last results written, the loops idle
        control("-z")
        control("-i", "on")
        await queue.enqueue_many([queue.request(fb.noop) for _ in range(n)])
        await drained(conn)
        await aggregated()
        control("-i", "off")
        control("-d", "measured")
        await asyncio.sleep(1.0)
        for dump in tmp.glob(out.name + "*"):
            text = dump.read_text(errors="replace")
            if re.search(r"^desc: Trigger: dump measured", text, re.M):
                if keep:
                    shutil.copy(dump, Path(keep) / out.name)
                return int(re.search(r"^totals: (\d+)", text, re.M).group(1)) / n, collector_share(dump) / n
        raise SystemExit("callgrind wrote no dump for the measured jobs")
    finally:
        await conn.close()
        if proc.returncode is None:
            os.killpg(proc.pid, signal.SIGKILL)
            await proc.wait()


def collector_share(dump: Path) -> float:
    """Instructions spent in CPython's cyclic garbage collector (its collections are lumpy: a full
    one in a window of a few thousand jobs moves the total by several percent)."""
    out = subprocess.run(["callgrind_annotate", "--inclusive=yes", "--threshold=100", str(dump)],
                         capture_output=True, text=True).stdout
    return sum(int(m.group(1).replace(",", "")) for m in re.finditer(r"^\s*([\d,]+) .*gcmodule\.c:gc_collect_main ", out, re.M))


async def main_async(args: argparse.Namespace) -> None:
    from forge_kernel.embedded_pg import EmbeddedPostgres

    root = Path(tempfile.mkdtemp(prefix="forge-bench-jobs-cg-"))
    pg = EmbeddedPostgres(root)
    base = pg.start()
    try:
        rows = []
        for rnd in range(args.rounds):
            without, gc_without = await per_job(base, args.jobs, args.warmup, False, root, args.keep,
                                                worker=args.forge_worker, cache_sim=args.cache_sim)
            if args.without_only:
                print(f"round {rnd + 1}: CPU instructions per job (callgrind, {args.jobs:,} no-op jobs drained, "
                      f"[worker] {args.forge_worker or 'defaults'}): without forge-observe {without:,.0f}, of which "
                      f"garbage collection {gc_without:,.0f}  (load avg {os.getloadavg()[0]:.1f})", flush=True)
                continue
            with_, gc_with = await per_job(base, args.jobs, args.warmup, True, root, args.keep,
                                           not args.skip_aggregation, worker=args.forge_worker, cache_sim=args.cache_sim)
            rows.append((without, with_))
            print(f"round {rnd + 1}: CPU instructions per job (callgrind, {args.jobs:,} no-op jobs drained): "
                  f"without forge-observe {without:,.0f}, with {with_:,.0f}, added {with_ - without:+,.0f} "
                  f"({with_ / without:.3f}x); of which garbage collection {gc_without:,.0f} and {gc_with:,.0f}, "
                  f"added without it {(with_ - gc_with) - (without - gc_without):+,.0f}  "
                  f"(load avg {os.getloadavg()[0]:.1f})", flush=True)
    finally:
        pg.release()
        shutil.rmtree(root, ignore_errors=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--jobs", type=int, default=5000, help="jobs counted per side")
    p.add_argument("--warmup", type=int, default=2000, help="jobs drained before counting")
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--keep", metavar="DIR", default="", help="copy the callgrind dumps there (callgrind_annotate)")
    p.add_argument("--forge-worker", type=lambda s: {k: json.loads(v) for k, v in (kv.split("=", 1) for kv in s.split(",") if kv)},
                   default={}, help="[worker] settings of the node, e.g. prefetch=0 (default: none, the defaults)")
    p.add_argument("--without-only", action="store_true", help="count the node without forge-observe only")
    p.add_argument("--cache-sim", action="store_true",
                   help="callgrind's cache simulation too (the --keep dumps then hold L1 and last-level misses)")
    p.add_argument("--worker-json", default="{}", help=argparse.SUPPRESS)
    p.add_argument("--serve", metavar="URL", help=argparse.SUPPRESS)
    p.add_argument("--observe", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--skip-aggregation", action="store_true",
                   help="leave forge-observe's events unaggregated (isolates its recording on the job path)")
    args = p.parse_args()
    from loguru import logger

    logger.remove()
    logger.add(sys.stderr, level="WARNING")
    import uvloop

    if args.serve:
        uvloop.run(serve(args.serve, args.observe, not args.skip_aggregation, json.loads(args.worker_json)))
        return
    if not shutil.which("valgrind"):
        raise SystemExit("needs valgrind: apt-get install -y valgrind")
    uvloop.run(main_async(args))


if __name__ == "__main__":
    main()
