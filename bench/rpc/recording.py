"""bench/rpc/recording.py: CPU instructions forge-observe's recording costs per ``/rpc`` request, in-process.

Runs N fake requests, each in its own task as uvicorn runs them, doing what the gateway
(``Telemetry.start_request`` / ``end_request``) and the executor (``current()``, ``call_clock``,
``call_started`` / ``call_ended`` around an ``asyncio.timeout``) do around a call of a trivial
function, with forge-observe's aggregation of the drained events every 1,000 requests; once with
a Telemetry attached at the default sampling rate and once detached, each under callgrind, and
prints the difference per request. Load-independent and free of the node's timed loops, so it
moves only with the recording code (``run.py --instructions`` counts the whole node, whose
periodic work makes single runs differ by a few thousand instructions per request).

    .venv/bin/python bench/rpc/recording.py [--requests 20000] [--sample-rate 0.01]
"""

from __future__ import annotations

import argparse
import asyncio
import re
import subprocess
import sys
import types


def run(mode: str, n: int, rate: float) -> None:
    from forge_kernel.telemetry import MAX_CALL_BATCH, Telemetry, call_clock, current
    from forge_observe.metrics import NodeMetrics

    tel = Telemetry()
    if mode == "on":
        tel.attach(lambda trace: None, sample_rate=rate)
    metrics = NodeMetrics(types.SimpleNamespace(id="n", telemetry=tel), process=False)

    async def fn() -> int:
        return 8

    async def call(name: str, kind: str, request_id: str) -> int:  # the executor's recording (Executor.call)
        if tel.enabled:
            parent = current()
            span = None if parent is not None and not parent.sampled else tel.call_started(name, kind, request_id)
            t0, code = call_clock(), "OK"
        else:
            t0 = 0.0
        try:
            async with asyncio.timeout(10):
                return await fn()
        finally:
            if t0:
                took = call_clock() - t0
                batch = tel.ok_calls.get(name) if span is None and code == "OK" and took < tel.keep_over else None
                if batch is not None and batch.kind is kind and len(batch) < MAX_CALL_BATCH:
                    batch.append(took)
                else:
                    tel.call_ended(span, name, kind, request_id, t0, code)

    async def serve() -> None:  # the gateway's (serve_rpc)
        span = None
        if tel.enabled:
            span = tel.start_request("POST /rpc/value", None)
        status = 0
        try:
            await call("value", "query", "req")
            status = 200
        finally:
            if span is not None:
                tel.end_request(span, status, "req")

    async def main() -> None:
        loop = asyncio.get_running_loop()
        for i in range(n):
            await loop.create_task(serve())
            if i % 1000 == 999:
                metrics.apply(tel.drain())

    asyncio.run(main())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=20000)
    ap.add_argument("--sample-rate", type=float, default=0.01)
    ap.add_argument("--mode", choices=["on", "off"], help=argparse.SUPPRESS)  # the measured child
    args = ap.parse_args()
    if args.mode:
        run(args.mode, args.requests, args.sample_rate)
        return
    totals = {}
    for mode in ("off", "on"):
        out = subprocess.run(["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null", sys.executable,
                              __file__, "--mode", mode, "--requests", str(args.requests), "--sample-rate",
                              str(args.sample_rate)], capture_output=True, text=True, check=True).stderr
        totals[mode] = int(re.search(r"Collected : (\d+)", out).group(1).replace(",", ""))
    print(f"recording per request: {(totals['on'] - totals['off']) / args.requests:,.0f} CPU instructions "
          f"({args.requests} requests, sample rate {args.sample_rate}; callgrind totals {totals})")


if __name__ == "__main__":
    main()
