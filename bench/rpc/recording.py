"""bench/rpc/recording.py: CPU instructions forge-observe's recording costs per ``/rpc`` request, in-process.

Runs N fake requests, each in its own task as uvicorn runs them, doing what the gateway
(``Telemetry.start_request`` / ``end_request``) and the executor (``current()``, ``call_clock``,
``call_started`` / ``call_ended`` around an ``asyncio.timeout``) do around a call of a trivial
function, with forge-observe's aggregation of the drained events every 1,000 requests; once with
a Telemetry attached at the default sampling rate and once detached, each under callgrind, and
prints the difference per request. Load-independent and free of the node's timed loops, so it
moves only with the recording code (``run.py --instructions`` counts the whole node, whose
periodic work makes single runs differ by a few thousand instructions per request).

    .venv/bin/python bench/rpc/recording.py [--requests 20000] [--sample-rate 0.01] [--parts] [--time ROUNDS]

``--parts`` counts, the same way, each piece of that recording alone in the same per-request task
(what is left when forge-observe is on, taken apart): the ``contextvars`` set and reset of one
object, making the telemetry's unsampled request root object, four ``call_clock`` readings, the
gateway's ``start_request`` / ``end_request`` alone, and the executor's recording alone (its
parent an unsampled root made current by a ``contextvars`` set, counted in ``contextvars`` too).
Children run with ``PYTHONHASHSEED=0`` and without address randomisation; even so the same child
counted 1,403M-1,412M instructions over five runs of 5,000 requests (about +-0.9k per request),
so a piece's figure is good to a few hundred instructions at 10,000 requests, not better.

``--time ROUNDS`` times the same modes instead, in this process (no valgrind): CPU seconds per request
of each mode, ROUNDS runs of each interleaved (the order reversed every other round), medians. What
the instruction counts cost in time when the recording's code and data are warm, to set beside the
node's CPU per request, where they are not (load-dependent: report the load average beside it).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import statistics
import subprocess
import sys
import time
import types


#: --parts: what each piece counts (the measured child's mode) and what it is
PARTS = {
    "contextvar": "contextvars set + reset of one object",
    "root": "the unsampled request root object (made and freed)",
    "clocks": "four call_clock readings (two per request, two per call)",
    "request": "Telemetry.start_request + end_request (includes contextvar and root)",
    "call": "the executor's recording of the call (its parent made current: includes contextvar)",
}


def run(mode: str, n: int, rate: float) -> None:
    from forge_kernel.telemetry import _current, _new_span, MAX_CALL_BATCH, Telemetry, call_clock, current
    from forge_observe.metrics import NodeMetrics

    tel = Telemetry()
    if mode != "off":
        tel.attach(lambda trace: None, sample_rate=rate)
    record_call = mode in ("on", "call")
    record_request = mode in ("on", "request")
    # an unsampled root made once: the parent --parts call and contextvar make current
    shared = _new_span(tel._unsampled_root)
    shared.sampled = False
    metrics = NodeMetrics(types.SimpleNamespace(id="n", telemetry=tel), process=False)

    async def fn() -> int:
        return 8

    async def call(name: str, kind: str, request_id: str) -> int:  # the executor's recording (Executor.call)
        if record_call:
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
        span = token = None
        if record_request:
            span = tel.start_request("POST /rpc/value", None)
        elif mode in ("contextvar", "call"):
            token = _current.set(shared)
        elif mode == "root":
            root = _new_span(tel._unsampled_root)
            root.sampled, root.name, root._t1, root._t0 = False, "POST /rpc/value", 0.0, 0.0
            del root
        elif mode == "clocks":
            t0 = call_clock()
            t1 = call_clock()
            t1 = call_clock() - t1
            t0 = call_clock() - t0
        status = 0
        try:
            await call("value", "query", "req")
            status = 200
        finally:
            if span is not None:
                tel.end_request(span, status, "req")
            elif token is not None:
                _current.reset(token)

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
    ap.add_argument("--parts", action="store_true", help="also count each piece of the recording alone (see above)")
    ap.add_argument("--time", type=int, metavar="ROUNDS", help="time the modes in-process instead (see above)")
    ap.add_argument("--mode", choices=["on", "off", *PARTS], help=argparse.SUPPRESS)  # the measured child
    args = ap.parse_args()
    if args.mode:
        run(args.mode, args.requests, args.sample_rate)
        return
    modes = ["off", "on", *(PARTS if args.parts else ())]
    if args.time:
        timed(modes, args.requests, args.sample_rate, args.time)
        return
    totals = {}
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    for mode in modes:
        out = subprocess.run(["setarch", "-R", "valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null",
                              sys.executable, __file__, "--mode", mode, "--requests", str(args.requests),
                              "--sample-rate", str(args.sample_rate)], capture_output=True, text=True, check=True,
                             env=env).stderr
        totals[mode] = int(re.search(r"Collected : (\d+)", out).group(1).replace(",", ""))
    print(f"recording per request: {(totals['on'] - totals['off']) / args.requests:,.0f} CPU instructions "
          f"({args.requests} requests, sample rate {args.sample_rate}; callgrind totals {totals})")
    for part, what in PARTS.items() if args.parts else ():
        print(f"  {part:<10} {(totals[part] - totals['off']) / args.requests:>7,.0f}  {what}")


def timed(modes: list[str], n: int, rate: float, rounds: int) -> None:
    """``--time``: each mode run ``rounds`` times in this process, interleaved; CPU microseconds per request."""
    took: dict[str, list[float]] = {mode: [] for mode in modes}
    for i in range(rounds):
        for mode in modes if i % 2 == 0 else modes[::-1]:
            t0 = time.process_time()
            run(mode, n, rate)
            took[mode].append((time.process_time() - t0) / n * 1e6)
    base = statistics.median(took["off"])
    print(f"CPU per request, in-process ({n} requests x {rounds} rounds, sample rate {rate}; medians):")
    for mode in modes:
        us = statistics.median(took[mode])
        what = "recording off" if mode == "off" else PARTS.get(mode, "recording on")
        print(f"  {mode:<10} {us:7.2f} us  {us - base:+6.2f}  {what}")


if __name__ == "__main__":
    main()
