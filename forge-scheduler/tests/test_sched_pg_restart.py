"""PostgreSQL restarts under a leading node: leadership is lost with the session, taken again
(new term), and the cron carries on without running a slot twice."""

import asyncio

import pytest
from sched_helpers import FAST, ISOLATED, eventually

from forge_kernel.config import load_config
from forge_kernel.embedded_pg import EmbeddedPostgres
from forge_kernel.node import Node
from forge_kernel.plugins import PluginLoader
from forge_scheduler import scheduler_of


@pytest.fixture
async def private_pg(forge_pg_folder):
    """A server of this test's own: restarting the shared one would disturb other tests."""
    pg = EmbeddedPostgres(forge_pg_folder / "pg", settings={"fsync": "off"})
    url = await asyncio.to_thread(pg.start)
    yield pg, url
    await asyncio.to_thread(pg.release)


async def test_leader_survives_a_postgres_restart(private_pg):
    pg, url = private_pg
    loader = PluginLoader(env=ISOLATED).load()
    cfg = load_config(loader.config_sections(), env={}, data={
        "database": {"url": url, "pool_min": 1, "pool_max": 5}, "node": {"roles": ["scheduler"]},
        "app": {"modules": ["sched_app"], "example": False}, "scheduler": FAST})
    node = Node(cfg, loader)
    await node.start()
    try:
        sched = scheduler_of(node)
        await eventually(lambda: node.pool.fetchval("SELECT count(*) >= 2 FROM forge_cron_runs"), what="runs")
        # stop then start on the same port (pg_ctl restart would keep the server attached to our pipes)
        await asyncio.to_thread(pg.stop)
        await asyncio.sleep(1)
        await asyncio.to_thread(pg.start)

        async def new_term():
            try:
                row = await node.pool.fetchrow("SELECT node_id, term FROM forge_leaders")
            except Exception:
                return None
            return row if row and row["term"] >= 2 and sched.election.is_leader else None

        row = await eventually(new_term, timeout=30, what="leadership after the restart")
        assert row["node_id"] == node.id
        before = await node.pool.fetchval("SELECT max(slot) FROM forge_cron_runs")
        await eventually(lambda: node.pool.fetchval("SELECT max(slot) > $1 FROM forge_cron_runs", before),
                         timeout=20, what="new slots after the restart")
        dup = await node.pool.fetchval("SELECT count(*) - count(DISTINCT (cron, slot)) FROM forge_cron_runs WHERE kind = 'scheduled'")
        assert dup == 0
    finally:
        await node.stop()
