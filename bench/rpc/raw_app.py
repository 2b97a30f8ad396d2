"""The floor: a raw ASGI app (no framework) doing the same SELECT, on the same uvicorn setup.

What any framework costs shows as the distance to this one. It still validates like the others:
a typed body (msgspec Struct, unknown fields refused), a JSON error naming the problem (400 for a
bad body, 404 for another path, 405 for another method), one pool connection, one statement.
Run: python raw_app.py --port 8002 --db-url postgresql://... [--pool-max 20] [--loop asyncio]
"""

from __future__ import annotations

import argparse

import asyncpg
import msgspec
import uvicorn


class ValueArgs(msgspec.Struct, forbid_unknown_fields=True):
    id: int


_decode_args = msgspec.json.Decoder(ValueArgs).decode
_encode = msgspec.json.encode
_JSON_HEADERS = [(b"content-type", b"application/json")]


def _error(status: int, message: str) -> tuple[int, bytes]:
    return status, _encode({"error": {"code": "INVALID_ARGUMENT" if status == 400 else "NOT_FOUND",
                                      "message": message, "details": None}})


class RawApp:
    def __init__(self, db_url: str, pool_max: int) -> None:
        self.db_url, self.pool_max = db_url, pool_max
        self.pool: asyncpg.Pool | None = None

    async def __call__(self, scope, receive, send) -> None:
        kind = scope["type"]
        if kind == "http":
            status, body = await self.http(scope, receive)
            await send({"type": "http.response.start", "status": status,
                        "headers": [*_JSON_HEADERS, (b"content-length", str(len(body)).encode())]})
            await send({"type": "http.response.body", "body": body})
        elif kind == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    self.pool = await asyncpg.create_pool(self.db_url, min_size=2, max_size=self.pool_max)
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await self.pool.close()
                    await send({"type": "lifespan.shutdown.complete"})
                    return

    async def http(self, scope, receive) -> tuple[int, bytes]:
        if scope["path"] != "/value":
            return _error(404, f"no route {scope['method']} {scope['path']}")
        if scope["method"] != "POST":
            return _error(405, f"method {scope['method']} not allowed; use POST")
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        try:
            args = _decode_args(body)
        except msgspec.DecodeError as exc:
            return _error(400, f"invalid body: {exc}")
        async with self.pool.acquire() as conn:
            return 200, _encode({"data": await conn.fetchval("SELECT $1::int + 1", args.id)})


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--db-url", required=True)
    ap.add_argument("--pool-max", type=int, default=20)
    ap.add_argument("--loop", default="asyncio")
    args = ap.parse_args()
    uvicorn.run(RawApp(args.db_url, args.pool_max), host="127.0.0.1", port=args.port, http="httptools",
                loop=args.loop, access_log=False, log_level="warning", server_header=False, lifespan="on")


if __name__ == "__main__":
    main()
