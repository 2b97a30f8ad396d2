"""pytest fixtures for FORGE (auto-loaded by pytest through the ``pytest11`` entry point).

Tests talk to a real PostgreSQL: ``FORGE_TEST_DATABASE_URL`` when set, otherwise one
embedded server per test session under a temporary folder (stopped at the end). Each
test that asks for ``forge_db_url`` gets a database of its own.

Needs ``pip install 'forge-kernel[testing]'`` (pytest, pytest-asyncio, hypothesis). The async
fixtures are pytest-asyncio fixtures, so they work in either ``asyncio_mode``: with ``auto``
(``[tool.pytest.ini_options] asyncio_mode = "auto"``, what this repository uses) async tests need
nothing more; in pytest-asyncio's default ``strict`` mode mark each async test
``@pytest.mark.asyncio``.
"""

from __future__ import annotations

import os
import signal
import tempfile
import threading
import uuid
from pathlib import Path
from typing import Any, Iterator

import pytest

from ..db import with_database as _with_db
from .procs import NodeProcess, free_port

try:
    from pytest_asyncio import fixture as async_fixture
except ImportError:  # without pytest-asyncio no async test runs; the plain fixtures still load
    async_fixture = pytest.fixture


@pytest.fixture(scope="session")
def forge_database_url() -> Iterator[str]:
    url = os.environ.get("FORGE_TEST_DATABASE_URL")
    if url:
        yield url
        return
    from ..embedded_pg import EmbeddedPostgres

    root = Path(os.environ.get("FORGE_TEST_PGROOT") or tempfile.mkdtemp(prefix="forge-test-pg-"))
    # tests need speed, not durability; benchmarks start their own server with stock settings
    # TCP too (password required), for the few tests about TCP sockets (keepalive); the URL is the socket's
    pg = EmbeddedPostgres(root, settings={"fsync": "off", "synchronous_commit": "off", "full_page_writes": "off"},
                          tcp_port=free_port())
    url = pg.start()
    # child processes (forge-node) share it: the URL names the password file (0600, this account's),
    # so children running as this account connect and nobody else can
    os.environ["FORGE_TEST_DATABASE_URL"] = url
    try:
        yield url
    finally:
        os.environ.pop("FORGE_TEST_DATABASE_URL", None)
        pg.release(wait=5)


@pytest.fixture
def forge_pg_folder() -> Iterator[Path]:
    """A fresh folder for an embedded PostgreSQL of a test's own, removed afterwards. Outside
    pytest's ``tmp_path``: as root the server runs as ``forge_pg``, which may not enter the 0700
    ``/tmp/pytest-of-root`` (and FORGE never loosens folders it does not own)."""
    import shutil

    folder = Path(tempfile.mkdtemp(prefix="forge-pg-test-"))
    folder.chmod(0o711)  # ours: others may pass through to the data folder, not list it
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@async_fixture
async def forge_db_url(forge_database_url: str) -> Any:
    """A fresh, empty database for this test; dropped afterwards."""
    import asyncpg

    name = f"forge_t_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(forge_database_url)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    yield _with_db(forge_database_url, name)
    admin = await asyncpg.connect(forge_database_url)
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


@pytest.fixture
def forge_plugin_manager():
    """A fresh plugin manager with FORGE's hook specs and no plugins."""
    from ..plugins import new_plugin_manager

    return new_plugin_manager()


@async_fixture
async def forge_node(forge_db_url: str):
    """Factory for in-process nodes on this test's database: ``node = await forge_node(modules=[...])``.
    Every node is stopped at teardown."""
    from ..config import load_config
    from ..node import Node
    from ..plugins import PluginLoader

    nodes: list[Node] = []

    async def make(*, modules: list[str] | None = None, config: dict[str, Any] | None = None,
                   loader: PluginLoader | None = None, registry: Any = None, env: dict[str, str] | None = None) -> Node:
        loader = loader or PluginLoader(env=env).load()
        data: dict[str, Any] = {k: dict(v) for k, v in (config or {}).items()}
        data.setdefault("database", {}).setdefault("url", forge_db_url)  # a test may bring its own server
        data["database"].setdefault("pool_min", 1)
        data["database"].setdefault("pool_max", 10)
        if modules is not None:
            data.setdefault("app", {})["modules"] = modules
            data["app"].setdefault("example", False)
        cfg = load_config(loader.config_sections(), data=data, env=env or {})
        node = Node(cfg, loader, registry=registry)
        nodes.append(node)
        await node.start()
        return node

    yield make
    for node in reversed(nodes):
        await node.stop()


@pytest.fixture
def forge_processes(tmp_path: Path, forge_db_url: str):
    """Factory for real ``forge-node`` processes sharing this test's database. Each is
    SIGTERMed (then SIGKILLed) by pid at teardown."""
    procs: list[NodeProcess] = []

    def spawn(config: dict[str, dict[str, Any]] | None = None, *, node_id: str | None = None,
              env: dict[str, str] | None = None, ready: bool = True, args: tuple[str, ...] = ()) -> NodeProcess:
        cfg = {k: dict(v) for k, v in (config or {}).items()}
        cfg.setdefault("database", {})["url"] = forge_db_url
        nid = node_id or f"n{len(procs) + 1}"
        cfg.setdefault("node", {}).setdefault("id", nid)
        penv = dict(env or {})
        # each node gets its own HTTP port unless the test chose one (ignored without a gateway)
        if "port" not in cfg.get("gateway", {}):
            penv.setdefault("FORGE_GATEWAY__PORT", str(free_port()))
        p = NodeProcess(tmp_path / nid, cfg, env=penv, args=args)
        procs.append(p)
        p.start()
        if ready:
            p.wait_ready()
        return p

    spawn.db_url = forge_db_url  # type: ignore[attr-defined]
    yield spawn
    for p in procs:
        p.terminate(timeout=20)


def pytest_configure(config: Any) -> None:
    config.addinivalue_line("markers", "slow: soak, chaos and benchmark runs; skipped unless FORGE_SLOW=1")
    _teardown_on_sigterm()


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def _teardown_on_sigterm() -> None:
    """A SIGTERM (``timeout``, a CI runner cancelling a job) ends the session like Ctrl-C: pytest then
    tears its fixtures down, stopping the nodes and the embedded PostgreSQL they started. By default
    SIGTERM ends Python at once, and everything the tests started kept running. A handler someone
    else installed is left alone."""
    if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _raise_interrupt)


def pytest_collection_modifyitems(config: Any, items: list[Any]) -> None:
    if os.environ.get("FORGE_SLOW") == "1":
        return
    skip = pytest.mark.skip(reason="slow: set FORGE_SLOW=1 to run")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
