"""A frozen node, a client that goes away, a blocked mesh port, and job cancel over the mesh."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time

import asyncpg
import httpx
import pytest

from forge_kernel.testing import free_port
from mesh_support import (client_config, create_database, hold, http_url, mesh_view, node_config, node_env, rpc,
                          start_node, wait_peers)
from tcp_proxy import Proxy


@pytest.fixture(scope="module")
def trio(forge_database_url, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("mesh-fail")
    db = asyncio.run(create_database(forge_database_url))
    # G probes every 2 s (1 s ping deadline): the frozen-node test's call must reach the frozen node
    # before a probe could take it out of rotation, even when this busy machine stalls the test a while
    procs = [start_node(tmp, node_config(db, nid, roles, mesh={"probe_interval": 2.0} if nid == "g" else None),
                        wait=False)
             for nid, roles in (("g", ["gateway"]), ("f1", ["function"]), ("f2", ["function"]))]
    try:
        for p in procs:
            p.wait_ready(90)
        yield {"db": db, "g": procs[0], "f1": procs[1], "f2": procs[2], "url": http_url(procs[0])}
    finally:
        for p in procs:
            if p.alive():
                os.kill(p.pid, signal.SIGCONT)
            p.terminate(timeout=20)


async def test_a_frozen_node_times_out_within_the_deadline_and_is_avoided_after_one_failure(trio):
    db, url = trio["db"], trio["url"]
    async with httpx.AsyncClient(timeout=30) as client:
        await wait_peers(db, "g", {"f1", "f2"})
        holder = asyncio.ensure_future(hold(url))  # one call held on one node: G sends the next to the other
        victim = None
        try:
            deadline = time.monotonic() + 20
            while victim is None:
                assert time.monotonic() < deadline, "the held call never showed"
                peers = (await mesh_view(db, "g"))["peers"]
                busy = [n for n, p in peers.items() if p["in_flight"] == 1]
                victim = ({"f1", "f2"} - set(busy)).pop() if len(busy) == 1 else None
            other = ({"f1", "f2"} - {victim}).pop()
            r = await rpc(client, url, "quick")  # the victim's call stream is open and in use
            assert r.json()["data"] == victim, r.text
            trio[victim].signal(signal.SIGSTOP)
            t0 = time.monotonic()
            r = await rpc(client, url, "quick")  # @query(timeout=1.0)
            took = time.monotonic() - t0
            assert r.status_code == 504 and r.json()["error"]["code"] == "TIMEOUT", (victim, r.text, (await mesh_view(db, "g"))["peers"])
            print(f"\nfrozen node: TIMEOUT after {took * 1000:.0f} ms for a 1000 ms deadline")
            assert took < 1.5, took  # the bound is deadline + 100 ms; this only guards against hangs
            # the very next calls go to the other node, long before the frozen one's heartbeat goes
            # stale (dead_after 15 s)
            for _ in range(5):
                r = await rpc(client, url, "quick")
                assert r.status_code == 200 and r.json()["data"] == other, r.text
            view = await mesh_view(db, "g")
            assert view["peers"][victim]["suspect"], view
        finally:
            if victim is not None:
                trio[victim].signal(signal.SIGCONT)
            holder.cancel()
        await wait_peers(db, "g", {"f1", "f2"})  # back after SIGCONT, through a probe
        seen = {(await rpc(client, url, "quick")).json()["data"] for _ in range(20)}
        assert seen == {"f1", "f2"}, seen


async def test_a_client_that_disconnects_cancels_the_work_on_the_target(trio, tmp_path):
    db, url = trio["db"], trio["url"]
    await wait_peers(db, "g", {"f1", "f2"})
    marker = tmp_path / "cancelled-at"
    async with httpx.AsyncClient(timeout=30) as client:
        call = asyncio.ensure_future(rpc(client, url, "slow", {"seconds": 30, "marker": str(marker)}))

        async def running() -> bool:
            views = [await mesh_view(db, n) for n in ("f1", "f2")]
            return any(v and v["serving"] for v in views)

        deadline = time.monotonic() + 20
        while not await running():
            assert time.monotonic() < deadline, "the call never reached a function node"
        gone_at = time.time()
        call.cancel()  # closes the HTTP connection
        with pytest.raises(asyncio.CancelledError):
            await call
    deadline = time.monotonic() + 10
    while not marker.exists():
        assert time.monotonic() < deadline, "the target kept running after the client went away"
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.05)
    delay = float(marker.read_text()) - gone_at
    print(f"\nclient gone -> target work cancelled in {delay * 1000:.0f} ms")
    assert delay < 2.0, delay  # the bound is 100 ms; measured above, this only guards against hangs


async def test_blocked_mesh_port_leaves_jobs_crons_and_live_queries_working(forge_database_url, tmp_path):
    """F (a full node) is reachable over the mesh only through a proxy; blocking it cuts the mesh but
    not PostgreSQL. G (gateway only) then answers UNAVAILABLE fast and reports not ready."""
    db = await create_database(forge_database_url)
    real = free_port()
    proxy = await Proxy(real).start()
    plugins = ("forge_worker.hooks", "forge_scheduler.hooks", "forge_realtime.hooks")
    f = start_node(tmp_path, node_config(db, "f", ["gateway", "function", "worker", "scheduler", "realtime"],
                                         mesh={"port": real, "advertise": f"127.0.0.1:{proxy.port}"},
                                         app={"modules": ["mesh_app", "mesh_cron_app"]}), node_env(*plugins), wait=False)
    g = start_node(tmp_path, node_config(db, "g", ["gateway"], app={"modules": ["mesh_app", "mesh_cron_app"]}),
                   node_env(*plugins), wait=False)
    conn = await asyncpg.connect(db)
    try:
        await asyncio.to_thread(f.wait_ready, 90)
        await asyncio.to_thread(g.wait_ready, 90)
        await wait_peers(db, "g", {"f"})
        async with httpx.AsyncClient(timeout=30) as client:
            assert (await client.get(f"{http_url(g)}/ready")).status_code == 200
            assert (await rpc(client, http_url(g), "quick")).json()["data"] == "f"

            # 1. the mesh delivers a job cancel at once (no database request at all)
            job_id = (await rpc(client, http_url(f), "start_long_job", {"seconds": 120})).json()["data"]
            await _until(lambda: _job_status(conn, job_id), "running")
            from forge_mesh import cancel_job

            assert await cancel_job(client_config(db), conn, job_id, "f")
            await _until(lambda: _job_status(conn, job_id), "cancelled", timeout=5)

            proxy.block()
            # 2. G notices within a probe or two: UNAVAILABLE at once, /ready 503
            async def g_not_ready() -> bool:
                return (await client.get(f"{http_url(g)}/ready")).status_code == 503
            await _until(g_not_ready, True, timeout=10)
            ready = (await client.get(f"{http_url(g)}/ready")).json()
            assert "reachable" in ready["reason"], ready
            t0 = time.monotonic()
            r = await rpc(client, http_url(g), "quick")
            took = time.monotonic() - t0
            assert r.status_code == 503 and r.json()["error"]["code"] == "UNAVAILABLE", r.text
            print(f"\nmesh blocked: UNAVAILABLE in {took * 1000:.1f} ms")
            assert took < 0.5, took

            # 3. jobs, crons and live queries on F go on through PostgreSQL
            ticks = await conn.fetchval("SELECT count(*) FROM mesh_ticks")
            assert (await rpc(client, http_url(f), "dispatch_note", {"key": "blocked"})).status_code == 200
            await _until(lambda: conn.fetchval("SELECT count(*) FROM mesh_notes WHERE key = 'blocked'"), 1)
            await _until(lambda: _more(conn, ticks), True, timeout=10)
            import websockets

            async with websockets.connect(http_url(f).replace("http", "ws") + "/ws") as ws:
                await ws.send(json.dumps({"type": "auth", "token": None}))
                await _recv(ws)
                await ws.send(json.dumps({"type": "subscribe", "id": "s", "function": "items", "args": {"key": "b"}}))
                assert (await _recv(ws))["data"] == []
                assert (await rpc(client, http_url(f), "add_item", {"key": "b"})).status_code == 200
                assert len((await _recv(ws))["data"]) == 1

            # 4. a database-backed cancel still reaches the running job within 5 s
            from forge_kernel.plugins import PluginLoader
            from forge_worker import JobQueue

            job_id = (await rpc(client, http_url(f), "start_long_job", {"seconds": 120})).json()["data"]
            await _until(lambda: _job_status(conn, job_id), "running")
            loader = PluginLoader(env={"FORGE_DISABLE_PLUGIN_AUTOLOAD": "1",
                                       "FORGE_PLUGINS": "forge_mesh.hooks,forge_worker.hooks"}).load()
            t0 = time.monotonic()
            assert await JobQueue(conn, hook=loader.hook, config=client_config(db)).cancel(job_id) == "requested"
            await _until(lambda: _job_status(conn, job_id), "cancelled", timeout=5)
            print(f"database-backed cancel with the mesh blocked: {time.monotonic() - t0:.2f} s")

            proxy.unblock()
            await _until(lambda: client.get(f"{http_url(g)}/ready"), 200, timeout=15, key=lambda r: r.status_code)
    finally:
        await conn.close()
        for p in (g, f):
            p.terminate(timeout=20)
        await proxy.close()


async def _job_status(conn, job_id: int) -> str | None:
    status = await conn.fetchval("SELECT status FROM forge_jobs WHERE id = $1", job_id)
    if status is None:
        status = await conn.fetchval("SELECT status FROM forge_job_history WHERE id = $1 ORDER BY finished_at DESC "
                                     "LIMIT 1", job_id)
    return status


async def _more(conn, before: int) -> bool:
    return await conn.fetchval("SELECT count(*) FROM mesh_ticks") >= before + 2


async def _until(fn, want, timeout: float = 20.0, key=lambda v: v):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = key(await fn())
        if last == want:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"wanted {want!r}, last saw {last!r}")


async def _recv(ws) -> dict:
    while True:
        msg = json.loads(await asyncio.wait_for(ws.recv(), 20))
        if msg["type"] in ("data", "ready", "error"):
            return msg
