import os
import sys
from pathlib import Path

# test-only app modules and plugins live beside the tests; child forge-node processes need them too
APPS = str(Path(__file__).parent / "apps")
sys.path.insert(0, APPS)
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (APPS, os.environ.get("PYTHONPATH", "")) if p)
os.environ.setdefault("FORGE_LOG__LEVEL", "WARNING")

import asyncio  # noqa: E402
import time  # noqa: E402

import pytest  # noqa: E402

#: in-process nodes load only the scheduler and the test job store, whatever else is installed
ISOLATED = {"FORGE_DISABLE_PLUGIN_AUTOLOAD": "1", "FORGE_PLUGINS": "forge_scheduler.hooks,sched_fake_store"}
FAST = {"election_interval": 0.1, "renew_interval": 0.2, "tick_interval": 0.1, "check_timeout": 2.0}


@pytest.fixture
def sched_node(forge_node):
    """``await sched_node(modules=[...], scheduler={...}, node={...})``: an in-process node running
    the scheduler role with fast timings and the fake job store."""

    async def make(*, modules=("sched_app",), scheduler=None, node=None, env=None, roles=("scheduler",)):
        cfg = {"node": {"roles": list(roles), **(node or {})}, "scheduler": {**FAST, **(scheduler or {})}}
        return await forge_node(modules=list(modules), config=cfg, env={**ISOLATED, **(env or {})})

    return make


async def eventually(predicate, timeout=15.0, interval=0.05, what="condition"):
    """Poll an async predicate until it returns something truthy."""
    deadline = time.monotonic() + timeout
    while True:
        value = await predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(interval)


@pytest.fixture
async def sched_db(forge_db_url):
    """This test's database with the kernel's and the scheduler's tables (no node running)."""
    from forge_kernel import migrations
    from forge_kernel.db import connect
    from forge_kernel.plugins import PluginLoader

    loader = PluginLoader(env=ISOLATED).load()
    conn = await connect(forge_db_url)
    try:
        await migrations.migrate(conn, loader.migrations())
    finally:
        await conn.close()
    return forge_db_url
