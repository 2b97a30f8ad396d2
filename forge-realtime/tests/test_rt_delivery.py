"""Delivery guarantees end to end (real PostgreSQL, an in-process node serving /ws, real sockets):
the fallback poll delivers without any NOTIFY hint, bursts of writes coalesce into few re-runs,
and a client that stops reading never holds up the others (it is closed with 4008)."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import socket
import struct

import asyncpg

from forge_kernel.testing.procs import eventually
from forge_realtime.capture import _HINT_LOCK_CLASS
from forge_realtime.changes import CHANNEL
from forge_realtime.session import CLOSE_TOO_SLOW

from rt_helpers import realtime, settled, token, ws_connect, ws_url
from rt_helpers import rt_node  # noqa: F401 - pytest fixtures


async def alice_rows(conn) -> list[dict]:
    """What items_of(owner='alice') returns, read straight from the table."""
    rows = await conn.fetch("SELECT id, owner, title, n FROM rt_items WHERE owner = 'alice' ORDER BY id")
    return [dict(r) for r in rows]


async def until(predicate, what: str, timeout: float = 20.0) -> None:
    """Wait (generously) until the synchronous ``predicate()`` holds."""
    async def check() -> bool:
        return bool(predicate())

    await eventually(check, timeout, what, interval=0.01)


async def reader_caught_up(node) -> None:
    """Two complete polls: the second started after every earlier commit."""
    rt = realtime(node)
    start = rt.reader.polls

    def polled() -> bool:
        rt.reader.wake()
        return rt.reader.polls >= start + 2

    await until(polled, "two change-log polls")


# --- 1. the fallback poll alone --------------------------------------------------------------
async def test_fallback_poll_alone_delivers_when_the_hint_gate_is_held(rt_node, forge_db_url):
    node = await rt_node(fallback_poll=0.2)
    rt = realtime(node)
    gate = await asyncpg.connect(forge_db_url)
    listener = await asyncpg.connect(forge_db_url)
    heard: list[str] = []
    try:
        await listener.add_listener(CHANNEL, lambda *a: heard.append(a[2]))
        async with ws_connect(ws_url(node)) as c:
            await c.send({"type": "subscribe", "id": "a", "function": "items_of", "args": {"owner": "alice"}})
            assert (await c.recv())["data"] == []
            await settled(node)
            # hold the hint gate: the capture trigger's pg_try_advisory_xact_lock fails, so no NOTIFY
            await gate.execute("SELECT pg_advisory_lock($1, 0)", _HINT_LOCK_CLASS)
            hints = rt.reader.hints
            async with node.pool.acquire() as conn:  # another session: the gate's own would get the lock
                await conn.execute("INSERT INTO rt_items (owner, title) VALUES ('alice', 'quiet')")
            msg = await c.recv(timeout=20)
            assert msg["type"] == "data" and [i["title"] for i in msg["data"]] == ["quiet"]
            await listener.execute("SELECT 1")  # a round trip: a notification sent before it has arrived
            assert heard == [] and rt.reader.hints == hints, "a hint was sent although the gate was held"

            # not vacuous: with the gate free, the same write does send the hint
            await gate.execute("SELECT pg_advisory_unlock($1, 0)", _HINT_LOCK_CLASS)
            async with node.pool.acquire() as conn:
                await conn.execute("INSERT INTO rt_items (owner, title) VALUES ('alice', 'loud')")
            msg = await c.recv(timeout=20)
            assert [i["title"] for i in msg["data"]] == ["quiet", "loud"]

            async def hinted() -> bool:
                await listener.execute("SELECT 1")
                return bool(heard) and rt.reader.hints > hints

            await eventually(hinted, 20, "the NOTIFY hint once the gate is free")
    finally:
        await gate.close()
        await listener.close()


# --- 2. coalescing ---------------------------------------------------------------------------
async def test_a_burst_of_commits_costs_far_fewer_runs_and_ends_on_the_final_state(rt_node, forge_db_url):
    n = 60
    node = await rt_node()
    rt = realtime(node)
    writers = await asyncpg.create_pool(forge_db_url, min_size=n, max_size=n)
    try:
        async with ws_connect(ws_url(node)) as c:
            await c.send({"type": "subscribe", "id": "a", "function": "items_of", "args": {"owner": "alice"}})
            assert (await c.recv())["data"] == []
            await settled(node)
            runs, pushes = rt.engine.stats.runs, rt.engine.stats.pushes
            # n transactions, each inserting one row the query reads, committed at once
            conns = [await writers.acquire() for _ in range(n)]
            txs = [conn.transaction() for conn in conns]
            for i, (conn, tx) in enumerate(zip(conns, txs)):
                await tx.start()
                await conn.execute("INSERT INTO rt_items (owner, title, n) VALUES ('alice', $1, $2)", f"t{i}", i)
            await asyncio.gather(*(tx.commit() for tx in txs))
            for conn in conns:
                await writers.release(conn)
            await settled(node)
            reruns = rt.engine.stats.runs - runs
            pushed = rt.engine.stats.pushes - pushes
            assert 1 <= reruns <= n // 5, f"{n} writes cost {reruns} re-runs"
            assert 1 <= pushed <= reruns
            received = []
            while True:
                try:
                    received.append(await c.recv(timeout=0.5))
                except asyncio.TimeoutError:
                    break
            assert received and len(received) == pushed and all(m["type"] == "data" for m in received)
            async with writers.acquire() as conn:
                final = await alice_rows(conn)
            assert len(final) == n and received[-1]["data"] == final
            [q] = rt.engine.queries.values()
            assert received[-1]["hash"] == q.hash
    finally:
        await writers.close()


async def test_changes_arriving_while_a_query_runs_cost_one_more_run(rt_node):
    """Every change that arrives while a re-run is in progress is collected; together they cost
    at most one more run (the re-run is held at a gate until all of them have been read)."""
    n = 30
    node = await rt_node()
    rt = realtime(node)
    real = rt.engine.executor
    entered, release = asyncio.Event(), asyncio.Event()
    armed = False

    class GatedExecutor:  # the node's executor; an armed run waits at the gate before it queries
        registry, lookup, authorize = real.registry, real.lookup, real.authorize

        @staticmethod
        async def call(*a, **kw):
            if armed and not entered.is_set():
                entered.set()
                await release.wait()
            return await real.call(*a, **kw)

    rt.engine.executor = GatedExecutor()
    async with ws_connect(ws_url(node)) as c:
        await c.send({"type": "subscribe", "id": "a", "function": "items_of", "args": {"owner": "alice"}})
        assert (await c.recv())["data"] == []
        await settled(node)
        [q] = rt.engine.queries.values()
        runs = q.runs
        armed = True
        await node.executor.call("add_item", {"owner": "alice", "title": "first"})
        await asyncio.wait_for(entered.wait(), 20)  # the re-run it caused is in progress ...
        for i in range(n):  # ... while n more writes commit and are read
            await node.executor.call("add_item", {"owner": "alice", "title": f"t{i}"})
        await reader_caught_up(node)
        release.set()
        msg = await c.recv(timeout=20)
        await settled(node)
        assert q.runs - runs <= 2, f"{n + 1} writes cost {q.runs - runs} re-runs"
        async with node.pool.acquire() as conn:
            final = await alice_rows(conn)
        assert len(final) == n + 1 and msg["data"] == final
        await c.nothing(0.3)  # the coalesced run found the same result: nothing more is pushed


# --- 3. slow clients -------------------------------------------------------------------------
class RawWebSocket:
    """A minimal WebSocket client on a raw socket with a tiny receive buffer, so that when the
    test stops reading, the server's sends really block (a library client would keep reading
    into its own queue)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.buf = b""

    async def open(self) -> "RawWebSocket":
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        self.sock.setblocking(False)
        self.loop = asyncio.get_running_loop()
        await self.loop.sock_connect(self.sock, ("127.0.0.1", self.port))
        key = base64.b64encode(os.urandom(16)).decode()
        await self.loop.sock_sendall(self.sock, (
            f"GET /ws HTTP/1.1\r\nHost: 127.0.0.1:{self.port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode())
        while b"\r\n\r\n" not in self.buf:
            await self._read()
        head, _, self.buf = self.buf.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 101"), head
        return self

    async def _read(self) -> None:
        chunk = await self.loop.sock_recv(self.sock, 65536)
        if not chunk:
            raise EOFError("the server closed the TCP connection")
        self.buf += chunk

    async def send(self, msg: dict) -> None:
        payload, mask = json.dumps(msg).encode(), os.urandom(4)
        size = bytes([0x80 | len(payload)]) if len(payload) < 126 else bytes([0x80 | 126]) + struct.pack("!H", len(payload))
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        await self.loop.sock_sendall(self.sock, b"\x81" + size + mask + masked)

    async def frame(self) -> tuple[int, bytes]:
        """(opcode, payload) of the next frame from the server (unmasked, unfragmented)."""
        while len(self.buf) < 2:
            await self._read()
        opcode, size, offset = self.buf[0] & 0x0F, self.buf[1] & 0x7F, 2
        if size >= 126:
            offset = 4 if size == 126 else 10
            while len(self.buf) < offset:
                await self._read()
            size = int.from_bytes(self.buf[2:offset], "big")
        while len(self.buf) < offset + size:
            await self._read()
        payload, self.buf = self.buf[offset:offset + size], self.buf[offset + size:]
        return opcode, payload

    async def close_code(self, timeout: float = 30.0) -> int:
        """Read (and discard) everything up to the server's close frame; return its code."""
        async def until_close() -> int:
            while True:
                opcode, payload = await self.frame()
                if opcode == 0x8:
                    return struct.unpack("!H", payload[:2])[0]

        return await asyncio.wait_for(until_close(), timeout)

    def close(self) -> None:
        self.sock.close()


async def big_result_and_two_readers(node):
    """Alice's items make a ~3 MB result (far more than the socket buffers hold); a raw client
    subscribes to it and then reads nothing. Returns (that raw socket, its server session)."""
    async with node.pool.acquire() as conn:
        await conn.executemany("INSERT INTO rt_items (owner, title) VALUES ('alice', $1)", [("x" * 8000,)] * 400)
    slow = await RawWebSocket(node.ports["http"]).open()
    await slow.send({"type": "auth", "token": token("slow")})
    opcode, payload = await slow.frame()
    assert opcode == 0x1 and json.loads(payload)["type"] == "ready"
    await slow.send({"type": "subscribe", "id": "s", "function": "items_of", "args": {"owner": "alice"}})
    # from here on the slow client reads nothing
    [session] = [s for s in realtime(node).sessions if s.auth.user_id == "slow"]
    return slow, session


async def fast_gets_every_update(node, fast, count: int, start: int) -> None:
    for i in range(count):
        await node.executor.call("add_item", {"owner": "alice", "title": f"new{i}"})
        msg = await fast.recv_type("data", timeout=20)
        assert len(msg["data"]) == start + i + 1 and msg["data"][-1]["title"] == f"new{i}"


async def test_a_client_that_stops_reading_does_not_hold_up_others(rt_node):
    # a blocked send alone would take 60 s to close the socket: the fast client's updates below
    # arrive long before, so they cannot have waited for the slow socket
    node = await rt_node(send_timeout=60, outbox_limit=4)
    slow, session = await big_result_and_two_readers(node)
    try:
        async with ws_connect(ws_url(node), token("fast"), max_size=None) as fast:
            await fast.send({"type": "subscribe", "id": "f", "function": "items_of", "args": {"owner": "alice"}})
            assert len((await fast.recv())["data"]) == 400
            await fast_gets_every_update(node, fast, 5, 400)
            # the slow socket is stuck in a send: newer results wait in its outbox (latest wins)
            await until(lambda: bool(session._data), "a result waiting for the slow client", 20)
            assert not session.closed and len(session._data) == 1
            # control messages (pongs) pile up behind the blocked send until the outbox overflows
            # (one at a time, stopping at the close: bytes sent to a closed socket would reset it)
            for i in range(20):
                await slow.send({"type": "ping", "id": i})
                await until(lambda: session.closed or len(session._control) > i, "the ping queued", 20)
                if session.closed:
                    break
            assert i == 4  # outbox_limit pongs queued, the next one overflowed
            await until(lambda: session.close_code == CLOSE_TOO_SLOW, "the slow client closed", 20)
            assert await slow.close_code() == CLOSE_TOO_SLOW
            await until(lambda: session not in realtime(node).sessions, "the session ended", 20)
            # the fast client is unaffected
            await node.executor.call("add_item", {"owner": "alice", "title": "after"})
            assert (await fast.recv_type("data", timeout=20))["data"][-1]["title"] == "after"
    finally:
        slow.close()


async def test_a_send_blocked_longer_than_send_timeout_closes_with_4008(rt_node):
    node = await rt_node(send_timeout=1.0)
    slow, session = await big_result_and_two_readers(node)
    try:
        async with ws_connect(ws_url(node), token("fast"), max_size=None) as fast:
            await fast.send({"type": "subscribe", "id": "f", "function": "items_of", "args": {"owner": "alice"}})
            assert len((await fast.recv())["data"]) == 400
            await fast_gets_every_update(node, fast, 3, 400)
            await until(lambda: session.close_code == CLOSE_TOO_SLOW, "the slow client closed", 30)
            assert await slow.close_code() == CLOSE_TOO_SLOW
            await fast_gets_every_update(node, fast, 2, 403)
    finally:
        slow.close()
