"""Helpers for the forge-realtime tests (a uniquely named module: several packages' test
folders each have a conftest.py, so ``from conftest import ...`` would be ambiguous)."""

from __future__ import annotations

import asyncio
import contextlib
import json
from typing import Any

import pytest

# --- fixtures (imported by the test modules that use them; no conftest.py, because several
# packages' test folders would each have one and "conftest" is then ambiguous) ---------------
@pytest.fixture
async def rt_node(forge_node):
    async def make(**config: Any):
        cfg = {"realtime": {"fallback_poll": 0.05, **config}}
        cfg["gateway"] = dict(GATEWAY)
        # only the roles under test: other packages being installed alongside must not matter
        cfg["node"] = {"roles": ["gateway", "function", "realtime"]}
        return await forge_node(modules=["forge_rt_testapp"], config=cfg)

    return make


@pytest.fixture
async def rt_db(forge_db_url):
    """A dedicated connection to a fresh database with the realtime migrations and a test table."""
    from forge_kernel import db as dbmod
    from forge_kernel.migrations import from_package, migrate

    conn = await dbmod.connect(forge_db_url)
    await migrate(conn, from_package("forge_realtime.sql", namespace="realtime"))
    await conn.execute("CREATE TABLE things (id bigserial PRIMARY KEY, owner text NOT NULL, n int NOT NULL DEFAULT 0, "
                       "note text)")
    try:
        yield conn
    finally:
        await conn.close()


# --- helpers -----------------------------------------------------------------------------------
JWT_SECRET = "forge-realtime-test-secret-0123456789abcdef"
#: the gateway (forge-gateway) serves /ws and verifies tokens; port 0 picks a free port
GATEWAY = {"port": 0, "jwt_secret": JWT_SECRET, "jwt_algorithms": ["HS256"]}


def token(user: str, ttl: float = 3600.0, roles: list[str] | None = None) -> str:
    import time

    import jwt

    claims = {"sub": user, "exp": int(time.time() + ttl)}
    if roles:
        claims["roles"] = roles
    return jwt.encode(claims, JWT_SECRET, algorithm="HS256")


def ws_url(node: Any) -> str:
    return f"ws://127.0.0.1:{node.ports['http']}/ws"


class WsClient:
    """A raw protocol client for tests: send dicts, receive dicts."""

    def __init__(self, ws: Any) -> None:
        self.ws = ws

    async def send(self, msg: dict[str, Any]) -> None:
        await self.ws.send(json.dumps(msg))

    async def recv(self, timeout: float = 10.0) -> dict[str, Any]:
        return json.loads(await asyncio.wait_for(self.ws.recv(), timeout))

    async def recv_type(self, *types: str, timeout: float = 10.0) -> dict[str, Any]:
        while True:
            msg = await self.recv(timeout)
            if msg["type"] in types:
                return msg

    async def nothing(self, wait: float = 0.5) -> None:
        """Assert that no message arrives within ``wait`` seconds."""
        try:
            msg = await asyncio.wait_for(self.ws.recv(), wait)
        except asyncio.TimeoutError:
            return
        raise AssertionError(f"unexpected message: {msg}")


@contextlib.asynccontextmanager
async def ws_connect(url: str, token: str | None = None, **kw: Any):
    import websockets

    async with websockets.connect(url, **kw) as ws:
        c = WsClient(ws)
        await c.send({"type": "auth", "token": token})
        msg = await c.recv()
        assert msg["type"] == "ready", msg
        yield c


def realtime(node: Any):
    from forge_realtime.service import for_node

    return for_node(node)


async def settled(node: Any, timeout: float = 30.0) -> None:
    """Wait until every change committed before this call was read and every re-run finished.

    A poll that starts after this call sees every transaction committed before it, so two
    more completed polls are enough (independent of the xmin horizon, which a long
    transaction elsewhere in the cluster may hold back)."""
    rt = realtime(node)
    start = rt.reader.polls
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    quiet = 0
    while quiet < 3:
        eng = rt.engine
        busy = bool(eng._queue) or any(q.running or q.queued or q.dirty for q in eng.queries.values())
        behind = rt.reader.polls < start + 2
        if loop.time() > deadline:
            raise TimeoutError(f"realtime did not settle: busy={busy} polls={rt.reader.polls} (from {start})")
        quiet = 0 if (busy or behind) else quiet + 1
        rt.reader.wake()
        await asyncio.sleep(0.02)

