"""CPU per push of the fan-out's Python path, without the sockets: a load-independent yardstick
for bench (c).

One live query, ``--subscribers`` sessions (forge_realtime's real ``Session`` and engine, each
on forge-gateway's real ``WebSocketProtocol.write_now``) whose transport's write only counts
bytes. Prints the thread CPU time per push of ``LiveQueryEngine._deliver`` (median of
``--rounds``): what the node spends per subscriber besides the ``write`` system call itself.

    .venv/bin/python bench/realtime/fanout.py [--subscribers 5000] [--rounds 30] [--ids same|distinct] [--no-telemetry]
    .venv/bin/python bench/realtime/fanout.py --sockets      # real loopback sockets, beside bare writes

With ``--sockets`` every session's protocol writes onto a real uvloop TCP transport (the reading
ends in another process, as ``write_floor.py``'s) and each round is timed twice, alternating: the
fan-out, and a bare ``transport.write`` of the same frame onto the same sockets (the floor). The
difference is what the fan-out's Python path costs in place, where every push also meets caches
the system call has just evicted (several times what the stubbed run shows).

Its CPU time is noisy on a shared machine; instructions per push are not: run it under callgrind
with two round counts and divide the difference (``valgrind --tool=callgrind python fanout.py
--subscribers 2000 --rounds 2``, then ``--rounds 12``; (totals(12) - totals(2)) / 20,000).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import time
from pathlib import Path

from forge_gateway.websocket import WebSocketProtocol, text_frame
from forge_realtime.config import RealtimeConfig
from forge_realtime.engine import LiveQuery, LiveQueryEngine, Subscription, encode, result_hash
from forge_realtime.session import Session
from forge_kernel.executor import ANONYMOUS


class CountingTransport:
    """An asyncio transport whose writes are only counted (as little work as possible here: what
    is measured is the path to the transport)."""

    def __init__(self) -> None:
        self.writes = 0

    def is_closing(self) -> bool:
        return False

    def write(self, data: bytes) -> None:
        self.writes += 1

    def writelines(self, parts) -> None:
        self.writes += 1


def protocol(transport: CountingTransport) -> WebSocketProtocol:
    """The gateway's protocol in its open state, without a server around it."""
    p = WebSocketProtocol.__new__(WebSocketProtocol)
    p.handshake_complete, p.close_sent, p.disconnected, p.initial_response = True, False, False, None
    p.writable = asyncio.Event()
    p.writable.set()
    p.transport = transport
    return p


class Transport:
    def __init__(self, write_now) -> None:
        self.write_now = write_now


async def main(args: argparse.Namespace) -> None:
    executor = None
    if args.telemetry:  # as a node with forge-observe installed runs it: 1% of traces sampled
        import types

        from forge_kernel.telemetry import Telemetry

        tel = Telemetry()
        tel.attach(lambda trace: None, sample_rate=0.01)
        executor = types.SimpleNamespace(node=types.SimpleNamespace(telemetry=tel))
    engine = LiveQueryEngine(executor=executor, capture=None)
    config = RealtimeConfig()
    q = LiveQuery(("topic_latest", '{"topic":1000}', "*"), "topic_latest", {"topic": 1000})
    transports = []
    real = await open_sockets(args.subscribers) if args.sockets else None
    for i in range(args.subscribers):
        t = CountingTransport() if real is None else real[0][i]
        transports.append(t)
        s = Session(engine, None, config, Transport(protocol(t).write_now))
        sub_id = "s" if args.ids == "same" else f"s{i}"
        sub = Subscription(s, sub_id, q.function, q.args, ANONYMOUS)
        s.subscriptions[sub_id] = sub
        sub.query = q
        q.subscriptions[sub] = None
    rows = [{"id": 10_000 + i, "topic": 1000, "payload": "payload"} for i in range(5)]
    per_push, floor = [], []
    for rnd in range(args.rounds):
        rows[0]["id"] += 1  # a new result each round: every subscriber gets data
        _publish(q, encode(rows), rnd)
        subs = list(q.subscriptions)
        c0 = time.thread_time()
        engine._deliver(q, subs)
        per_push.append((time.thread_time() - c0) * 1e6 / len(subs))
        if real is not None:
            await asyncio.sleep(0.05)  # the readers catch up (thread time: only this thread's work counts)
            frame = text_frame((subs[0].data_head, q.data_tail))
            c0 = time.thread_time()
            for t in transports:
                t.write(frame)
            floor.append((time.thread_time() - c0) * 1e6 / len(transports))
            await asyncio.sleep(0.05)
    if real is not None:
        real[1].kill()
        real[1].wait()
        fan, bare = statistics.median(per_push), statistics.median(floor)
        print(f"real sockets: {fan:.2f} us of CPU per push through the fan-out, {bare:.2f} per bare write of the "
              f"same frame: {fan - bare:.2f} us is the Python path in place (median of {args.rounds} rounds "
              f"each, {args.subscribers} sockets, ids {args.ids})")
        return
    writes = sum(t.writes for t in transports)
    assert writes == args.subscribers * args.rounds, writes
    print(f"{statistics.median(per_push):.2f} us of CPU per push (Python path, writes stubbed; median of "
          f"{args.rounds} fan-outs to {args.subscribers} subscribers, ids {args.ids}, telemetry "
          f"{'on' if args.telemetry else 'off'})")


async def open_sockets(n: int) -> tuple[list, subprocess.Popen]:
    """``n`` loopback TCP transports of this loop whose reading ends are in another process."""
    loop = asyncio.get_running_loop()
    transports: list = []

    class Accept(asyncio.Protocol):
        def connection_made(self, transport) -> None:
            transports.append(transport)

    server = await loop.create_server(Accept, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    sink = subprocess.Popen([sys.executable, str(Path(__file__).with_name("write_floor.py")), str(n), "--sink",
                             str(port)], stdout=subprocess.PIPE, text=True)
    await loop.run_in_executor(None, sink.stdout.readline)
    while len(transports) < n:
        await asyncio.sleep(0.1)
    server.close()
    return transports, sink


def _publish(q: LiveQuery, body: bytes, position: int) -> None:
    """The result of a run, as ``LiveQueryEngine._finish_run`` stores it."""
    q.result_json, q.hash, q.position = body, result_hash(body), position
    q.data_tail = b"".join((b',"hash":"', q.hash.encode(), b'","position":', str(position).encode(), b',"data":',
                            body, b"}"))


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--subscribers", type=int, default=5000)
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--ids", choices=("same", "distinct"), default="same",
                    help="every subscriber's id the same (as the benchmark's clients) or each its own")
    ap.add_argument("--no-telemetry", dest="telemetry", action="store_false",
                    help="without the node's telemetry (as without forge-observe)")
    ap.add_argument("--sockets", action="store_true", help="real loopback sockets, beside bare writes (see above)")
    a = ap.parse_args()
    if a.sockets:
        import uvloop

        uvloop.run(main(a))
    else:
        asyncio.run(main(a))
