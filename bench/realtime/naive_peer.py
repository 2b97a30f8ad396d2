"""The naive peer: a live-query server that NOTIFYs per row and re-runs every subscription
on each notification (no read sets, no dedupe, no coalescing, no hashes).

Speaks the subset of the FORGE /ws protocol the benchmark uses (auth -> ready, subscribe ->
data) so the same clients measure both. Run: ``python naive_peer.py DB_URL PORT``.
"""

from __future__ import annotations

import asyncio
import json
import sys

import asyncpg
import websockets

SQL = "SELECT id, topic, payload FROM bench_items WHERE topic = $1 ORDER BY id DESC LIMIT 5"
TRIGGER = """
CREATE OR REPLACE FUNCTION bench_naive_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('bench_naive', NEW.topic::text);
    RETURN NULL;
END $$;
CREATE OR REPLACE TRIGGER bench_naive_notify AFTER INSERT ON bench_items
    FOR EACH ROW EXECUTE FUNCTION bench_naive_notify();
"""


class NaivePeer:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool
        self.subs: list[tuple[object, str, int]] = []  # (socket, id, topic)
        self.pending = asyncio.Queue()

    async def push(self, ws, sub_id: str, topic: int) -> None:
        async with self.pool.acquire() as conn:
            rows = await conn.fetch(SQL, topic)
        data = [dict(r) for r in rows]
        try:
            await ws.send(json.dumps({"type": "data", "id": sub_id, "data": data}))
        except websockets.ConnectionClosed:
            pass

    async def handler(self, ws) -> None:
        mine = []
        try:
            async for raw in ws:
                msg = json.loads(raw)
                if msg["type"] == "auth":
                    await ws.send(json.dumps({"type": "ready"}))
                elif msg["type"] == "subscribe":
                    entry = (ws, msg["id"], int(msg["args"]["topic"]))
                    self.subs.append(entry)
                    mine.append(entry)
                    await self.push(*entry)
        finally:
            for e in mine:
                self.subs.remove(e)

    async def rerun_all(self) -> None:
        # every notification re-runs every subscription, each on its own
        while True:
            await self.pending.get()
            await asyncio.gather(*(self.push(*s) for s in list(self.subs)))


async def main(url: str, port: int) -> None:
    pool = await asyncpg.create_pool(url, min_size=4, max_size=16)
    await pool.execute(TRIGGER)
    peer = NaivePeer(pool)
    listener = await asyncpg.connect(url)
    await listener.add_listener("bench_naive", lambda *a: peer.pending.put_nowait(a[-1]))
    runner = asyncio.create_task(peer.rerun_all())
    async with websockets.serve(peer.handler, "127.0.0.1", port, max_size=1 << 20):
        print("naive peer ready", flush=True)
        try:
            await asyncio.Future()
        finally:
            runner.cancel()
            await pool.execute("DROP TRIGGER IF EXISTS bench_naive_notify ON bench_items")


if __name__ == "__main__":
    import uvloop  # the same event loop as the FORGE node

    uvloop.run(main(sys.argv[1], int(sys.argv[2])))
