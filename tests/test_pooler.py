"""FORGE behind PgBouncer in transaction mode (Debian's 1.18), on a server of this module's own.

The nodes log in as a role that is not a superuser and cannot create databases, roles or
extensions, with a server-side statement_timeout and idle_in_transaction_session_timeout, like
on a managed server. Their pools go through PgBouncer (``[database] url``); sessions (migrations,
leader election, LISTEN, the change reader, heartbeats) go straight to the server
(``[database] direct_url``, over TCP with a password, so the server tells the two apart).

The cluster test runs the key flows with three real ``forge-node`` processes, once through
PgBouncer and once without it, and expects the same results: mutations dispatching jobs (outbox),
a live query, a cluster-wide rate limit, and through a SIGKILL of the first node (the scheduler's
leader and the only worker yet) a job rescued, crons led elsewhere and a workflow resumed mid-step.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
import websockets

from forge_kernel import ANONYMOUS, ForgeError
from forge_kernel.errors import StartupError
from forge_kernel.testing import NodeProcess, eventually, free_port
from forge_kernel.testing.servers import PgBouncer, PgServer, embedded_bin_dir, private_folder

pytestmark = pytest.mark.skipif(PgBouncer.binary() is None, reason="pgbouncer is not installed (.ci/run installs it)")

APPS = str(Path(__file__).parent / "apps")
ENV = {"PYTHONPATH": APPS + os.pathsep + os.environ.get("PYTHONPATH", ""), "FORGE_LOG__LEVEL": "WARNING"}
ROLE = "forge_app"
POOL_SIZE = 6  # PgBouncer's server connections per database: far below what three nodes would open
#: as a managed server sets them
TIMEOUTS = {"statement_timeout": "5s", "idle_in_transaction_session_timeout": "5s"}


class Setup:
    def __init__(self, server: PgServer, bouncer: PgBouncer, password: str) -> None:
        self.server, self.bouncer, self.password = server, bouncer, password

    def direct(self, db: str) -> str:
        return self.server.url(db, user=ROLE, password=self.password, tcp=True)

    def pooled(self, db: str) -> str:
        return self.bouncer.url(db, ROLE)


@pytest.fixture(scope="module")
def setup() -> Any:
    root = private_folder("forge-pooler-")
    server = PgServer(embedded_bin_dir(), root, listen="127.0.0.1",
                      hba=["local all all trust", "host all all 127.0.0.1/32 scram-sha-256"],
                      settings={"fsync": "off", "full_page_writes": "off"})
    bouncer = None
    try:
        server.initdb().start()
        password = asyncio.run(server.create_app_role(ROLE, settings=TIMEOUTS))
        bouncer = PgBouncer(root, str(server.socket_dir), server.port, {ROLE: password}, pool_size=POOL_SIZE).start()
        yield Setup(server, bouncer, password)
    finally:
        if bouncer is not None:
            bouncer.stop()
        server.stop()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
async def database(setup: Setup) -> Any:
    """A fresh database owned by the app role."""
    async with setup.server.fresh_database("pooler_", ROLE) as name:
        yield name


# --- in-process: detection and the query path through the pooler ------------------------------
async def test_a_pooler_without_direct_url_is_named_at_start_up(setup, database, forge_node):
    """Before: ProtocolViolationError 'unsupported startup parameter: default_transaction_read_only'."""
    with pytest.raises(StartupError) as info:
        await forge_node(modules=["pooled_app"], config={"database": {"url": setup.pooled(database)},
                                                         "node": {"roles": ["function"]}})
    message = str(info.value)
    assert "[database] url leads to a connection pooler" in message and "direct_url" in message
    assert setup.password not in message


async def test_a_pooler_ignoring_the_read_only_parameter_is_named_too(setup, database, forge_node):
    """PgBouncer told to ignore default_transaction_read_only would drop the read-only guard silently."""
    root = private_folder("forge-pooler-ignore-")
    bouncer = PgBouncer(root, str(setup.server.socket_dir), setup.server.port, {ROLE: setup.password},
                        settings={"ignore_startup_parameters": "default_transaction_read_only"}).start()
    try:
        with pytest.raises(StartupError, match="connection pooler .* direct_url"):
            await forge_node(modules=["pooled_app"], config={"database": {"url": bouncer.url(database, ROLE)},
                                                             "node": {"roles": ["function"]}})
    finally:
        bouncer.stop()
        shutil.rmtree(root, ignore_errors=True)


async def test_queries_through_the_pooler_are_read_only_transactions(setup, database, forge_node):
    """Through a pooler the read-only guard is per transaction (BEGIN READ ONLY), and many
    concurrent calls of many statements over few server connections never meet another client's
    prepared statement (asyncpg's statement cache is off)."""
    node = await forge_node(modules=["pooled_app"], config={
        "database": {"url": setup.pooled(database), "direct_url": setup.direct(database), "pool_max": 12},
        "node": {"roles": ["function"]}})
    assert node.pooled and node.query_pool is None
    with pytest.raises(ForgeError, match="is a query and cannot write"):
        await node.executor.call("sneaky_write", {}, ANONYMOUS)
    assert await node.executor.call("where", {}, ANONYMOUS) == {"replica": False, "read_only": True}
    calls = [node.executor.call("place_order", {"owner": f"o{i % 7}", "item": f"i{i}"}, ANONYMOUS) for i in range(60)]
    calls += [node.executor.call("orders_of", {"owner": f"o{i % 7}"}, ANONYMOUS) for i in range(60)]
    results = await asyncio.gather(*calls)
    assert len(set(results[:60])) == 60
    assert await node.pool.fetchval("SELECT count(*) FROM forge_jobs WHERE name = 'fulfil'") == 60
    assert await node.pool.fetchval("SELECT count(*) FROM pa_log WHERE event = 'sneaky'") == 0


async def test_forge_observe_writes_through_its_own_session_not_the_pooler(setup, database, forge_node):
    """forge-observe's writer opens a session with startup settings (application_name,
    synchronous_commit) that PgBouncer refuses: it connects to [database] direct_url. Before: it
    reconnected forever ('unsupported startup parameter') and stored nothing."""
    pytest.importorskip("forge_observe")
    from loguru import logger

    node = await forge_node(modules=["pooled_app"], config={
        "database": {"url": setup.pooled(database), "direct_url": setup.direct(database)},
        "node": {"roles": ["function"]}, "observe": {"write_interval": 0.05}})
    logger.error("stored through the writer's own session")
    (row,) = await eventually(lambda: node.pool.fetch(
        "SELECT node_id FROM forge_obs_logs WHERE message = 'stored through the writer''s own session'"),
        30, "the log line in PostgreSQL")
    assert row["node_id"] == node.id


async def test_dashboard_reads_through_its_own_sessions_under_its_timeout(setup, database, forge_node):
    """The dashboard's pools set statement_timeout (and read-only) at start-up, which PgBouncer
    refuses: they connect to [database] direct_url. Before: a gateway node behind PgBouncer did
    not start ("service 'dashboard' failed to start: unsupported startup parameter: statement_timeout")."""
    pytest.importorskip("forge_observe")
    node = await forge_node(modules=["pooled_app"], config={
        "database": {"url": setup.pooled(database), "direct_url": setup.direct(database)},
        "node": {"roles": ["gateway"]}, "gateway": {"port": 0}})
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{node.ports['http']}", timeout=30) as http:
        r = await http.get("/_forge/api/nodes")
        assert r.status_code == 200, r.text
        assert node.id in [n["id"] for n in r.json()["nodes"]]
    # its sessions are the server's own backends, started with the dashboard's settings
    assert await node.pool.fetchval(
        "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'forge-dashboard'") >= 1


async def test_worker_settings_stay_in_their_transactions(setup, database, forge_node):
    """The worker plans its statements with seq/bitmap scans off and writes results with
    synchronous_commit off. Through a pooler a session SET stays on whichever server connection
    ran it, for every other client: there the worker makes them SET LOCAL in its transactions.
    One server connection behind PgBouncer, shared by the worker and a probe that asks for the
    settings in a loop while the worker runs jobs (a claim and a report per batch)."""
    root = private_folder("forge-pooler-one-")
    bouncer = PgBouncer(root, str(setup.server.socket_dir), setup.server.port, {ROLE: setup.password},
                        pool_size=1).start()
    try:
        node = await forge_node(modules=["pooled_app"], config={
            "database": {"url": bouncer.url(database, ROLE), "direct_url": setup.direct(database), "pool_max": 4},
            "node": {"roles": ["worker"]}, "worker": {"poll_interval": 0.05, "claim_batch": 5, "concurrency": 5}})
        probe = await asyncpg.connect(bouncer.url(database, ROLE), statement_cache_size=0)
        seen: set[tuple[str, ...]] = set()
        try:
            await node.executor.call("dispatch_noops", {"n": 400}, ANONYMOUS)

            async def probing() -> None:
                while True:
                    row = await probe.fetchrow("SELECT current_setting('enable_seqscan'), "
                                               "current_setting('enable_bitmapscan'), current_setting('synchronous_commit')")
                    seen.add(tuple(row))

            task = asyncio.create_task(probing())
            try:
                await eventually(lambda: node.pool.fetchval("SELECT count(*) = 0 FROM forge_jobs"), 120,
                                 "the jobs to run")
            finally:
                task.cancel()
        finally:
            await probe.close()
        assert seen == {("on", "on", "on")}, f"worker settings reached another client: {seen}"
    finally:
        bouncer.stop()
        shutil.rmtree(root, ignore_errors=True)


# --- three real nodes: the same flows and results with and without the pooler ---------------------
def node_config(url: str, direct_url: str | None, node_id: str) -> dict[str, Any]:
    # the workflow runtime holds 5 pool connections for the node's life (its writers and claim loop)
    db = {"url": url, "pool_min": 1, "pool_max": 16}
    if direct_url:
        db["direct_url"] = direct_url
    return {
        "database": db,
        "node": {"id": node_id, "heartbeat_interval": 0.5, "dead_after": 3.0},
        "app": {"modules": ["pooled_app", "pooled_workflow_app"], "example": False},
        "worker": {"lease": 3.0, "heartbeat_interval": 0.5, "rescue_interval": 1.0, "poll_interval": 0.5},
        # a run whose worker died is resumed within about lease + rescue_interval
        "workflows": {"lease": 2.0, "heartbeat_interval": 0.5, "rescue_interval": 0.5, "poll_interval": 0.5},
        "gateway": {"port": free_port(), "rate_limit_lease": 0.0},
        "realtime": {"fallback_poll": 0.05},
    }


async def _leader(conn: asyncpg.Connection) -> Any:
    return await conn.fetchrow("SELECT node_id, term FROM forge_leaders WHERE name = 'scheduler' AND node_id IS NOT NULL")


async def _ws_recv(ws: Any, timeout: float = 30.0) -> dict[str, Any]:
    return json.loads(await asyncio.wait_for(ws.recv(), timeout))


async def cluster_flows(tmp_path: Path, url: str, direct_url: str | None, admin_url: str) -> dict[str, Any]:
    procs: list[NodeProcess] = []

    def spawn(node_id: str) -> tuple[NodeProcess, str]:
        cfg = node_config(url, direct_url, node_id)
        p = NodeProcess(tmp_path / node_id, cfg, env=dict(ENV)).start()
        procs.append(p)
        return p, f"http://127.0.0.1:{cfg['gateway']['port']}"

    conn = await asyncpg.connect(admin_url)
    out: dict[str, Any] = {}
    try:
        n1, http1 = spawn("n1")
        await asyncio.to_thread(n1.wait_ready)
        first = await eventually(lambda: _leader(conn), 30, "n1 to lead")
        assert first["node_id"] == "n1"
        async with httpx.AsyncClient(timeout=30) as http:
            # a job running on n1 when n1 is killed (n1 is the only worker yet)
            slow_id = (await http.post(f"{http1}/rpc/start_slow", json={})).json()["data"]
            await eventually(lambda: conn.fetchval("SELECT node FROM pa_log WHERE event = 'slow-start'"), 30,
                             "the slow job to start on n1")
            # a workflow started by a mutation, mid-step on n1 when n1 is killed
            run_id = (await http.post(f"{http1}/rpc/start_order_workflow", json={"item": "lamp"})).json()["data"]
            held_on = await eventually(lambda: conn.fetchval(
                "SELECT node FROM pa_log WHERE event = 'wf-hold' AND ref = $1", run_id), 30,
                "the workflow's hold step to start on n1")
            assert held_on == "n1"
            (n2, http2), (n3, http3) = spawn("n2"), spawn("n3")
            await asyncio.gather(asyncio.to_thread(n2.wait_ready), asyncio.to_thread(n3.wait_ready))

            # a live query on n2 sees an order placed through n3, and its job's update
            async with websockets.connect(http2.replace("http", "ws") + "/ws") as ws:
                await ws.send(json.dumps({"type": "auth", "token": None}))
                assert (await _ws_recv(ws))["type"] == "ready"
                await ws.send(json.dumps({"type": "subscribe", "id": "s", "function": "orders_of",
                                          "args": {"owner": "alice"}}))
                assert (await _ws_recv(ws))["data"] == []
                placed = await http.post(f"{http3}/rpc/place_order", json={"owner": "alice", "item": "book"})
                failed = await http.post(f"{http3}/rpc/place_order", json={"owner": "alice", "item": "x", "fail": True})
                out["placed"], out["failed"] = placed.status_code, failed.status_code
                seen = []
                while not seen or seen[-1] != [("book", "done")]:
                    msg = await _ws_recv(ws)
                    assert msg["type"] == "data", msg
                    seen.append([(o["item"], o["status"]) for o in msg["data"]])
                out["live_last"] = seen[-1]
                out["live_items"] = sorted({item for push in seen for item, _ in push})

            # the outbox: one order and one job, none of the failed mutation's
            out["orders"] = await conn.fetchval("SELECT count(*) FROM pa_orders")
            out["fulfilled"] = await eventually(
                lambda: conn.fetchval("SELECT count(*) FROM pa_log WHERE event = 'fulfil'"), 30, "fulfil")

            # a cluster-wide rate limit of 3 calls, asked 6 times through two nodes
            out["rate"] = sorted([(await http.post(f"{h}/rpc/limited", json={})).status_code
                                  for h in (http2, http3) * 3])

            if direct_url:  # while every node is up: the pools go through PgBouncer, sessions do not
                rows = await conn.fetch("SELECT client_addr IS NULL AS via_bouncer, count(*) AS n FROM pg_stat_activity "
                                        "WHERE usename = $1 GROUP BY 1", ROLE)
                by = {r["via_bouncer"]: r["n"] for r in rows}
                out["bouncer_connections_within_pool_size"] = 0 < by.get(True, 0) <= POOL_SIZE
                out["direct_sessions_per_node"] = by.get(False, 0) <= 3 * 7

            # SIGKILL n1: the leader and the slow job's worker
            n1.kill()
            nxt = await eventually(lambda: _after(conn, first["term"]), 30, "a new leader")
            out["new_leader_elsewhere"] = nxt["node_id"] in ("n2", "n3")
            done = await eventually(lambda: conn.fetchrow(
                "SELECT node, attempt FROM pa_log WHERE event = 'slow-done'"), 60, "the slow job to be rescued")
            out["slow"] = {"done_by_survivor": done["node"] in ("n2", "n3"), "attempt": done["attempt"],
                           "runs": await conn.fetchval("SELECT count(*) FROM pa_log WHERE event = 'slow-done'"),
                           "job": slow_id is not None}
            out["workflow"] = await _workflow_outcome(conn, run_id)
            await eventually(lambda: conn.fetchval(
                "SELECT count(*) >= 3 FROM forge_cron_runs WHERE cron = 'tick' AND leader = $1", nxt["node_id"]),
                30, "the new leader to enqueue ticks")
        slots = [r["slot"] for r in await conn.fetch(
            "SELECT slot FROM forge_cron_runs WHERE cron = 'tick' AND kind = 'scheduled' ORDER BY slot")]
        out["cron"] = {
            "leaders": await conn.fetchval("SELECT count(DISTINCT leader) FROM forge_cron_runs WHERE cron = 'tick'"),
            "gaps": [(a, b) for a, b in zip(slots, slots[1:]) if (b - a).total_seconds() != 1],
            "dropped": await conn.fetchval("SELECT dropped_total FROM forge_cron_state WHERE cron = 'tick'"),
        }
        for p in procs:
            assert p is n1 or p.alive(), p.log()[-3000:]
        for p in procs:
            assert "prepared statement" not in p.log(), p.log()[-3000:]
        return out
    finally:
        await conn.close()
        for p in procs:
            p.terminate(timeout=20)


async def _workflow_outcome(conn: asyncpg.Connection, run_id: str) -> dict[str, Any]:
    """The run's end, its recorded steps (one row per step, written by which claim) and how often
    each step's function really ran (pa_log)."""
    run = await eventually(lambda: conn.fetchrow(
        "SELECT status, result::text AS result, claims, recoveries FROM forge_workflow_runs "
        "WHERE id = $1::uuid AND status IN ('succeeded', 'failed', 'cancelled')", run_id), 60,
        "the workflow to be resumed and end")
    steps = await conn.fetch("SELECT name, kind, status, attempts, claim, node_id FROM forge_workflow_steps "
                             "WHERE run_id = $1::uuid ORDER BY seq", run_id)
    ran = await conn.fetch("SELECT event, count(*) AS n FROM pa_log WHERE ref = $1 GROUP BY event", run_id)
    return {"status": run["status"], "result": json.loads(run["result"]),
            "claims": run["claims"], "recoveries": run["recoveries"],
            "steps": [(s["name"], s["kind"], s["status"], s["attempts"], s["claim"]) for s in steps],
            "resumed_by": sorted({"survivor" if s["node_id"] in ("n2", "n3") else s["node_id"]
                                  for s in steps if s["claim"] > 1}),
            "ran": {r["event"]: r["n"] for r in ran}}


async def _after(conn: asyncpg.Connection, term: int) -> Any:
    row = await _leader(conn)
    return row if row is not None and row["term"] > term else None


EXPECTED = {
    "placed": 200, "failed": 500,
    "live_last": [("book", "done")], "live_items": ["book"],
    "orders": 1, "fulfilled": 1,
    "rate": [200, 200, 200, 429, 429, 429],
    "new_leader_elsewhere": True,
    "slow": {"done_by_survivor": True, "attempt": 2, "runs": 1, "job": True},
    "cron": {"leaders": 2, "gaps": [], "dropped": 0},
    # n1 recorded the first step and died in the second; a survivor ran the second again (its
    # function twice, its result recorded once) and the third
    "workflow": {"status": "succeeded", "result": ["reserved lamp", "held", "shipped lamp"],
                 "claims": 2, "recoveries": 1,
                 "steps": [("wf_reserve", "step", "succeeded", 1, 1), ("wf_hold", "step", "succeeded", 1, 2),
                           ("wf_ship", "step", "succeeded", 1, 2)],
                 "resumed_by": ["survivor"],
                 "ran": {"wf-reserve": 1, "wf-hold": 2, "wf-ship": 1}},
}


@pytest.mark.timeout(400)
@pytest.mark.parametrize("through", ["pgbouncer", "direct"])
async def test_cluster_flows_same_with_and_without_pgbouncer(setup, database, tmp_path, through):
    direct = setup.direct(database)
    if through == "pgbouncer":
        got = await cluster_flows(tmp_path, setup.pooled(database), direct, setup.server.url(database))
        assert got.pop("bouncer_connections_within_pool_size") is True
        assert got.pop("direct_sessions_per_node") is True
    else:
        got = await cluster_flows(tmp_path, direct, None, setup.server.url(database))
    print(f"\n{through}: {got}")
    assert got == EXPECTED
