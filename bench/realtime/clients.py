"""Benchmark clients: thousands of minimal WebSocket clients (``wsclient.py``) that record when
each new row id first reaches each of them.

Used in the benchmark process (``open_clients``) and as a separate client process
(``python clients.py URL``), so that the clients of one measurement can be spread over several
processes and the harness is never the one process that saturates. Times are
``time.perf_counter()`` (CLOCK_MONOTONIC on Linux: one clock for every process on the machine),
so the writers' commit times in the benchmark process and the receive times here compare.

A client process reads commands on stdin, one JSON object a line, and answers each with one
JSON line on stdout:

- ``{"cmd": "open", "count": N, "first": I, "function": F, "topics": T | null, "topic": X | null,
  "dense": bool}``: open N clients (client i subscribes to F with ``topic = (first + i) % T``, or
  ``topic = X``; ``function: null`` leaves them idle) -> ``{"ok": true}``. ``dense``: every row
  written belongs to the clients' one query (bench (c)), so a result also shows the effect of the
  rows that already fell out of it (it holds the five newest): a client that skipped an
  intermediate result records those rows at the time of the first result after them, and none
  goes uncounted
- ``{"cmd": "reset"}``: forget what was received -> ``{"ok": true}``
- ``{"cmd": "report", "path": P}``: write the received (row id, time) pairs to P (two arrays,
  int64 ids, float64 kernel receive times, float64 read times) -> ``{"ok": true, "deliveries": n, "pushes": m, "stalls": [...],
  "last_hashes": {hash: clients}}`` (this process's event-loop stalls since the last reset, ``stalls.py``; how many
  of its clients hold each result hash as their latest)
- ``{"cmd": "final", "function": F, "args": A}``: subscribe one more client, take the hash of the result
  the server sends it first (its current result), close it -> ``{"ok": true, "hash": h}``
- ``{"cmd": "close"}``: close every socket and exit.
"""

from __future__ import annotations

import array
import asyncio
import collections
import gc
import json
import sys
import time
from pathlib import Path

import msgspec

sys.path.insert(0, str(Path(__file__).parent))
import stalls  # noqa: E402
import wsclient  # noqa: E402


class _Row(msgspec.Struct):
    id: int


class _Msg(msgspec.Struct):
    type: str
    hash: str | None = None
    data: list[_Row] | None = None


# only the fields the benchmark looks at: the rest of a push is skipped by the decoder
_decode_push = msgspec.json.Decoder(_Msg).decode
_decode = msgspec.json.Decoder().decode


class Client:
    """One benchmark socket: records (row id, receive time) of rows newer than any it had."""

    __slots__ = ("proto", "max_id", "ids", "times", "read_times", "pushes", "waiter", "errors", "dense", "last_hash")

    def __init__(self, ids: array.array, times: array.array, read_times: array.array, dense: bool = False) -> None:
        self.proto, self.max_id, self.pushes, self.waiter, self.dense = None, 0, 0, None, dense
        #: the hash of the newest result received: at the end of a step, the server's final result's if it got there
        self.last_hash: str | None = None
        self.errors: list[dict] = []
        self.ids, self.times, self.read_times = ids, times, read_times

    def on_message(self, now: float, payload: bytes) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(_decode(payload))
            return
        msg = _decode_push(payload)
        if msg.type != "data" or msg.data is None:
            if msg.type == "error":
                self.errors.append(_decode(payload))
            return
        self.pushes += 1
        self.last_hash = msg.hash
        top = self.max_id
        if self.dense and msg.data and top:
            # rows newer than any seen but older than this result's oldest: pushed out of the result
            # by newer rows before this client got a result holding them (it skipped one)
            for rid in range(top + 1, min(row.id for row in msg.data)):
                self.ids.append(rid)
                self.times.append(now)
                self.read_times.append(self.proto.read_at)
        for row in msg.data:
            rid = row.id
            if rid > self.max_id:
                self.ids.append(rid)
                self.times.append(now)
                self.read_times.append(self.proto.read_at)
                if rid > top:
                    top = rid
        self.max_id = top

    async def request(self, text: str) -> dict:
        self.waiter = asyncio.get_running_loop().create_future()
        self.proto.send(text)
        try:
            return await asyncio.wait_for(self.waiter, 60)
        finally:
            self.waiter = None


