"""The per-connection outbox, with an in-memory transport (no database needed)."""

from __future__ import annotations

import asyncio
import json

from forge_realtime.config import RealtimeConfig
from forge_realtime.engine import Subscription
from forge_realtime.session import CLOSE_IDLE, CLOSE_TOO_SLOW, Session


class FakeEngine:
    def __init__(self) -> None:
        self.unsubscribed: list[str] = []

    def unsubscribe(self, sub: Subscription) -> None:
        self.unsubscribed.append(sub.sub_id)


class FakeTransport:
    def __init__(self, *, block_sends: bool = False) -> None:
        self.incoming: asyncio.Queue = asyncio.Queue()
        self.sent: list[dict] = []
        self.closed_with: tuple[int, str] | None = None
        self.block = asyncio.Event()
        if not block_sends:
            self.block.set()

    async def receive(self):
        return await self.incoming.get()

    async def send_text(self, text: str) -> None:
        await self.block.wait()
        self.sent.append(json.loads(text))

    async def close(self, code: int, reason: str) -> None:
        self.closed_with = (code, reason)
        self.incoming.put_nowait(None)


def session(transport, **cfg) -> Session:
    s = Session(FakeEngine(), None, RealtimeConfig(**cfg), transport)
    for sub_id in ("a", "b"):
        s.subscriptions[sub_id] = Subscription(s, sub_id, "q", {}, s.auth)
    return s


def data(sub_id: str, value: int) -> str:
    return json.dumps({"type": "data", "id": sub_id, "data": value})


async def test_latest_result_wins_while_the_client_is_not_reading():
    t = FakeTransport(block_sends=True)
    s = session(t)
    task = asyncio.create_task(s.serve())
    await asyncio.sleep(0)
    for i in range(100):
        s.push("a", data("a", i), "data")
        s.push("b", data("b", -i), "data")
    await asyncio.sleep(0.05)
    t.block.set()  # the client catches up
    for _ in range(100):
        if len(t.sent) >= 2 and t.sent[-1]["id"] == "b":
            break
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.05)
    # at most the push already in flight, then only the latest result per subscription
    sent = [(m["id"], m["data"]) for m in t.sent]
    assert sent[-2:] == [("a", 99), ("b", -99)] and len(sent) <= 3
    t.incoming.put_nowait(None)
    await task
    assert sorted(s.engine.unsubscribed) == ["a", "b"]


async def test_a_blocked_send_closes_the_socket_with_4008():
    t = FakeTransport(block_sends=True)
    s = session(t, send_timeout=0.2)
    task = asyncio.create_task(s.serve())
    s.push("a", data("a", 1), "data")
    await asyncio.wait_for(task, 5)
    assert t.closed_with[0] == CLOSE_TOO_SLOW and "cannot keep up" in t.closed_with[1]


async def test_an_overflowing_outbox_closes_the_socket_with_4008():
    t = FakeTransport(block_sends=True)
    s = session(t, outbox_limit=5)
    task = asyncio.create_task(s.serve())
    await asyncio.sleep(0)
    for i in range(20):
        await s.handle(json.dumps({"type": "ping", "id": i}))
    await asyncio.wait_for(task, 5)
    assert t.closed_with[0] == CLOSE_TOO_SLOW and "outbox full" in t.closed_with[1]


async def test_idle_sockets_are_closed():
    t = FakeTransport()
    s = session(t, idle_timeout=1)
    await asyncio.wait_for(s.serve(), 5)
    assert t.closed_with[0] == CLOSE_IDLE


async def test_results_for_ended_subscriptions_are_not_sent():
    t = FakeTransport(block_sends=True)
    s = session(t)
    task = asyncio.create_task(s.serve())
    await asyncio.sleep(0)
    s.push("a", data("a", 1), "data")
    s.push("b", data("b", 2), "data")  # queued, then the subscription ends
    await s.handle(json.dumps({"type": "unsubscribe", "id": "b"}))
    t.block.set()
    for _ in range(100):
        if len(t.sent) >= 2:
            break
        await asyncio.sleep(0.01)
    assert sorted((m["type"], m["id"]) for m in t.sent) == [("data", "a"), ("unsubscribed", "b")]
    t.incoming.put_nowait(None)
    await task
