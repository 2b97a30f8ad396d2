"""Helpers shared by the mesh tests (imported as ``mesh_support``): node processes, HTTP calls, databases."""

from __future__ import annotations

import asyncio
import functools
import os
import time
import uuid
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import jwt

from forge_kernel.db import with_database
from forge_kernel.testing import NodeProcess, free_port

APPS = str(Path(__file__).parent / "apps")
SECRET = "mesh-test-secret-long-enough-for-hs256-signatures"
# forge-worker too: the test app defines a job, and a node must have a job store for it (its roles
# are chosen per test, so the worker role runs only where a test asks for it)
PLUGINS = ("forge_kernel.kernel_plugin", "forge_gateway.hooks", "forge_mesh.hooks", "forge_worker.hooks")


def node_env(*extra_plugins: str, **env: str) -> dict[str, str]:
    """A node process: the test apps importable; only the kernel, the gateway, the mesh and
    ``extra_plugins`` loaded (packages built beside us must not decide these tests)."""
    return {
        "PYTHONPATH": os.pathsep.join(p for p in (APPS, os.environ.get("PYTHONPATH", "")) if p),
        "FORGE_DISABLE_PLUGIN_AUTOLOAD": "1",
        "FORGE_PLUGINS": ",".join(dict.fromkeys([*PLUGINS, *extra_plugins])),
        "FORGE_LOG__LEVEL": "INFO",
        **env,
    }


def node_config(db_url: str, node_id: str, roles: list[str], *, capabilities: list[str] | None = None,
                mesh: dict[str, Any] | None = None, http_port: int | None = None, **sections: Any) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "node": {"id": node_id, "roles": roles, "capabilities": capabilities or [], "heartbeat_interval": 0.5,
                 "drain_timeout": 10.0},
        "database": {"url": db_url, "pool_min": 1, "pool_max": 8},
        "app": {"modules": ["mesh_app"], "example": False, "function_timeout": 10.0},
        "mesh": {"refresh_interval": 0.2, "probe_interval": 0.25, **(mesh or {})},
    }
    if "gateway" in roles:
        cfg["gateway"] = {"port": http_port or free_port(), "jwt_secret": SECRET, "jwt_algorithms": ["HS256"]}
    for name, table in sections.items():
        cfg.setdefault(name, {}).update(table)
    return cfg


def start_node(workdir: Path, config: dict[str, Any], env: dict[str, str] | None = None, *, wait: bool = True) -> NodeProcess:
    p = NodeProcess(workdir / f"{config['node']['id']}-{uuid.uuid4().hex[:6]}", config, env=env or node_env())
    p.start()
    if wait:
        p.wait_ready(90)
    return p


def http_url(p: NodeProcess) -> str:
    return f"http://127.0.0.1:{p.config['gateway']['port']}"


def token(sub: str = "alice", roles: tuple[str, ...] = ("reader",)) -> str:
    return jwt.encode({"sub": sub, "roles": list(roles), "exp": int(time.time()) + 600}, SECRET, algorithm="HS256")


async def create_database(admin_url: str) -> str:
    name = f"forge_mesh_{uuid.uuid4().hex[:10]}"
    conn = await asyncpg.connect(admin_url)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    return with_database(admin_url, name)


@functools.lru_cache(maxsize=32)
def client_config(db_url: str, tls_dir: str = "") -> Any:
    """The configuration a CLI (or the dashboard) of this cluster would load."""
    from forge_kernel.config import load_config
    from forge_kernel.plugins import PluginLoader

    loader = PluginLoader(env={"FORGE_DISABLE_PLUGIN_AUTOLOAD": "1", "FORGE_PLUGINS": ",".join(PLUGINS)}).load()
    return load_config(loader.config_sections(), data={"database": {"url": db_url},
                                                            "mesh": {"tls_dir": tls_dir} if tls_dir else {}}, env={})


async def mesh_view(db_url: str, node_id: str, tls_dir: str = "") -> dict[str, Any] | None:
    """What ``node_id`` says about its mesh (live status over the mesh), or None when it does not answer."""
    from forge_mesh import live_status

    conn = await asyncpg.connect(db_url)
    try:
        rows = await live_status(client_config(db_url, tls_dir), conn, timeout=1.0)
    finally:
        await conn.close()
    mine = next((r for r in rows if r["id"] == node_id and r["reachable"]), None)
    return mine["activity"].get("mesh") if mine is not None else None


async def wait_peers(db_url: str, node_id: str, want: set[str], timeout: float = 30.0,
                     in_flight: dict[str, int] | None = None) -> None:
    """Until ``node_id``'s mesh lists the nodes of ``want`` as healthy (and, when given, has those
    calls in flight to them)."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        view = await mesh_view(db_url, node_id)
        if view is not None:
            peers = view.get("peers", {})
            last = peers
            healthy = {nid for nid, p in peers.items() if not p["suspect"]}
            if want <= healthy and all(peers[n]["in_flight"] == c for n, c in (in_flight or {}).items()):
                return
        await asyncio.sleep(0.05)
    raise AssertionError(f"node {node_id} did not see healthy peers {sorted(want)} {in_flight or ''} in time "
                         f"(last: {last})")


async def rpc(client: httpx.AsyncClient, base: str, function: str, args: dict | None = None, **kw: Any) -> httpx.Response:
    return await client.post(f"{base}/rpc/{function}", json=args or {}, **kw)


async def hold(url: str) -> None:
    """A call that stays in flight on one function node until cancelled (the forwarder then prefers
    the other nodes: fewest calls in flight)."""
    async with httpx.AsyncClient(timeout=None) as client:
        await rpc(client, url, "hold", {"seconds": 3000})
