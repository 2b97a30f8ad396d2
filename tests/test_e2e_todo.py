"""The example app across a two-node cluster, with every role package, through public surfaces only:
HTTP (gateway), WebSocket live queries (realtime), jobs (worker), leader (scheduler)."""

import asyncio
import signal
import sys
import time
from pathlib import Path

import asyncpg
import httpx
import jwt
import pytest

pytest.importorskip("forge_gateway")
pytest.importorskip("forge_worker")
pytest.importorskip("forge_realtime")
pytest.importorskip("forge_scheduler")

from forge_realtime.client import ForgeClient  # noqa: E402
from forge_worker.queue import JobQueue  # noqa: E402

SECRET = "e2e-secret-e2e-secret-e2e-secret!"


def token(user: str) -> str:
    return jwt.encode({"sub": user, "exp": int(time.time()) + 600}, SECRET, algorithm="HS256")


@pytest.fixture
def cluster(forge_processes):
    gw = forge_processes({"node": {"roles": ["gateway", "function", "realtime"]},
                          "gateway": {"port": 0, "jwt_secret": SECRET}}, node_id="front")
    back = forge_processes({"node": {"roles": ["worker", "scheduler"]}, "gateway": {"jwt_secret": SECRET}},
                           node_id="back")
    return gw, back, forge_processes.db_url


async def test_todo_app_end_to_end(cluster):
    gw, back, db_url = cluster
    port = gw.ready_info()["ports"]["http"]
    base = f"http://127.0.0.1:{port}"
    alice = {"Authorization": f"Bearer {token('alice')}"}
    pool = await asyncpg.create_pool(db_url, min_size=1, max_size=2)
    try:
        async with httpx.AsyncClient(base_url=base, timeout=10) as http, \
                ForgeClient(f"ws://127.0.0.1:{port}/ws", token=token("alice")) as live:
            updates = live.subscribe("list_todos")
            assert await asyncio.wait_for(updates.__anext__(), 10) == []

            # a mutation commits its row and its job together (transactional outbox)
            r = await http.post("/rpc/add_todo", json={"title": "buy milk"}, headers=alice)
            assert r.status_code == 200, r.text
            todo = r.json()["data"]
            assert todo["owner"] == "alice"

            # the live query pushes the new result
            pushed = await asyncio.wait_for(updates.__anext__(), 10)
            assert [t["title"] for t in pushed] == ["buy milk"]

            jobs = await JobQueue(pool).list(name="send_reminder")
            assert [(j.args["todo_id"], j.caller, j.status) for j in jobs] == [(todo["id"], "alice", "scheduled")]

            # a mutation that fails leaves neither row nor job
            r = await http.post("/rpc/add_todo", json={"title": "   "}, headers=alice)
            assert r.status_code == 400 and r.json()["error"]["code"] == "INVALID_ARGUMENT"
            assert await pool.fetchval("SELECT count(*) FROM todos") == 1
            assert len(await JobQueue(pool).list(name="send_reminder")) == 1

            # another user sees only their own rows, and anonymous callers are refused
            r = await http.post("/rpc/list_todos", json={}, headers={"Authorization": f"Bearer {token('bob')}"})
            assert r.json() == {"data": []}
            r = await http.post("/rpc/list_todos", json={})
            assert r.status_code == 401

            # the worker node runs jobs dispatched through the gateway node
            job_id = await JobQueue(pool).enqueue("send_reminder", {"todo_id": todo["id"]})
            for _ in range(200):
                info = await JobQueue(pool).get(job_id)
                if info and info.status == "succeeded":
                    break
                await asyncio.sleep(0.05)
            assert info.status == "succeeded" and info.node_id == "back"

            # the scheduler on the back node leads
            leader = await pool.fetchval("SELECT node_id FROM forge_leaders")
            assert leader == "back"
    finally:
        await pool.close()
    assert gw.terminate() == 0 and back.terminate() == 0


LIVE_TODOS = Path(__file__).resolve().parents[1] / "examples" / "todo" / "live_todos.py"


async def read_block(proc, timeout: float = 20.0) -> list[str]:
    """The next list live_todos.py prints: its "N todo(s) for USER:" header and N item lines."""
    async def line() -> str:
        raw = await asyncio.wait_for(proc.stdout.readline(), timeout)
        assert raw, "live_todos.py exited"
        return raw.decode().rstrip("\n")

    header = ""
    while not header:
        header = await line()
    assert header.endswith(" todo(s) for alice:"), header
    return [header] + [await line() for _ in range(int(header.split()[0]))]


async def test_live_todos_script_prints_the_list_and_its_updates(forge_processes):
    node = forge_processes({"node": {"roles": ["gateway", "function", "realtime"]},
                            "gateway": {"port": 0, "jwt_secret": SECRET}}, node_id="live")
    port = node.ready_info()["ports"]["http"]
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-u", str(LIVE_TODOS), "--url", f"ws://127.0.0.1:{port}/ws", "--secret", SECRET,
        "--user", "alice", stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        # a suite started in the background (`.ci/run &`) inherits SIGINT ignored, and Python then
        # never installs its Ctrl-C handler: give the script the default disposition a terminal has
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        assert await read_block(proc) == ["0 todo(s) for alice:"]
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as http:
            for user, title in (("bob", "not alice's"), ("alice", "buy milk")):
                r = await http.post("/rpc/add_todo", json={"title": title},
                                    headers={"Authorization": f"Bearer {token(user)}"})
                assert r.status_code == 200, r.text
            # the next list printed is alice's new one (bob's todo is not hers and changes nothing)
            assert await read_block(proc) == ["1 todo(s) for alice:", "  [ ] buy milk"]
            r = await http.post("/rpc/complete_todo", json={"id": r.json()["data"]["id"]},
                                headers={"Authorization": f"Bearer {token('alice')}"})
            assert r.status_code == 200, r.text
            assert await read_block(proc) == ["1 todo(s) for alice:", "  [x] buy milk"]
        proc.send_signal(signal.SIGINT)  # Ctrl-C ends it cleanly
        assert await asyncio.wait_for(proc.wait(), 20) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert node.terminate() == 0
