"""Several real forge-node processes serving live queries from one change log."""

from __future__ import annotations

import asyncio
import json
import os
import signal
from pathlib import Path

import asyncpg
import httpx

from rt_helpers import GATEWAY, token, ws_connect

HERE = Path(__file__).parent


def node_config(node_id: str) -> dict:
    return {"node": {"id": node_id, "roles": ["gateway", "function", "realtime"]},
            "app": {"modules": ["forge_rt_testapp"], "example": False},
            "gateway": dict(GATEWAY), "realtime": {"fallback_poll": 0.05}}


async def http_port(db_url: str, node_id: str) -> int:
    conn = await asyncpg.connect(db_url)
    try:
        for _ in range(200):
            ports = await conn.fetchval("SELECT ports FROM forge_nodes WHERE id = $1", node_id)
            ports = json.loads(ports) if isinstance(ports, str) else ports
            if ports and "http" in ports:
                return int(ports["http"])
            await asyncio.sleep(0.05)
    finally:
        await conn.close()
    raise AssertionError(f"node {node_id} published no http port")


async def test_write_through_one_node_arrives_on_another(forge_processes):
    env = {"PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")])}
    a = forge_processes(node_config("a"), node_id="a", env=env)
    b = forge_processes(node_config("b"), node_id="b", env=env)
    db_url = forge_processes.db_url
    port_a, port_b = await http_port(db_url, "a"), await http_port(db_url, "b")
    async with ws_connect(f"ws://127.0.0.1:{port_b}/ws", token("alice")) as on_b, \
            ws_connect(f"ws://127.0.0.1:{port_a}/ws", token("alice")) as on_a, \
            httpx.AsyncClient(base_url=f"http://127.0.0.1:{port_a}") as http:
        for c in (on_a, on_b):
            await c.send({"type": "subscribe", "id": "m", "function": "my_items"})
            assert (await c.recv())["data"] == []
        r = await http.post("/rpc/add_item", json={"owner": "alice", "title": "via a"})
        assert r.status_code == 200, r.text
        for c in (on_a, on_b):
            msg = await c.recv()
            assert msg["type"] == "data" and [i["title"] for i in msg["data"]] == ["via a"]
        # b crashes; a keeps serving from the same log, and b's subscriber would reconnect to a
        b.kill()
        r = await http.post("/rpc/add_item", json={"owner": "alice", "title": "after b died"})
        assert r.status_code == 200, r.text
        msg = await on_a.recv()
        assert [i["title"] for i in msg["data"]] == ["via a", "after b died"]
    # a drains on SIGTERM and closes its sockets with 1001
    async with ws_connect(f"ws://127.0.0.1:{port_a}/ws") as c:
        await c.send({"type": "subscribe", "id": "n", "function": "count_items"})
        assert (await c.recv())["data"] == 2
        os.kill(a.pid, signal.SIGTERM)
        import websockets

        try:
            await asyncio.wait_for(c.ws.recv(), 20)
            raise AssertionError("socket stayed open while the node drained")
        except websockets.ConnectionClosed as exc:
            assert exc.rcvd.code == 1001
