"""The peer: a hand-written Litestar + asyncpg app doing the same SELECT, on the same uvicorn setup.

Typed body (msgspec Struct, validated by Litestar), one pool connection, one statement.
Run: python bare_app.py --port 8001 --db-url postgresql://... [--pool-max 20] [--loop asyncio]
"""

from __future__ import annotations

import argparse
import contextlib

import asyncpg
import msgspec
import uvicorn
from litestar import Litestar, post


class ValueArgs(msgspec.Struct, forbid_unknown_fields=True):
    id: int


def build(db_url: str, pool_max: int) -> Litestar:
    state: dict = {}

    @contextlib.asynccontextmanager
    async def lifespan(app: Litestar):
        state["pool"] = await asyncpg.create_pool(db_url, min_size=2, max_size=pool_max)
        try:
            yield
        finally:
            await state["pool"].close()

    @post("/value", status_code=200)
    async def value(data: ValueArgs) -> dict[str, int]:
        async with state["pool"].acquire() as conn:
            return {"data": await conn.fetchval("SELECT $1::int + 1", data.id)}

    return Litestar([value], lifespan=[lifespan], openapi_config=None, logging_config=None)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--db-url", required=True)
    ap.add_argument("--pool-max", type=int, default=20)
    ap.add_argument("--loop", default="asyncio")
    args = ap.parse_args()
    uvicorn.run(build(args.db_url, args.pool_max), host="127.0.0.1", port=args.port, http="httptools",
                loop=args.loop, access_log=False, log_level="warning", server_header=False)


if __name__ == "__main__":
    main()
