"""A gateway-only node forwards /rpc, JSON-RPC and live-query re-runs to function nodes over the mesh."""

from __future__ import annotations

import asyncio
import json

import asyncpg
import httpx
import pytest

from mesh_support import create_database, http_url, node_config, node_env, rpc, start_node, token, wait_peers


@pytest.fixture(scope="module")
def cluster(forge_database_url, tmp_path_factory):
    """G (gateway + realtime, no function), F1 (function), F2 (function, capability gpu)."""
    tmp = tmp_path_factory.mktemp("mesh-fwd")
    db = asyncio.run(create_database(forge_database_url))
    procs = []
    try:
        f1 = start_node(tmp, node_config(db, "f1", ["function"]), wait=False)
        f2 = start_node(tmp, node_config(db, "f2", ["function"], capabilities=["gpu"]), wait=False)
        g = start_node(tmp, node_config(db, "g", ["gateway", "realtime"]), node_env("forge_realtime.hooks"), wait=False)
        procs = [f1, f2, g]
        for p in procs:
            p.wait_ready(90)
        asyncio.run(wait_peers(db, "g", {"f1", "f2"}))
        yield {"db": db, "g": g, "f1": f1, "f2": f2, "url": http_url(g)}
    finally:
        for p in procs:
            p.terminate(timeout=20)


async def test_gateway_only_node_forwards_rpc_with_the_callers_identity(cluster):
    async with httpx.AsyncClient(timeout=20) as client:
        seen = set()
        for _ in range(20):
            r = await rpc(client, cluster["url"], "whoami", headers={"authorization": f"Bearer {token('alice', ('a', 'b'))}"})
            assert r.status_code == 200, r.text
            data = r.json()["data"]
            assert data["user"] == "alice" and data["kind"] == "user" and data["roles"] == ["a", "b"], data
            seen.add(data["node"])
        # balanced over both function nodes; never run on the gateway itself
        assert seen == {"f1", "f2"}, seen
        r = await rpc(client, cluster["url"], "mine")
        assert r.status_code == 401 and r.json()["error"]["code"] == "UNAUTHENTICATED", r.text
        r = await rpc(client, cluster["url"], "mine", headers={"authorization": f"Bearer {token('bob')}"})
        assert r.json()["data"]["user"] == "bob", r.text


async def test_errors_and_arguments_survive_forwarding(cluster):
    async with httpx.AsyncClient(timeout=20) as client:
        r = await rpc(client, cluster["url"], "blob", {"size": "big"})
        assert r.status_code == 400 and r.json()["error"]["code"] == "INVALID_ARGUMENT", r.text
        r = await rpc(client, cluster["url"], "no_such_function")
        assert r.status_code == 404, r.text
        r = await rpc(client, cluster["url"], "slow", {"seconds": 5})  # slow has timeout=60, our deadline is its own
        assert r.status_code == 200 and r.json()["data"] in ("f1", "f2"), r.text


async def test_json_rpc_is_forwarded(cluster):
    async with httpx.AsyncClient(timeout=20) as client:
        r = await client.post(f"{cluster['url']}/rpc", json=[
            {"jsonrpc": "2.0", "method": "blob", "params": {"size": 3}, "id": 1},
            {"jsonrpc": "2.0", "method": "add_item", "params": ["rpc-batch"], "id": 2},
            {"jsonrpc": "2.0", "method": "blob", "params": {"size": "x"}, "id": 3}])
        assert r.status_code == 200, r.text
        by_id = {item["id"]: item for item in r.json()}
        assert by_id[1]["result"] == "xxx"
        assert by_id[2]["result"]["node"] in ("f1", "f2")
        assert by_id[3]["error"]["data"]["code"] == "INVALID_ARGUMENT"


async def test_capability_functions_go_to_nodes_with_the_capability(cluster):
    async with httpx.AsyncClient(timeout=20) as client:
        nodes = {(await rpc(client, cluster["url"], "on_gpu")).json()["data"] for _ in range(10)}
    assert nodes == {"f2"}


