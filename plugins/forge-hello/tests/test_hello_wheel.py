"""The third-party plugin path: build forge-hello as a wheel, install it (not editable)
into a separate folder, and check that forge-node finds, loads and runs it."""

import json
import os
import subprocess
import sys
from pathlib import Path

import asyncpg
import httpx
import pytest

from forge_kernel.testing import contracts, wait_for

HERE = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    out = tmp_path_factory.mktemp("hello")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(out / "dist"), str(HERE)], check=True, timeout=300)
    wheel = next((out / "dist").glob("forge_hello-*.whl"))
    site = out / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheel)],
                   check=True, timeout=300)
    assert not list(site.glob("__editable__*")), "must be a real install"
    return site


def env_with(site):
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])}


def test_plugins_json_shows_it_loaded(installed):
    out = subprocess.run([sys.executable, "-m", "forge_kernel.cli", "plugins", "--json"], env=env_with(installed),
                         capture_output=True, text=True, timeout=120, check=True)
    hello = next(p for p in json.loads(out.stdout)["plugins"] if p["name"] == "hello")
    assert hello["status"] == "loaded"
    assert hello["distribution"] == "forge-hello" and hello["version"] == "0.1.0"
    assert hello["sections"] == ["hello"]
    assert set(hello["hooks"]) == {"forge_app_modules", "forge_cli_commands", "forge_config_sections",
                                   "forge_migrations", "forge_services"}


async def test_node_runs_the_installed_plugin(installed, forge_processes):
    node = forge_processes({"hello": {"greeting": "hi from a wheel", "every": 0.1}, "app": {"example": False}},
                           env={"PYTHONPATH": str(installed), "FORGE_DISABLE_PLUGINS": "worker,scheduler,realtime,observe"})
    conn = await asyncpg.connect(forge_processes.db_url)
    try:
        async def count():
            return await conn.fetchval("SELECT count(*) FROM hello_greetings WHERE node_id = 'n1'")
        for _ in range(100):
            if await count() >= 3:
                break
            await __import__("asyncio").sleep(0.1)
        assert await count() >= 3
        assert await conn.fetchval("SELECT greeting FROM hello_greetings LIMIT 1") == "hi from a wheel"
    finally:
        await conn.close()
    # the function the plugin's forge_app_modules contributed is served like the app's own
    port = node.ready_info()["ports"]["http"]
    r = httpx.post(f"http://127.0.0.1:{port}/rpc/hello.greetings", json={"limit": 2}, timeout=30)
    assert r.status_code == 200 and r.json() == {"data": ["hi from a wheel"] * 2}
    assert node.terminate() == 0


def test_contracts_hold_for_the_plugin(installed, monkeypatch):
    monkeypatch.syspath_prepend(str(installed))
    import forge_hello.hooks as hooks

    contracts.check_config_round_trip(hooks)
    contracts.check_loader_isolation(hooks, name="hello")


async def test_migration_contracts(installed, monkeypatch, forge_database_url):
    monkeypatch.syspath_prepend(str(installed))
    import forge_hello.hooks as hooks

    await contracts.check_migrations_idempotent(hooks, forge_database_url)
    await contracts.check_concurrent_migrations(hooks, forge_database_url)