class ClientSet:
    """The clients of one process and what they received (shared arrays: cheap to append)."""

    def __init__(self) -> None:
        self.clients: list[Client] = []
        self.ids = array.array("q")
        self.times = array.array("d")  # when the kernel received each (connect_stamped)
        self.read_times = array.array("d")  # when this process read it: later by its own waits for a core

    def reset(self) -> None:
        del self.ids[:]
        del self.times[:]
        del self.read_times[:]
        for c in self.clients:
            c.pushes = 0

    @property
    def pushes(self) -> int:
        return sum(c.pushes for c in self.clients)

    async def open(self, url: str, n: int, subscription, concurrency: int = 50, dense: bool = False) -> None:
        """``subscription(i)`` -> (function, args) or None for an idle (authenticated) socket."""
        opened: list[Client | None] = [None] * n
        sem = asyncio.Semaphore(concurrency)

        async def one(i: int) -> None:
            async with sem:
                c = Client(self.ids, self.times, self.read_times, dense)
                for attempt in range(5):
                    try:
                        c.proto = await wsclient.connect_stamped(url, c.on_message)
                        break
                    except (OSError, asyncio.TimeoutError, ConnectionError):
                        await asyncio.sleep(0.2 * (attempt + 1))
                else:
                    raise RuntimeError(f"client {i} could not connect")
                assert (await c.request('{"type":"auth","token":null}'))["type"] == "ready"
                sub = subscription(i)
                if sub is not None:
                    first = await c.request(json.dumps({"type": "subscribe", "id": "s", "function": sub[0],
                                                        "args": sub[1]}))
                    assert first["type"] == "data", first
                    c.max_id = max([r["id"] for r in first["data"]], default=0)
                    c.last_hash = first["hash"]
                opened[i] = c

        await asyncio.gather(*(one(i) for i in range(n)))
        self.clients.extend(opened)  # type: ignore[arg-type]
        # thousands of long-lived client objects: keep them out of full GC passes, so the client
        # side adds no collection pauses to the latencies measured (the node does the same)
        gc.freeze()

    async def keepalive(self, every: float = 20.0, tick: float = 0.1) -> None:
        """Ping every socket once per ``every`` seconds, as real clients do: the server closes a
        connection that sent nothing for ``[realtime] idle_timeout`` (120 s) with 4000. Spread over
        the interval (a slice of the sockets per ``tick``), as independent clients' timers are: all
        5,000 at once was a burst of 5,000 messages for the node to handle every 20 s, a stall of
        the harness's making in the middle of (c)'s fan-outs."""
        next_client = 0
        while True:
            await asyncio.sleep(tick)
            clients = self.clients
            if not clients:
                continue
            share = max(1, round(len(clients) * tick / every))
            for _ in range(min(share, len(clients))):
                next_client %= len(clients)
                c = clients[next_client]
                next_client += 1
                if c.proto is not None and c.waiter is None:
                    c.proto.send('{"type":"ping"}')

    def last_hashes(self) -> dict[str | None, int]:
        return dict(collections.Counter(c.last_hash for c in self.clients))

    async def current_hash(self, url: str, function: str, args: dict) -> str:
        """The hash of the server's current result of ``function(args)``: what a new subscriber is sent first."""
        c = Client(array.array("q"), array.array("d"), array.array("d"))
        c.proto = await wsclient.connect_stamped(url, c.on_message)
        try:
            assert (await c.request('{"type":"auth","token":null}'))["type"] == "ready"
            first = await c.request(json.dumps({"type": "subscribe", "id": "final", "function": function, "args": args}))
            assert first["type"] == "data", first
            return first["hash"]
        finally:
            c.proto.close()

    async def close(self) -> None:
        for c in self.clients:
            c.proto.close()
        self.clients.clear()
        await asyncio.sleep(0.5)


def subscription_of(spec: dict):
    function, topics, topic, first = spec.get("function"), spec.get("topics"), spec.get("topic"), spec.get("first", 0)
    if function is None:
        return lambda i: None
    if topics:
        return lambda i: (function, {"topic": (first + i) % topics})
    return lambda i: (function, {"topic": topic})


async def serve(url: str) -> None:
    """The client process: commands on stdin, answers on stdout (see the module docstring)."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    clients = ClientSet()
    pinger = asyncio.create_task(clients.keepalive())
    watch = stalls.LoopWatch()  # this process's own stalls: a push read late here reads as latency
    watch.start()
    since = time.perf_counter()

    def answer(obj: dict) -> None:
        sys.stdout.write(json.dumps(obj) + "\n")
        sys.stdout.flush()

    while True:
        line = await reader.readline()
        if not line:
            break
        cmd = json.loads(line)
        try:
            if cmd["cmd"] == "open":
                await clients.open(url, cmd["count"], subscription_of(cmd), dense=bool(cmd.get("dense")))
                answer({"ok": True})
            elif cmd["cmd"] == "reset":
                clients.reset()
                since = time.perf_counter()
                answer({"ok": True})
            elif cmd["cmd"] == "report":
                with open(cmd["path"], "wb") as fh:
                    clients.ids.tofile(fh)
                    clients.times.tofile(fh)
                    clients.read_times.tofile(fh)
                errors = [e for c in clients.clients for e in c.errors]
                closed = sum(c.proto.transport is None or c.proto.transport.is_closing() for c in clients.clients)
                answer({"ok": True, "deliveries": len(clients.ids), "pushes": clients.pushes, "errors": errors[:5],
                        "error_count": len(errors), "closed": closed,
                        "stalls": watch.since(since), "last_hashes": clients.last_hashes()})
            elif cmd["cmd"] == "final":
                answer({"ok": True, "hash": await clients.current_hash(url, cmd["function"], cmd["args"])})
            elif cmd["cmd"] == "close":
                pinger.cancel()
                await clients.close()
                answer({"ok": True})
                break
        except Exception as exc:  # tell the benchmark instead of hanging it
            answer({"ok": False, "error": f"{type(exc).__name__}: {exc}"})


if __name__ == "__main__":
    import uvloop

    uvloop.run(serve(sys.argv[1]))
