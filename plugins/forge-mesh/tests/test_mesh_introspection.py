"""forge-node status --live, logs --follow --node X and drain X, over the mesh."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time

import httpx
import pytest

from forge_kernel.testing.procs import write_config
from forge_mesh.config import PROTOCOL
from mesh_support import client_config, create_database, http_url, mesh_view, node_config, node_env, rpc, start_node, wait_peers


@pytest.fixture(scope="module")
def cluster(forge_database_url, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("mesh-intro")
    db = asyncio.run(create_database(forge_database_url))
    env = node_env("forge_worker.hooks")
    procs = {nid: start_node(tmp, node_config(db, nid, roles), env, wait=False)
             for nid, roles in (("g", ["gateway"]), ("f1", ["function", "worker"]), ("f2", ["function", "worker"]))}
    cli_config = write_config(tmp / "cli.toml", {"database": {"url": db}})
    try:
        for p in procs.values():
            p.wait_ready(90)
        asyncio.run(wait_peers(db, "g", {"f1", "f2"}))
        yield {"db": db, "url": http_url(procs["g"]), "cli": cli_config, "tmp": tmp, **procs}
    finally:
        for p in procs.values():
            if p.alive():
                os.kill(p.pid, signal.SIGCONT)
            p.terminate(timeout=20)


def cli(cluster, *args: str, **kw) -> subprocess.Popen:
    env = {**os.environ, **node_env("forge_worker.hooks"), "FORGE_CONFIG": str(cluster["cli"])}
    return subprocess.Popen([sys.executable, "-m", "forge_kernel.cli", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kw)


async def run_cli(cluster, *args: str) -> tuple[int, str, str]:
    p = cli(cluster, *args)
    out, err = await asyncio.to_thread(p.communicate, timeout=60)
    return p.returncode, out, err


async def test_status_live_reports_what_every_node_does_and_marks_a_frozen_node_unreachable(cluster):
    code, out, err = await run_cli(cluster, "status", "--live", "--json")
    assert code == 0, err
    rows = {r["id"]: r for r in json.loads(out)}
    assert set(rows) == {"g", "f1", "f2"}, rows
    for nid, row in rows.items():
        assert row["reachable"], row
        act = row["activity"]
        assert act["node"]["id"] == nid and act["node"]["status"] == "running", act
        assert {"in_use", "size", "max"} <= set(act["node"]["pool"]), act
        assert act["mesh"]["protocol"] == PROTOCOL and "serving" in act["mesh"], act
    assert rows["f1"]["activity"]["jobs"]["running"] == 0 and "jobs" not in rows["g"]["activity"]
    # a call in flight shows on the node running it
    async with httpx.AsyncClient(timeout=30) as client:
        call = asyncio.ensure_future(rpc(client, cluster["url"], "slow", {"seconds": 3}))
        from forge_mesh import live_status
        import asyncpg

        conn = await asyncpg.connect(cluster["db"])
        try:
            deadline = time.monotonic() + 10
            while True:
                rows = {r["id"]: r for r in await live_status(client_config(cluster["db"]), conn, timeout=1.0)}
                if sum(rows[n]["activity"]["mesh"]["serving"] for n in ("f1", "f2")) == 1:
                    assert rows["g"]["activity"]["mesh"]["forwarding"] == 1, rows["g"]
                    break
                assert time.monotonic() < deadline, rows
                await asyncio.sleep(0.05)
            # a frozen node: partial results within the 1 s deadline
            cluster["f2"].signal(signal.SIGSTOP)
            try:
                t0 = time.monotonic()
                rows = {r["id"]: r for r in await live_status(client_config(cluster["db"]), conn, timeout=1.0)}
                took = time.monotonic() - t0
            finally:
                cluster["f2"].signal(signal.SIGCONT)
        finally:
            await conn.close()
        assert (await call).status_code == 200
    assert rows["f2"]["reachable"] is False and rows["f2"]["error"], rows["f2"]
    assert rows["f1"]["reachable"] and rows["g"]["reachable"]
    assert took < 3.0, took  # 1 s deadline (plus connection set-up); guards against waiting for the frozen node
    code, out, _ = await run_cli(cluster, "status", "--live")
    assert code == 0 and "f1" in out and "reachable" in out.lower(), out


async def test_logs_follow_tails_a_node_over_the_mesh(cluster):
    p = cli(cluster, "logs", "--follow", "--node", "f1")
    try:
        await asyncio.sleep(1.5)  # the follower connects
        lines: list[str] = []
        reader = asyncio.ensure_future(asyncio.to_thread(_read_until, p, "shout: hello-f1", lines))
        async with httpx.AsyncClient(timeout=30) as client:
            deadline = time.monotonic() + 20
            while not reader.done():
                await rpc(client, cluster["url"], "shout", {"text": "hello-f1"})  # lands on f1 about every other call
                assert time.monotonic() < deadline, lines[-20:]
                await asyncio.sleep(0.2)
        assert reader.result(), lines[-20:]
        assert all("shout: hello-f1" not in line or "INFO" in line for line in lines)
    finally:
        p.send_signal(signal.SIGINT)
        try:
            p.wait(10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(10)
    code, _, err = await run_cli(cluster, "logs", "--node", "nobody", "--follow")
    assert code == 1 and "nobody" in err, err


def _read_until(p: subprocess.Popen, needle: str, lines: list[str]) -> bool:
    for line in p.stdout:
        lines.append(line)
        if needle in line:
            return True
    return False


async def test_drain_stops_new_forwards_at_once_and_lets_in_flight_work_finish(cluster):
    db, url = cluster["db"], cluster["url"]
    await wait_peers(db, "g", {"f1", "f2"})
    async with httpx.AsyncClient(timeout=30) as client:
        # in flight on both nodes while f1 is told to drain
        calls = [asyncio.ensure_future(rpc(client, url, "slow", {"seconds": 2})) for _ in range(4)]
        deadline = time.monotonic() + 10
        while not (await mesh_view(db, "f1") or {}).get("serving"):
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
        code, out, err = await run_cli(cluster, "drain", "f1")
        assert code == 0 and "draining" in out, (out, err)
        drained_at = time.monotonic()
        # within 1 s no new call goes to f1
        await asyncio.sleep(1.0 - (time.monotonic() - drained_at) if time.monotonic() - drained_at < 1.0 else 0)
        for _ in range(10):
            r = await rpc(client, url, "quick")
            assert r.status_code == 200 and r.json()["data"] == "f2", r.text
        results = await asyncio.gather(*calls)
    assert all(r.status_code == 200 for r in results), [r.text for r in results]  # in-flight work finished
    assert {r.json()["data"] for r in results} == {"f1", "f2"}
    await asyncio.to_thread(cluster["f1"].proc.wait, 30)
    assert cluster["f1"].proc.returncode == 0, cluster["f1"].log()[-2000:]
