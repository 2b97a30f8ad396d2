"""Maintenance: only the leader runs chores; dead nodes; retention; failures are recorded."""

import asyncio

import asyncpg
from sched_helpers import ISOLATED, eventually

from forge_scheduler import scheduler_of
from forge_scheduler.maintenance import delete_old_nodes, delete_old_runs, mark_dead_nodes

CHORES = {"FORGE_PLUGINS": ISOLATED["FORGE_PLUGINS"] + ",sched_chores"}


async def test_only_the_leader_runs_chores_and_the_follower_takes_over(sched_node):
    a = await sched_node(modules=[], env=CHORES, node={"id": "node-a"})
    await eventually(lambda: _v(scheduler_of(a).election.is_leader), what="a leads")
    b = await sched_node(modules=[], env=CHORES, node={"id": "node-b"})
    await eventually(lambda: a.pool.fetchval("SELECT count(*) >= 5 FROM sched_chore_runs"), what="chore runs")
    await asyncio.sleep(0.5)
    assert {r["node_id"] for r in await a.pool.fetch("SELECT DISTINCT node_id FROM sched_chore_runs")} == {"node-a"}
    # every plugin's task ran, the failing one is recorded without stopping the others
    rows = {r["task"]: r for r in await a.pool.fetch("SELECT * FROM forge_maintenance")}
    assert {"test.record", "test.broken", "scheduler.dead_nodes", "scheduler.cron_history_retention",
            "scheduler.node_retention"} <= set(rows)
    assert rows["test.broken"]["failures"] >= 1 and "this chore always fails" in rows["test.broken"]["last_error"]
    assert rows["test.record"]["failures"] == 0 and rows["test.record"]["last_node"] == "node-a"
    await a.stop()
    await eventually(lambda: _v(scheduler_of(b) is not None and scheduler_of(b).election.is_leader), what="b leads")
    await eventually(lambda: b.pool.fetchval("SELECT count(*) > 0 FROM sched_chore_runs WHERE node_id = 'node-b'"),
                     what="b runs the chores")
    leader = await b.pool.fetchrow("SELECT node_id, term FROM forge_leaders")
    assert (leader["node_id"], leader["term"]) == ("node-b", 2)


async def test_stale_heartbeats_are_marked_dead(sched_db):
    conn = await asyncpg.connect(sched_db)
    try:
        await conn.execute(
            """INSERT INTO forge_nodes (id, host, pid, version, status, last_heartbeat) VALUES
               ('fresh', 'h', 1, '0', 'running', now()),
               ('stale', 'h', 2, '0', 'running', now() - interval '60 seconds'),
               ('stale-draining', 'h', 3, '0', 'draining', now() - interval '60 seconds'),
               ('stopped', 'h', 4, '0', 'stopped', now() - interval '60 seconds')""")
        assert sorted(await mark_dead_nodes(conn, 15)) == ["stale", "stale-draining"]
        status = {r["id"]: r["status"] for r in await conn.fetch("SELECT id, status FROM forge_nodes")}
        assert status == {"fresh": "running", "stale": "dead", "stale-draining": "dead", "stopped": "stopped"}
        assert await mark_dead_nodes(conn, 15) == []
        await conn.execute("UPDATE forge_nodes SET stopped_at = now() - interval '2 days' WHERE id IN ('stale', 'stopped')")
        assert await delete_old_nodes(conn, 86400) == 2
        assert sorted(r["id"] for r in await conn.fetch("SELECT id FROM forge_nodes")) == ["fresh", "stale-draining"]
    finally:
        await conn.close()


async def test_a_dead_node_marked_by_the_leader(sched_node):
    node = await sched_node(modules=[], node={"dead_after": 1.0}, scheduler={"dead_node_interval": 0.1})
    await node.pool.execute("INSERT INTO forge_nodes (id, host, pid, version, status, last_heartbeat) "
                            "VALUES ('ghost', 'h', 1, '0', 'running', now() - interval '5 seconds')")
    await eventually(lambda: node.pool.fetchval("SELECT status = 'dead' FROM forge_nodes WHERE id = 'ghost'"),
                     what="ghost marked dead")
    assert await node.pool.fetchval("SELECT status FROM forge_nodes WHERE id = $1", node.id) == "running"


async def test_cron_history_retention(sched_db):
    conn = await asyncpg.connect(sched_db)
    try:
        await conn.execute(
            """INSERT INTO forge_cron_runs (cron, slot, kind, status, finished_at) VALUES
               ('c', now() - interval '10 days', 'scheduled', 'succeeded', now() - interval '10 days'),
               ('c', now() - interval '9 days', 'scheduled', 'skipped', now() - interval '9 days'),
               ('c', now() - interval '9 days', 'manual', 'queued', NULL),
               ('c', now() - interval '1 hour', 'scheduled', 'failed', now() - interval '1 hour')""")
        assert await delete_old_runs(conn, 7 * 86400) == 2
        left = sorted(r["status"] for r in await conn.fetch("SELECT status FROM forge_cron_runs"))
        assert left == ["failed", "queued"]  # open runs are kept whatever their age
    finally:
        await conn.close()


async def _v(value):
    return value
