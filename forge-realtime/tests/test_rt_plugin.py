"""The plugin's wiring: hooks, maintenance, config errors, and independence from other plugins."""

from __future__ import annotations

import ast
import asyncio
import sys
from pathlib import Path

import pytest

from forge_kernel import db as dbmod
from forge_kernel.config import load_config
from forge_kernel.errors import ConfigError
from forge_kernel.plugins import PluginLoader
from forge_realtime import hooks
from forge_realtime.capture import install_capture
from rt_helpers import rt_db, rt_node  # noqa: F401 - pytest fixtures

PACKAGE = Path(hooks.__file__).parent
ALLOWED_THIRD_PARTY = {"attrs", "asyncpg", "litestar", "loguru", "msgspec", "websockets"}


def test_imports_only_the_kernel_stdlib_and_declared_libraries():
    for path in PACKAGE.rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            for name in names:
                top = name.split(".")[0]
                assert top in sys.stdlib_module_names or top in ALLOWED_THIRD_PARTY or top in ("forge_kernel",), \
                    f"{path.name} imports {name}"


def test_config_section_rejects_bad_values():
    loader = PluginLoader(env={}).load()
    for bad, needle in [({"fallback_poll": 0}, "fallback_poll"), ({"max_subscriptions": "many"}, "max_subscriptions"),
                        ({"no_such_key": 1}, "no_such_key")]:
        with pytest.raises(ConfigError) as info:
            load_config(loader.config_sections(), data={"realtime": bad}, env={})
        assert needle in str(info.value)


async def test_trim_runs_as_a_maintenance_task_and_routes_follow_the_role(rt_node):
    node = await rt_node(retention=1)
    [task] = [t for t in node.maintenance if t.name == "realtime.trim_change_log"]
    await node.executor.call("add_item", {"owner": "a", "title": "x"})  # not captured yet: nothing logged
    async with node.pool.acquire() as conn:
        await install_capture(conn, "rt_items", [])
        await conn.execute("INSERT INTO rt_items (owner, title) VALUES ('a', 'y')")
        await conn.execute("UPDATE forge_changes SET at = now() - interval '1 minute'")
        assert await task.run(conn) == 1
        assert await conn.fetchval("SELECT count(*) FROM forge_changes") == 0
    assert len(hooks.forge_gateway_routes(node)) == 1
    node.roles = [r for r in node.roles if r != "realtime"]
    assert hooks.forge_gateway_routes(node) == []


async def test_nodes_racing_to_install_capture_agree(rt_db, forge_db_url):
    conns = [await dbmod.connect(forge_db_url) for _ in range(4)]
    try:
        results = await asyncio.gather(*(install_capture(c, "things", [col]) for c, col in
                                         zip(conns, ["owner", "n", "owner", "note"])))
        assert sum(changed for _, changed in results) >= 1
        cols = await rt_db.fetchval("SELECT columns FROM forge_realtime_captures WHERE tbl = 'things'")
        assert set(cols) == {"id", "owner", "n", "note"}
        assert await rt_db.fetchval(
            "SELECT count(*) FROM pg_trigger WHERE tgrelid = 'things'::regclass AND NOT tgisinternal") == 4
    finally:
        for c in conns:
            await c.close()