async def test_mutations_commit_once(cluster):
    async with httpx.AsyncClient(timeout=20) as client:
        results = await asyncio.gather(*(rpc(client, cluster["url"], "add_item", {"key": f"once-{i}"}) for i in range(30)))
    assert all(r.status_code == 200 for r in results), [r.text for r in results if r.status_code != 200]
    conn = await asyncpg.connect(cluster["db"])
    try:
        counts = await conn.fetch("SELECT key, count(*) AS n FROM mesh_items WHERE key LIKE 'once-%' GROUP BY key")
        calls = await conn.fetchval("SELECT count(*) FROM forge_mesh_calls WHERE function = 'add_item' AND state = 'done'")
    finally:
        await conn.close()
    assert len(counts) == 30 and all(r["n"] == 1 for r in counts)
    assert calls >= 30  # each forwarded mutation stored its call id with its result, in its own transaction


async def test_live_query_reruns_are_forwarded_with_their_read_sets(cluster):
    """G runs realtime but not functions: the subscription's runs happen on F1/F2, and a write
    through another path (a forwarded mutation) reaches the subscriber."""
    import websockets

    ws_url = cluster["url"].replace("http://", "ws://") + "/ws"
    async with websockets.connect(ws_url) as ws, httpx.AsyncClient(timeout=20) as client:
        await ws.send(json.dumps({"type": "auth", "token": None}))
        assert json.loads(await asyncio.wait_for(ws.recv(), 20))["type"] == "ready"
        await ws.send(json.dumps({"type": "subscribe", "id": "s1", "function": "items", "args": {"key": "live-1"}}))
        first = await _next_of(ws, "s1")
        assert first["type"] == "data" and first["data"] == [], first
        r = await rpc(client, cluster["url"], "add_item", {"key": "live-1"})
        assert r.status_code == 200, r.text
        update = await _next_of(ws, "s1")
        assert update["type"] == "data" and len(update["data"]) == 1, update


async def _next_of(ws, sub_id: str) -> dict:
    while True:
        msg = json.loads(await asyncio.wait_for(ws.recv(), 20))
        if msg.get("id") == sub_id:
            return msg


async def test_a_call_meant_for_another_process_is_refused_unstarted(cluster):
    """The epoch names the process: a restarted node refuses calls meant for its predecessor, before
    running anything, so the caller may send them elsewhere whatever their kind."""
    from forge_mesh.channels import open_stubs
    from forge_mesh.protocol import mesh_pb2 as pb

    conn = await asyncpg.connect(cluster["db"])
    try:
        row = await conn.fetchrow("SELECT address, epoch FROM forge_mesh_nodes WHERE node_id = 'f1'")
        token = await conn.fetchval("SELECT token FROM forge_mesh_cluster")
        before = await conn.fetchval("SELECT count(*) FROM mesh_items WHERE key = 'stale-epoch'")
    finally:
        await conn.close()
    stubs = open_stubs(row["address"], False, None, 1 << 20, token)
    try:
        for epoch, target in (("0123456789abcdef", "f1"), (row["epoch"], "f2")):
            req = pb.CallRequest(function="add_item", args_json=b'{"key": "stale-epoch"}', caller=pb.Caller(kind="anonymous"),
                                 call_id=f"stale-{target}", target_node=target, target_epoch=epoch, protocol=2,
                                 timeout_ms=5000)
            reply = await stubs.call(req, timeout=5, metadata=stubs.metadata)
            assert reply.WhichOneof("outcome") == "error" and reply.error.not_started, reply
            assert reply.error.code == "UNAVAILABLE" and "epoch" in reply.error.message, reply
    finally:
        await stubs.close()
    conn = await asyncpg.connect(cluster["db"])
    try:
        assert await conn.fetchval("SELECT count(*) FROM mesh_items WHERE key = 'stale-epoch'") == before == 0
    finally:
        await conn.close()
