"""One FORGE worker node in a process of its own, for run.py's several-process systems (FORGE_SHAPES:
``forge_2x25`` = two of these with concurrency 25 each, the cluster `forge-node start` run twice makes).

    python worker_node.py --url URL --concurrency C [--observe] [--worker JSON]

The node is the one ``run.forge_node()`` builds for the in-process systems (worker role only,
forge_bench_jobs as the app, forge-observe loaded at its defaults or not, the start-up heap
frozen as `forge-node start` does), with ``[worker] concurrency = C``. It prints on stdout:

* ``ready`` once the node runs (its LISTEN and claim loop are up);
* ``first <epoch seconds>`` when its first job starts (drain timing starts at the earliest);
* ``done <jobs> <claim statements>`` after it stopped: the no-op jobs this process ran (run.py adds
  them up and checks them against forge_job_history: each job run exactly once per attempt) and
  the claim statements its worker sent.

It stops (a graceful node stop: in-flight jobs finish, claimed-ahead ones go back) on SIGTERM or
when its stdin closes, so it never outlives run.py.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


async def main(args: argparse.Namespace) -> None:
    import forge_bench_jobs as fb
    from run import forge_node

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    # stdin closing (run.py gone or done) stops it too
    threading.Thread(target=lambda: (sys.stdin.read(), loop.call_soon_threadsafe(stop.set)), daemon=True).start()
    worker = {**json.loads(args.worker), "concurrency": args.concurrency}
    node = await forge_node(args.url, observe=args.observe, **worker)
    await node.start()
    try:
        print("ready", flush=True)

        async def first_job() -> None:
            while not fb.STATE["done"]:
                await asyncio.sleep(0.001)
            # fb.noop stamped the start with perf_counter: the same moment on the wall clock, which the
            # processes share
            print(f"first {time.time() - (time.perf_counter() - fb.STATE['first']):.6f}", flush=True)

        watch = asyncio.create_task(first_job())
        await stop.wait()
        watch.cancel()
        stats = node.worker.stats
    finally:
        await node.stop()
    print(f"done {fb.STATE['done']} {stats['statements']}", flush=True)


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--url", required=True)
    p.add_argument("--concurrency", type=int, required=True)
    p.add_argument("--observe", action="store_true", help="load forge-observe at its defaults")
    p.add_argument("--worker", default="{}", help="further [worker] settings, a JSON object")
    args = p.parse_args()
    from run import run_quietly

    run_quietly(main(args))
