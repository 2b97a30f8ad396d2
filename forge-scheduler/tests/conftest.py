import os
import sys
from pathlib import Path

# test-only app modules and plugins live beside the tests; child forge-node processes need them too
APPS = str(Path(__file__).parent / "apps")
sys.path.insert(0, APPS)
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (APPS, os.environ.get("PYTHONPATH", "")) if p)
os.environ.setdefault("FORGE_LOG__LEVEL", "WARNING")

import pytest  # noqa: E402
from sched_helpers import FAST, ISOLATED  # noqa: E402


@pytest.fixture
def sched_node(forge_node):
    """``await sched_node(modules=[...], scheduler={...}, node={...})``: an in-process node running
    the scheduler role with fast timings and the fake job store."""

    async def make(*, modules=("sched_app",), scheduler=None, node=None, env=None, roles=("scheduler",)):
        cfg = {"node": {"roles": list(roles), **(node or {})}, "scheduler": {**FAST, **(scheduler or {})}}
        return await forge_node(modules=list(modules), config=cfg, env={**ISOLATED, **(env or {})})

    return make


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
